#!/usr/bin/env bash
# Why does `tiered` (cpu, then disk) trail `cpu` alone? 8B multi-turn at TP N (default 1; the
# settings of gpu_suite.sh, the cpu pool twice as large at TP 1): (1) cpu, tiered of [cpu] and of [cpu, cpu] (a second device copy, no
# disk) and tiered [cpu, disk], alternated in one invocation; (2) cpu and tiered each under
# cProfile on every rank, with the garbage collector's pauses timed.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
n=${N:-1}; cap=$((10000000000 / n))
out=$OUT/p; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%H 2>/dev/null; } > $out/machine.txt
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes $cap"
timeout 200 launch/mpirun.sh -n $n kvdist $args --connectors cpu,t1,cc,tiered --out $out/variants.json > $out/variants.log 2>&1
tail -12 $out/variants.log
for c in cpu tiered; do
  PROF_DIR=$out PROF_TAG=$c timeout 150 launch/mpirun.sh -n $n python3 benchmarks/results/gpu/tiered_probe/prof_wrap.py $args --connectors $c --out $out/prof_$c.json > $out/prof_$c.log 2>&1
  tail -4 $out/prof_$c.log
done
cd $OUT && tar czf p.tgz p && rm -rf p
