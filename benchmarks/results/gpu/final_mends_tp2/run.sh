#!/usr/bin/env bash
# That session's final code (after its review mends: the IO process's goodbye, stamps
# made while draining, the MPI start-up guards) on 2 GPUs, 2026-11-29: the GPU tier with
# its 2-GPU tests and the 8B demo at TP 2 in bf16. Writes $OUT/final_mends_tp2.tgz.
# From the repository root: OUT=dir bash benchmarks/results/gpu/final_mends_tp2/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final_mends_tp2; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 110 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp2.txt 2>&1; tail -n 1 $out/demo_8b_tp2.txt
cd $OUT && tar czf final_mends_tp2.tgz final_mends_tp2 && rm -rf final_mends_tp2
