#!/usr/bin/env bash
# This session's last code on a 2× H200 host, 2026-11-29: the coordination matrix
# ({mpirun, torchrun} x {2, 4 ranks} x 1..1024 in flight) now that both sides build their
# step inside the timed region, and 8B multi-turn at TP 1 in bf16 (none, cpu, tiered,
# disk; two rounds) after the engine polls in-flight transfers less often when idle.
# Writes $OUT/build_timed.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/build_timed/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/build_timed; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
PYTHON=python3 OUT_DIR=$out LAUNCHERS="mpirun torchrun" SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 BUDGET_S=4 timeout 240 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| 256 \|" $out/coordination.md
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --repeats 2"
timeout 240 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered,disk --out $out/multiturn.json > $out/multiturn.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn.log | awk -F'|' '{print $2,$3,$8,$9,$10}'
cd $OUT && tar czf build_timed.tgz build_timed && rm -rf build_timed
