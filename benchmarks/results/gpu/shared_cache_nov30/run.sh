#!/usr/bin/env bash
# 2026-11-30, third session, on a 2x H200 host: the GPU tier with its 2-GPU tests and the
# 8B demo at TP 2 under mpirun (regression checks of the disk connector's changes).
# Writes $OUT/tier.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/shared_cache_nov30/run.sh
# Then `kvdist bench shared-cache` on the GPUs, old code against new (after making
# ab_old as benchmarks/results/shared_cache/run.sh says):
#   DEVICE=cuda OUT=dir/shared bash benchmarks/results/shared_cache/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/tier; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; mpiexec --version | head -1; } > $out/machine.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 150 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
cd $OUT && tar czf tier.tgz tier && rm -rf tier
