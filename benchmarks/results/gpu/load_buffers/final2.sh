#!/usr/bin/env bash
# After the save backlog bound (max_save_backlog_bytes), 1x H200, TP 1: the GPU tier, then
# 8B multi-turn with none, tiered and disk, two rounds; prints staging allocations and saves skipped.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/load_buffers/final2.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final2; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --repeats 2"
timeout 200 launch/mpirun.sh -n 1 kvdist $args --connectors tiered,disk --out $out/multiturn.json > $out/multiturn.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn.log | awk -F'|' '{print $2,$3,$8,$9}'
python3 -c "
import json; d=json.load(open('$out/multiturn.json'))
print('staging allocations', [(r['connector'], r['engine_stats'].get('connector_staging_allocations'), r['engine_stats'].get('connector_saves_skipped')) for r in d['runs']])"
cd $OUT && tar czf final2.tgz final2 && rm -rf final2
