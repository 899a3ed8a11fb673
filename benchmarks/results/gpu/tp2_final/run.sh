#!/usr/bin/env bash
# This session's final code on 2 GPUs (TP 2), 2026-11-29: the GPU tier with its 2-GPU
# tests and the 8B demo at TP 2 (bf16). Writes $OUT/tp2_final.tgz. From the repository
# root: OUT=dir bash benchmarks/results/gpu/tp2_final/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/tp2_final; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 100 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp2.txt 2>&1; tail -2 $out/demo_8b_tp2.txt
cd $OUT && tar czf tp2_final.tgz tp2_final && rm -rf tp2_final
