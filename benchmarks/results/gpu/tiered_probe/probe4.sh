#!/usr/bin/env bash
# Fourth probe (1x H200, TP 1): tiered with the disk tier's device copy waited for on the
# engine's thread in wait_for_save (KVDIST_PROBE_SYNC_SAVE=1) against as committed, two
# rounds each, traced as in probe3.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVDIST_PROBE_TRACE=1
out=$OUT/s; mkdir -p $out
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
for r in 1 2; do
  KVDIST_PROBE_SYNC_SAVE=1 timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/sync_$r.json > $out/sync_$r.log 2>&1
  timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/async_$r.json > $out/async_$r.log 2>&1
  grep -E "^\| 0 \| tiered" $out/sync_$r.log $out/async_$r.log | cut -c1-60,160-
done
cd $OUT && tar czf s.tgz s && rm -rf s
