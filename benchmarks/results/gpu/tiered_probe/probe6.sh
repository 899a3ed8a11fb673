#!/usr/bin/env bash
# Sixth probe (1x H200, TP 1): what in the child's writing slows the engine: checksums only
# (KVDIST_PROBE_NO_WRITE=crc: no file written), records written to tmpfs (TMPDIR=/dev/shm:
# page copies without a block device), and as committed (ext4 on virtio), traced.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVDIST_PROBE_TRACE=1
out=$OUT/u; mkdir -p $out
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
{ cat /proc/sys/vm/dirty_ratio /proc/sys/vm/dirty_background_ratio; lscpu | grep -E "Thread|Core|Socket|Model name|L3"; } > $out/machine.txt 2>&1
KVDIST_PROBE_NO_WRITE=crc timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/crc.json > $out/crc.log 2>&1
TMPDIR=/dev/shm timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/tmpfs.json > $out/tmpfs.log 2>&1
timeout 120 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/ext4.json > $out/ext4.log 2>&1
grep -E "^\| 0 \| tiered" $out/crc.log $out/tmpfs.log $out/ext4.log | cut -c1-60,160-
cd $OUT && tar czf u.tgz u && rm -rf u
