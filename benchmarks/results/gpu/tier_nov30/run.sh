#!/usr/bin/env bash
# 2026-11-30, on 2 GPUs: the GPU tier (its 2-GPU tests too) after the disk connector's
# read_only / full-filesystem work and the engine's start check; the 8B demo at TP 2 in
# bf16 under mpirun; the transfer benchmark, now with the cpu connector's slot path.
# Writes $OUT/tier_nov30.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/tier_nov30/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/tier_nov30; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%h 2>/dev/null; } > $out/machine.txt
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
timeout 120 python3 -m kvdist.cli.main bench transfer --device cuda --out $out/transfer.json > $out/transfer.log 2>&1
python3 - $out/transfer.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(r["tensor_parallel"], *(f"{k}={r.get(k)}" for k in ("device_batched_save_pct_of_contiguous", "device_slots_save_pct_of_contiguous", "device_batched_load_pct_of_contiguous", "device_slots_load_pct_of_contiguous", "slots_save_pct_of_contiguous", "slots_load_pct_of_contiguous")))
PY
cd $OUT && tar czf tier_nov30.tgz tier_nov30 && rm -rf tier_nov30
