#!/usr/bin/env bash
# 2026-11-30, seventh session, on a lent 2x H200 host: the GPU tier with its 2-GPU tests,
# the 8B demo at TP 2 (bf16) under mpirun and torchrun, and the coordination benchmark at
# 1, 16 and 256 in flight under mpirun (2 and 4 ranks). Writes $OUT/check.tgz. From the repository
# root:  OUT=/absolute/dir bash benchmarks/results/gpu/session7_nov30/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/check; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 2 $out/demo_8b_tp2_mpirun.txt
timeout 120 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -n 2 $out/demo_8b_tp2_torchrun.txt
LAUNCHERS=mpirun SIZES=1,16,256 STEPS=400 MIN_STEPS=50 BUDGET_S=8 PYTHON=python3 OUT_DIR=$out timeout 200 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| (1|16|256) \|" $out/coordination.md
cd $OUT && tar czf check.tgz check && rm -rf check
