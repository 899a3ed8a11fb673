#!/usr/bin/env bash
# The session's final code (disk saves split out of the worker, MAP_POPULATE in the IO
# process, saves made at the next bind when wait_for_save was skipped), 1x H200, TP 1: the
# GPU tier; 8B multi-turn for none, cpu, tiered and disk in one run, two rounds; `kvdist
# bench disk` with the IO process for this code and for the code before MAP_POPULATE
# (ab444bd, from its own directory), and with threads; the coordination benchmark under
# launch/mpirun.sh, which no longer lets Open MPI bind each rank to one core.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/loads_in_child/run2.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/r2; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 200 launch/mpirun.sh -n 1 kvdist bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --connectors cpu,tiered,disk --repeats 2 --out $out/multiturn.json > $out/multiturn.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn.log | awk -F'|' '{print $2,$3,$8,$9}'
# old.tgz: `git archive ab444bd kvdist | gzip > benchmarks/results/gpu/loads_in_child/old.tgz` (not committed)
old=/tmp/kvdist-old; rm -rf $old; mkdir -p $old; tar xzf benchmarks/results/gpu/loads_in_child/old.tgz -C $old
for i in 1 2; do
  timeout 45 python3 -m kvdist.cli.main bench disk --device cuda --dir /tmp --blocks 256 --out $out/disk_process_$i.json > $out/disk_process_$i.log 2>&1
  (cd $old && PYTHONPATH=$old timeout 45 python3 -m kvdist.cli.main bench disk --device cuda --dir /tmp --blocks 256 --out $out/disk_process_old_$i.json > $out/disk_process_old_$i.log 2>&1)
  timeout 45 python3 -m kvdist.cli.main bench disk --device cuda --dir /tmp --blocks 256 --no-writer-process --out $out/disk_threads_$i.json > $out/disk_threads_$i.log 2>&1
done
for f in $out/disk_*.json; do python3 -c "import json,sys; d=json.load(open('$f')); print('$(basename $f)', d['connector_save_gbps'], d['connector_load_gbps'], d['load_behind_saves_s'])"; done
PYTHON=python3 OUT_DIR=$out LAUNCHERS=mpirun SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 BUDGET_S=4 timeout 150 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "256 \|" $out/coordination.md | head -4
cd $OUT && tar czf r2.tgz r2 && rm -rf r2
