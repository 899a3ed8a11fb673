#!/usr/bin/env bash
# The GPU tier and the GPU benchmarks in one run on a lent 2-GPU machine:
#   bash benchmarks/gpu_suite.sh OUTDIR
# Writes gpu_tests.log, transfer.json, disk.json, demo_8b_tp2.txt, engine_8b_tp2.json.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } > "$out/machine.txt" 2>&1
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -40 > "$out/gpu_tests.log"
timeout 120 python3 benchmarks/transfer.py --device cuda --out "$out/transfer.json" > /dev/null 2>"$out/transfer.err"
timeout 90 python3 benchmarks/disk.py --device cuda --dir "$(mkdir -p /tmp/kvdist-diskbench && echo /tmp/kvdist-diskbench)" --out "$out/disk.json" > /dev/null 2>"$out/disk.err"
timeout 150 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 \
  --prefix-len 1008 --suffix-len 16 --max-tokens 16 --cache-dir /tmp/kvdist-demo8b > "$out/demo_8b_tp2.txt" 2>&1
timeout 120 launch/mpirun.sh -n 2 kvdist bench engine --device cuda --model llama3-8b --requests 64 \
  --prompt-len 256 --max-tokens 32 --out "$out/engine_8b_tp2.json" > "$out/engine_8b_tp2.log" 2>&1
# The coordination benchmark on this host's idle cores (no oversubscription).
PYTHON=python3 OUT_DIR="$out" LAUNCHERS="mpirun torchrun" SIZES=1,64,256,1024 STEPS=100 BUDGET_S=15 \
  timeout 150 bash benchmarks/run_coordination.sh > "$out/coordination.log" 2>&1
ls -la "$out"
