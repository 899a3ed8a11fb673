#!/usr/bin/env bash
# The same code on one of those GPUs: 8B multi-turn at TP 1 in bf16 (none, cpu, tiered,
# disk; two rounds) and in float32 (every answer must equal the run without connector).
# Writes $OUT/stamps_multiturn.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/stamps_and_checks/multiturn.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD CUDA_VISIBLE_DEVICES=0
out=$OUT/stamps_multiturn; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
args="bench multiturn --device cuda --model llama3-8b --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 10000000000 --repeats 2"
timeout 250 launch/mpirun.sh -n 1 kvdist $args --connectors cpu,tiered,disk --out $out/multiturn.json > $out/multiturn.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn.log | awk -F'|' '{print $2,$3,$8,$9,$10}'
fp32="bench multiturn --device cuda --model llama3-8b --dtype float32 --conversations 16 --turns 3 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8"
timeout 220 launch/mpirun.sh -n 1 kvdist $fp32 --connectors cpu,tiered,disk --out $out/multiturn_fp32.json > $out/multiturn_fp32.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn_fp32.log | awk -F'|' '{print $2,$3,$8,$9,$10}'
python3 -c "
import json; runs = json.load(open('$out/multiturn_fp32.json'))['runs']
bad = [r['connector'] for r in runs if r['answers_identical'] != runs[0]['answers_identical']]
print('float32 answers: ' + ('FAILED, differ for ' + ', '.join(bad) if bad else 'all equal'))"
cd $OUT && tar czf stamps_multiturn.tgz stamps_multiturn && rm -rf stamps_multiturn
