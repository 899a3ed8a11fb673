#!/usr/bin/env bash
# Loads through four fixed buffers (this session) against the code before (b763883,
# unpacked by `git archive b763883 kvdist` into .old_code/), 1x H200, TP 1: the GPU tier;
# 8B multi-turn with none, cpu, tiered and disk (new code), then none, tiered and disk
# (old code), two rounds each, in one session.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/load_buffers/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out=$OUT/lb; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --repeats 2"
show() { grep -E "^\| [0-9] \| [a-z]" $out/$1.log | awk -F'|' -v n=$1 '{print n, $2,$3,$8,$9}'; python3 -c "
import json; d=json.load(open('$out/$1.json'))
print('$1 staging allocations', [(r['connector'], r['engine_stats'].get('connector_staging_allocations')) for r in d['runs']])"; }
PYTHONPATH=$PWD timeout 200 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered,disk --out $out/new.json > $out/new.log 2>&1; show new
PYTHONPATH=$PWD/.old_code timeout 160 launch/mpirun.sh -n 1 kvdist $args --connectors tiered,disk --out $out/old.json > $out/old.log 2>&1; show old
cd $OUT && tar czf lb.tgz lb && rm -rf lb
