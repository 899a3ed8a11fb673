#!/usr/bin/env bash
# A later session's final commit on one GPU, 2026-11-29: the GPU tier alone (the 2-GPU
# tests skip). Writes $OUT/final_tier.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/final_tier/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final_tier; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
cd $OUT && tar czf final_tier.tgz final_tier && rm -rf final_tier
