#!/usr/bin/env bash
# Third probe (1x H200, TP 1): eager steps traced with the device drained before the
# forward (backlog wait), the forward's host time, and its device tail (KVDIST_PROBE_TRACE
# in the runner), for cpu and tiered, two rounds.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVDIST_PROBE_TRACE=1
out=$OUT/r; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
timeout 250 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered --repeats 2 --out $out/alt.json > $out/alt.log 2>&1
grep -E "^\| 0 \| [a-z]" $out/alt.log | cut -c1-40,150-
cd $OUT && tar czf r.tgz r && rm -rf r
