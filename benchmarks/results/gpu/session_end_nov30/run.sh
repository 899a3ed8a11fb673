#!/usr/bin/env bash
# 2026-11-30, the session's final code on a 2x H200 host: the GPU tier with its 2-GPU
# tests (dropped saves of a failed step, the plan checks of block ids, cached ids and
# step numbers included), the coordination matrix with both baselines, and the 8B demo at
# TP 2 in bf16 under mpirun and torchrun. Writes $OUT/session_end_nov30.tgz. From the
# repository root:
#   OUT=dir bash benchmarks/results/gpu/session_end_nov30/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/session_end_nov30; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
PYTHON=python3 OUT_DIR=$out LAUNCHERS="mpirun torchrun" SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 BUDGET_S=3 timeout 300 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| (1|256) \| kvdist" $out/coordination.md
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
timeout 120 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_torchrun.txt
cd $OUT && tar czf session_end_nov30.tgz session_end_nov30 && rm -rf session_end_nov30
