#!/usr/bin/env bash
# On the code of 9c30f96 (reverted in f358394): transfers cut into staging parts of at most 64 MiB and 1 GiB of them reserved
# at registration, 1x H200, TP 1: the GPU tier; 8B multi-turn for none,
# cpu, tiered and disk, two rounds; then none, tiered and disk with staging_bytes 0
# (parts allocated on first use), two rounds.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/loads_in_child/run4.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/r4; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --repeats 2"
show() { grep -E "^\| [0-9] \| [a-z]" $out/$1.log | awk -F'|' -v n=$1 '{print n, $2,$3,$8,$9}'; python3 -c "
import json; d=json.load(open('$out/$1.json'))
print('$1 staging allocations', [(r['connector'], r['engine_stats'].get('connector_staging_allocations')) for r in d['runs']])"; }
timeout 190 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered,disk --out $out/reserved.json > $out/reserved.log 2>&1; show reserved
timeout 150 launch/mpirun.sh -n 1 kvdist $args --connectors tiered,disk --disk-kwargs '{"staging_bytes": 0}' --out $out/on_first_use.json > $out/on_first_use.log 2>&1; show on_first_use
cd $OUT && tar czf r4.tgz r4 && rm -rf r4
