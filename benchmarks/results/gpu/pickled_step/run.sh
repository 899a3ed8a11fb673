#!/usr/bin/env bash
# 2026-11-30, on a 2x H200 host: the coordination matrix with the second baseline (the
# per-step pickled pattern) and the plan's block-id check; the GPU tier with its 2-GPU
# tests; the 8B demo at TP 2 in bf16 under mpirun. Writes $OUT/pickled_step.tgz. From the
# repository root:
#   OUT=dir bash benchmarks/results/gpu/pickled_step/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/pickled_step; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
PYTHON=python3 OUT_DIR=$out LAUNCHERS="mpirun torchrun" SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 BUDGET_S=3 timeout 300 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| (1|256) \| kvdist" $out/coordination.md
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
cd $OUT && tar czf pickled_step.tgz pickled_step && rm -rf pickled_step
