#!/usr/bin/env bash
# 2026-11-30, on a 2x H200 host: the coordination matrix after RequestBatch.add_rows (the
# step's rows added field by field), and 8B multi-turn at TP 1 in bf16 (none, cpu,
# tiered, disk) twice: as before, and with --drop-page-cache (the disk cache's pages
# written back and dropped before each later turn, so disk loads read the device).
# Writes $OUT/cold_disk_loads.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/cold_disk_loads/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/cold_disk_loads; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%h 2>/dev/null; df -h /tmp | tail -1; } > $out/machine.txt
PYTHON=python3 OUT_DIR=$out LAUNCHERS="mpirun torchrun" SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 BUDGET_S=3 timeout 210 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| 256 \|" $out/coordination.md
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --connectors cpu,tiered,disk"
timeout 170 launch/mpirun.sh -n 1 kvdist $args --out $out/multiturn.json > $out/multiturn.log 2>&1
timeout 170 launch/mpirun.sh -n 1 kvdist $args --drop-page-cache --out $out/multiturn_dropped.json > $out/multiturn_dropped.log 2>&1
for f in multiturn multiturn_dropped; do echo $f; grep -E "^\| [0-9] \| [a-z]" $out/$f.log | awk -F'|' '{print $3,$5,$8,$9}'; done
cd $OUT && tar czf cold_disk_loads.tgz cold_disk_loads && rm -rf cold_disk_loads
