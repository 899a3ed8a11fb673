#!/usr/bin/env bash
# A later session's final code on 2 GPUs (TP 2), 2026-11-29: the GPU tier with its 2-GPU
# tests, the 8B demo at TP 2 (bf16), and the coordination matrix ({mpirun, torchrun} x
# {2, 4 ranks} x 1..1024 in flight) on the host's cores. Writes $OUT/tp2_plan_checks.tgz.
# From the repository root: OUT=dir bash benchmarks/results/gpu/tp2_plan_checks/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/tp2_plan_checks; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 100 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp2.txt 2>&1; tail -2 $out/demo_8b_tp2.txt
PYTHON=python3 OUT_DIR=$out LAUNCHERS="mpirun torchrun" SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 BUDGET_S=4 timeout 220 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| 256 \|" $out/coordination.md
cd $OUT && tar czf tp2_plan_checks.tgz tp2_plan_checks && rm -rf tp2_plan_checks
