#!/usr/bin/env bash
# Writer process (new) vs threads (new, --no-writer-process) vs old code: engine-thread
# slowdown during disk saves, and the tiered/disk multi-turn run; GPU tests of disk/tiered.
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out=$OUT/q; mkdir -p $out /tmp/kvd
{ date -u; nproc; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%H 2>/dev/null; } > $out/machine.txt
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests -k "disk or tiered or staging" 2>&1 | tail -40 > $out/gpu_tests_disk.log; tail -1 $out/gpu_tests_disk.log
new=$PWD; old=$PWD/.device_old
summ() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); s=d['engine_thread_slowdown']; print(sys.argv[1].split('/')[-1], 'save', s['during_save']['ratio'], 'load', s['during_load']['ratio'], 'GB/s', d['connector_save_gbps'], d['connector_load_gbps'], 'behind', d['load_behind_saves_s'])" $1; }
for r in 1 2; do
  for code in process threads old; do
    pp=$new; flag=""; [ $code = old ] && pp=$old; [ $code = threads ] && flag=--no-writer-process
    PYTHONPATH=$pp timeout 100 python3 benchmarks/disk.py --device cuda --io-threads 8 --heads 4 $flag --dir /tmp/kvd --out $out/disk_${code}_$r.json > $out/disk_${code}_$r.log 2>&1
    summ $out/disk_${code}_$r.json
  done
done
for code in process threads old; do
  dir=$new; kw='{}'; [ $code = old ] && dir=$old; [ $code = threads ] && kw='{"writer_process": false}'
  # From the code's own directory: `python -m` puts the working directory first on sys.path.
  (cd $dir && PYTHONPATH=$dir timeout 220 $new/launch/mpirun.sh -n 2 kvdist bench multiturn --device cuda --model llama3-8b \
    --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 \
    --concurrency 8 --connectors tiered,disk --cpu-capacity-bytes 5000000000 --disk-kwargs "$kw" \
    --out $out/multiturn_$code.json > $out/multiturn_$code.log 2>&1)
  grep -m3 -E "Traceback|Error" $out/multiturn_$code.log
  python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
for r in d['runs']:
    e=r['engine_stats']; print(sys.argv[2], r['connector'], 'wall %.2f model %.2f hook %.2f over %.2f ttft_later %.0f saved %s fails %s' % (r['wall_s'], e['model_seconds'], e['hook_seconds'], e['overhead_seconds'], r['ttft_ms_later_turns']['p50'], e.get('connector_blocks_saved'), e.get('connector_save_failures')))
" $out/multiturn_$code.json $code
done
cd $OUT && tar czf q.tgz q && rm -rf q
