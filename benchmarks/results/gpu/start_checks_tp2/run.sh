#!/usr/bin/env bash
# This session's code on 2 GPUs, 2026-11-29: the connector start's shared-storage check
# (disk directory ids), start_connector public, the coordinator's audit fixes. Runs the
# GPU tier with its 2-GPU tests, the 8B demo at TP 2 in bf16, and the coordination
# benchmark at 256 in flight under mpirun (2 ranks). Writes $OUT/start_checks_tp2.tgz.
# From the repository root: OUT=dir bash benchmarks/results/gpu/start_checks_tp2/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/start_checks_tp2; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 120 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp2.txt 2>&1; tail -n 1 $out/demo_8b_tp2.txt
LAUNCHERS=mpirun RANKS=2 SIZES=256 STEPS=400 MIN_STEPS=50 BUDGET_S=8 PYTHON=python3 OUT_DIR=$out timeout 120 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| 256 \|" $out/coordination.md
cd $OUT && tar czf start_checks_tp2.tgz start_checks_tp2 && rm -rf start_checks_tp2
