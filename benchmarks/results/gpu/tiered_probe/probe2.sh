#!/usr/bin/env bash
# Second probe (1x H200, TP 1): per-step traces (KVDIST_PROBE_TRACE: graph?, rows, step,
# model, hooks, device wait in µs) for cpu, cc (tiered [cpu, cpu]), tiered [cpu, disk] with
# the writer process, with threads, and with 1 IO thread, each in its own invocation.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD KVDIST_PROBE_TRACE=1
out=$OUT/q; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; free -g | head -2; df -h /tmp | tail -1; } > $out/machine.txt
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000"
run() { tag=$1; shift; timeout 150 launch/mpirun.sh -n 1 kvdist $args "$@" --out $out/$tag.json > $out/$tag.log 2>&1; grep -E "^\| 0 \| [a-z]" $out/$tag.log | grep -v none | cut -c1-60,150-; }
run cpu_cc --connectors cpu,cc
run tiered_process --connectors tiered
run tiered_threads --connectors tiered --disk-kwargs '{"writer_process": false}'
run tiered_io1 --connectors tiered --disk-kwargs '{"io_threads": 1}'
run tiered_process_2 --connectors tiered
cd $OUT && tar czf q.tgz q && rm -rf q
