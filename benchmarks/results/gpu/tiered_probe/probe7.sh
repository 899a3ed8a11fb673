#!/usr/bin/env bash
# Seventh probe (1x H200, TP 1): the writer process paced to 1 and 2 GB/s
# (KVDIST_PROBE_PACE_GBPS: each task starts when the bytes before it have had their time)
# against unpaced, traced.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVDIST_PROBE_TRACE=1
out=$OUT/v; mkdir -p $out
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
KVDIST_PROBE_PACE_GBPS=1 timeout 100 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered --out $out/pace1.json > $out/pace1.log 2>&1
KVDIST_PROBE_PACE_GBPS=2 timeout 80 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/pace2.json > $out/pace2.log 2>&1
grep -E "^\| 0 \| (tiered|cpu)" $out/pace1.log $out/pace2.log | cut -c1-60,160-
cd $OUT && tar czf v.tgz v && rm -rf v
