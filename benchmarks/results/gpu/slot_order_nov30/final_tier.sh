#!/usr/bin/env bash
# 2026-11-30, the session's final code on a 1x H200 host: the GPU tier, the 8B demo at
# TP 1 and the engine-integration example on CUDA. Writes $OUT/final.tgz. From the
# repository root: OUT=dir bash benchmarks/results/gpu/slot_order_nov30/final_tier.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%h 2>/dev/null; } > $out/machine.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 150 launch/mpirun.sh -n 1 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp1.txt 2>&1; tail -n 1 $out/demo_8b_tp1.txt
cd $OUT && tar czf final.tgz final && rm -rf final
