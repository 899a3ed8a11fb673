#!/usr/bin/env bash
# Fifth probe (1x H200, TP 1): tiered with the writer process not writing (KVDIST_PROBE_NO_WRITE=1 in
# the child: every message and reply as usual, no records written) against as committed,
# two rounds each, traced as in probe3.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVDIST_PROBE_TRACE=1
out=$OUT/t; mkdir -p $out
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
for r in 1 2; do
  KVDIST_PROBE_NO_WRITE=1 timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/nowrite_$r.json > $out/nowrite_$r.log 2>&1
  timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/write_$r.json > $out/write_$r.log 2>&1
  grep -E "^\| 0 \| tiered" $out/nowrite_$r.log $out/write_$r.log | cut -c1-60,160-
done
cd $OUT && tar czf t.tgz t && rm -rf t
