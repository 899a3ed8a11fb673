#!/usr/bin/env bash
# 2026-11-30, the session's final code on 2 GPUs, after the review's mends (the KV cache's
# memory check in the engine's start exchange, on CUDA: free plus what torch holds unused):
# the GPU tier with its 2-GPU tests, and the 8B demo at TP 2 in bf16 under mpirun and
# torchrun. Writes $OUT/final_nov30.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/final_nov30/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final_nov30; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
timeout 120 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_torchrun.txt
# A KV cache larger than the GPUs: one line on every rank, at once.
timeout 120 launch/mpirun.sh -n 2 kvdist generate --device cuda --model llama3-8b --num-blocks 100000000 --prompt hi > $out/too_many_blocks.txt 2>&1; echo "exit $?"; tail -n 3 $out/too_many_blocks.txt
cd $OUT && tar czf final_nov30.tgz final_nov30 && rm -rf final_nov30
