#!/usr/bin/env bash
# The session's last code on 2 GPUs, 2026-11-29, after the audits' fixes (engine, coordinator,
# connector start, examples): the GPU tier with its 2-GPU tests and the 8B demo at TP 2 in
# bf16 under mpirun and torchrun. Writes $OUT/session_last_tier.tgz.
# From the repository root: OUT=dir bash benchmarks/results/gpu/session_last_tier/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/session_last_tier; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
timeout 120 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_torchrun.txt
cd $OUT && tar czf session_last_tier.tgz session_last_tier && rm -rf session_last_tier
