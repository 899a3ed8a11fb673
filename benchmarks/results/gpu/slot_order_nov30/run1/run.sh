#!/usr/bin/env bash
# 2026-11-30, fourth session, on a 1x H200 host: the GPU tier; `kvdist bench transfer` with
# the cpu connector's pool rows in runs of 1, 2, 3 and 4 slots (what a copy per run of slots
# reaches against one contiguous copy); 8B multi-turn in float32 with a cpu pool that turns
# over (host copies per block from the engine's stats, answers against the run without
# connector); the 8B demo. Writes $OUT/slot_order.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/slot_order_nov30/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/slot_order; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; mpiexec --version | head -1; } > $out/machine.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
for r in 1 2 3 4; do
  timeout 60 kvdist bench transfer --device cuda --heads 8,4,2,1 --no-naive --slot-run $r --out $out/transfer_run$r.json > $out/transfer_run$r.log 2>&1
done
python3 - $out <<'PY'
import json, sys
out = sys.argv[1]
print("| run | TP | copies | save device % | load device % | save wall % | load wall % |")
for r in (1, 2, 3, 4):
    for row in json.load(open(f"{out}/transfer_run{r}.json"))["results"]:
        print(f"| {r} | {row['tensor_parallel']} | {row['copy_calls_slots']} | {row['device_slots_save_pct_of_contiguous']} | "
              f"{row['device_slots_load_pct_of_contiguous']} | {row['slots_save_pct_of_contiguous']} | {row['slots_load_pct_of_contiguous']} |")
PY
args="bench multiturn --device cuda --model llama3-8b --dtype float32 --conversations 32 --turns 6 --system-len 512 --user-len 256 --answer-len 32 --concurrency 8 --cpu-capacity-bytes 4000000000 --connectors cpu"
timeout 200 launch/mpirun.sh -n 1 kvdist $args --out $out/multiturn.json > $out/multiturn.log 2>&1
grep -E "^\| [0-9] \| [a-z]" $out/multiturn.log | awk -F'|' '{print $3,$5,$7,$8,$9}'
python3 -c "
import json; d = json.load(open('$out/multiturn.json'))
s = [r for r in d['runs'] if r.get('connector') == 'cpu'][0]['engine_stats']
print({k: v for k, v in s.items() if k.startswith('connector_') and any(w in k for w in ('blocks', 'copies', 'evictions', 'hits'))})"
timeout 150 launch/mpirun.sh -n 1 kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16 > $out/demo_8b_tp1.txt 2>&1; tail -n 1 $out/demo_8b_tp1.txt
cd $OUT && tar czf slot_order.tgz slot_order && rm -rf slot_order
