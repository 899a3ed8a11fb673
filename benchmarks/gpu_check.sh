#!/usr/bin/env bash
# A session's check on a lent 1-GPU host (TP 1, ~4 minutes): the GPU tier; 8B multi-turn
# with none, cpu, tiered and disk, two rounds, with the disk tier's report counters; the
# coordination benchmark at 256 in flight under mpirun (2 and 4 ranks); with FP32=1, also
# multi-turn in float32, where every answer must equal the run without connector. Writes
# $OUT/NAME.tgz (one file: a device call brings back few). From the repository root:
#   OUT=dir bash benchmarks/gpu_check.sh NAME
set -u
name=${1:?usage: OUT=dir bash benchmarks/gpu_check.sh NAME}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/$name; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; python3 -m pytest --collect-only -q tests 2>/dev/null | tail -1; } > $out/machine.txt
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --repeats 2"
timeout 230 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered,disk --out $out/multiturn.json > $out/multiturn.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn.log | awk -F'|' '{print $2,$3,$8,$9,$10}'
python3 -c "
import json; d=json.load(open('$out/multiturn.json'))
keys=('connector_blocks_saved','connector_blocks_stored_all_ranks','connector_blocks_not_stored','connector_saves_skipped_all_ranks','connector_saves_skipped','control_bytes_sent')
for r in d['runs']:
    s=r['engine_stats']; print(r['connector'], {k.replace('connector_',''): s.get(k) for k in keys})"
LAUNCHERS=mpirun SIZES=256 STEPS=400 MIN_STEPS=50 BUDGET_S=8 PYTHON=python3 OUT_DIR=$out timeout 150 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
grep -E "\| 256 \|" $out/coordination.md
if [ -n "${FP32:-}" ]; then  # every answer must equal the run without connector in float32
  fp32="bench multiturn --device cuda --model llama3-8b --dtype float32 --conversations 16 --turns 3 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8"
  timeout 200 launch/mpirun.sh -n 1 kvdist $fp32 --connectors cpu,tiered,disk --out $out/multiturn_fp32.json > $out/multiturn_fp32.log 2>&1
  grep -E "^\| [0-9] \| [a-z]" $out/multiturn_fp32.log | awk -F'|' '{print $2,$3,$8,$9,$10}'
  python3 -c "
import json, sys; runs = json.load(open('$out/multiturn_fp32.json'))['runs']
bad = [r['connector'] for r in runs if r['answers_identical'] != runs[0]['answers_identical']]
print('float32 answers: ' + ('FAILED, differ for ' + ', '.join(bad) if bad else 'all equal'))"
fi
cd $OUT && tar czf $name.tgz $name && rm -rf $name
