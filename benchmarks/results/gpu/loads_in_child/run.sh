#!/usr/bin/env bash
# After disk loads moved into the rank's IO process (d6cf53c) and helpers moved off the
# rank's CPUs (5f4cd07), on 1x H200 (TP 1), one session: the GPU tier on this code; 8B
# multi-turn for none, disk and tiered with the IO process reading (writer_process true,
# the default) and with the disk tier's threads reading and writing (false), alternated
# twice; `kvdist bench disk` with the IO process and with threads.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/loads_in_child/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/r; mkdir -p $out
{ date -u; git log -1 --format=%H 2>/dev/null; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -3 $out/gpu_tests.log
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
summary() { grep -E "^\| 0 \| [a-z]" $out/$1.log | cut -c1-14,150- | sed "s/^/$1 /"; }
for i in 1 2; do
  timeout 75 launch/mpirun.sh -n 1 kvdist $args --connectors disk,tiered --out $out/process_$i.json > $out/process_$i.log 2>&1; summary process_$i
  timeout 75 launch/mpirun.sh -n 1 kvdist $args --connectors disk,tiered --disk-kwargs '{"writer_process": false}' --out $out/threads_$i.json > $out/threads_$i.log 2>&1; summary threads_$i
done
timeout 45 python3 -m kvdist.cli.main bench disk --device cuda --dir /tmp --blocks 256 --out $out/disk_process.json > $out/disk_process.log 2>&1; tail -c 400 $out/disk_process.log
timeout 45 python3 -m kvdist.cli.main bench disk --device cuda --dir /tmp --blocks 256 --no-writer-process --out $out/disk_threads.json > $out/disk_threads.log 2>&1; tail -c 400 $out/disk_threads.log
cd $OUT && tar czf r.tgz r && rm -rf r
