#!/usr/bin/env bash
# A later session's code on 2 GPUs, 2026-11-29 (disk chains stamped on disk, connector
# settings compared across ranks, each init_distributed's store keys apart): the GPU tier
# with its 2-GPU tests, and the 8B demo at TP 2 in bf16 under mpirun and under torchrun.
# Writes $OUT/stamps_and_checks.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/stamps_and_checks/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/stamps_and_checks; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 110 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -1 $out/demo_8b_tp2_mpirun.txt
timeout 110 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -1 $out/demo_8b_tp2_torchrun.txt
cd $OUT && tar czf stamps_and_checks.tgz stamps_and_checks && rm -rf stamps_and_checks
