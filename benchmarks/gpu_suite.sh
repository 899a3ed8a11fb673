#!/usr/bin/env bash
# The GPU tier and the GPU benchmarks in one run on a lent 2-GPU machine (fits the
# 10-minute limit of one device call; the most important parts first):
#   bash benchmarks/gpu_suite.sh OUTDIR
# Writes machine.txt, gpu_tests.log, transfer.json, coordination*.{json,md},
# demo_8b_tp2.txt, engine_8b_tp2_{graphs,eager}_{1,2}.json,
# profile_{none,cpu,none_eager}/profile.{txt,json}, multiturn_8b_tp2.json
# (and .log / .err files). SKIP (space-separated: tests transfer coordination demo engine
# profile multiturn disk) leaves parts out.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
skip=" ${SKIP:-disk} "
want() { [[ "$skip" != *" $1 "* ]]; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; nproc; } > "$out/machine.txt" 2>&1
if want tests; then
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -40 > "$out/gpu_tests.log"
fi
if want transfer; then
  timeout 120 python3 benchmarks/transfer.py --device cuda --out "$out/transfer.json" > /dev/null 2>"$out/transfer.err"
fi
if want coordination; then
  # On this host's idle cores (no oversubscription).
  PYTHON=python3 OUT_DIR="$out" LAUNCHERS="mpirun torchrun" SIZES=1,16,64,256,1024 STEPS=200 \
    MIN_STEPS=50 BUDGET_S=4 timeout 200 bash benchmarks/run_coordination.sh > "$out/coordination.log" 2>&1
fi
if want demo; then
  timeout 150 launch/mpirun.sh -n 2 kvdist demo --device cuda --model llama3-8b --prompts 8 \
    --prefix-len 1008 --suffix-len 16 --max-tokens 16 --cache-dir /tmp/kvdist-demo8b > "$out/demo_8b_tp2.txt" 2>&1
fi
if want engine; then
  # Decode steps from CUDA graphs vs eager, alternated (the host's speed drifts).
  for i in 1 2; do
    for mode in graphs eager; do
      flag=""; [ $mode = eager ] && flag="--eager"
      timeout 100 launch/mpirun.sh -n 2 kvdist bench engine --device cuda --model llama3-8b \
        --requests 64 --prompt-len 256 --max-tokens 32 $flag \
        --out "$out/engine_8b_tp2_${mode}_$i.json" > "$out/engine_8b_tp2_${mode}_$i.log" 2>&1
    done
  done
fi
if want profile; then
  # Where a step's host and device time go (8B, one GPU): operators, launches per step.
  for c in none cpu none_eager; do
    flags=""; [ $c = cpu ] && flags="--connector cpu"; [ $c = none_eager ] && flags="--eager"
    timeout 90 python3 benchmarks/profile_step.py --device cuda --model llama3-8b --requests 16 \
      --prompt-len 512 --max-tokens 16 $flags --out "$out/profile_$c" > "$out/profile_$c.log" 2>&1
  done
fi
if want multiturn; then
  # 32 conversations of 4 turns on a device cache for about 8: later turns find their
  # history evicted (recomputed without connector, loaded with one).
  # Two rounds: one round each varied by 20-30 % on a shared host.
  timeout 560 launch/mpirun.sh -n 2 kvdist bench multiturn --device cuda --model llama3-8b \
    --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 \
    --concurrency 8 --connectors cpu,disk,tiered --cpu-capacity-bytes 5000000000 --repeats 2 \
    --out "$out/multiturn_8b_tp2.json" > "$out/multiturn_8b_tp2.log" 2>&1
  # float32, smaller: answers must equal the run without connector (bf16 greedy answers of
  # random weights flip with the batch composition, which loads change).
  timeout 300 launch/mpirun.sh -n 2 kvdist bench multiturn --device cuda --model llama3-8b \
    --dtype float32 --conversations 16 --turns 3 --system-len 256 --user-len 128 \
    --answer-len 16 --concurrency 4 --connectors cpu,disk,tiered --cpu-capacity-bytes 3000000000 \
    --out "$out/multiturn_8b_tp2_fp32.json" > "$out/multiturn_8b_tp2_fp32.log" 2>&1
fi
if want disk; then
  timeout 90 python3 benchmarks/disk.py --device cuda --dir "$(mkdir -p /tmp/kvdist-diskbench && echo /tmp/kvdist-diskbench)" --out "$out/disk.json" > /dev/null 2>"$out/disk.err"
fi
ls -la "$out"
