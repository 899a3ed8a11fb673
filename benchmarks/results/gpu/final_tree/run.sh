#!/usr/bin/env bash
# The GPU tier (its 2-GPU tests included) on this session's final tree, 2x H200,
# 2026-11-29. Writes $OUT/final_tree.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/final_tree/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final_tree; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
cd $OUT && tar czf final_tree.tgz final_tree && rm -rf final_tree
