#!/usr/bin/env bash
# Helpers off the rank's core, on 1x H200 (TP 1), one session: 8B multi-turn with the rank
# bound to one core as Open MPI binds it by default (--bind-to core), the disk tier's helpers
# moved off it (io_cpus "auto", the default) and left on it ("inherit", the code before);
# then with launch/mpirun.sh's own default (--bind-to none); then `kvdist bench disk`.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/h; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
summary() { grep -E "^\| 0 \| [a-z]" $out/$1.log | cut -c1-14,150- | sed "s/^/$1 /"; }
timeout 75 launch/mpirun.sh --bind-to core -n 1 kvdist $args --connectors cpu,tiered --out $out/bound_auto.json > $out/bound_auto.log 2>&1; summary bound_auto
timeout 60 launch/mpirun.sh --bind-to core -n 1 kvdist $args --connectors tiered --disk-kwargs '{"io_cpus": "inherit"}' --out $out/bound_inherit.json > $out/bound_inherit.log 2>&1; summary bound_inherit
timeout 60 launch/mpirun.sh -n 1 kvdist $args --connectors tiered --out $out/unbound.json > $out/unbound.log 2>&1; summary unbound
timeout 50 python3 -m kvdist.cli.main bench disk --device cuda --dir /tmp --blocks 128 --layers 16 --out $out/disk.json > $out/disk.log 2>&1; tail -c 300 $out/disk.log
cd $OUT && tar czf h.tgz h && rm -rf h
