#!/usr/bin/env bash
# This session's last code on 2 GPUs (TP 2), 2026-11-29: the GPU tier with its 2-GPU
# tests, the 8B demo at TP 2 (bf16), and one round of 8B multi-turn at TP 2 (none, cpu,
# tiered, disk). Writes $OUT/tp2_current.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/tp2_current/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/tp2_current; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 100 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp2.txt 2>&1; tail -2 $out/demo_8b_tp2.txt
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
timeout 200 launch/mpirun.sh -n 2 kvdist $args --connectors cpu,tiered,disk --out $out/multiturn_8b_tp2.json > $out/multiturn_8b_tp2.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn_8b_tp2.log | awk -F'|' '{print $2,$3,$8,$9,$10}'
cd $OUT && tar czf tp2_current.tgz tp2_current && rm -rf tp2_current
