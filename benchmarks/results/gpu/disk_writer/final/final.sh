#!/usr/bin/env bash
# Final code: the GPU tier, then tiered multi-turn with the disk tier's writer process and
# with its threads, alternated twice (same session, same host).
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/f; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
echo "# $(date -u); command: python3 -m pytest -q -m gpu -p no:cacheprovider tests" > $out/gpu_tests.log
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -40 >> $out/gpu_tests.log; tail -1 $out/gpu_tests.log
for r in 1 2; do
  for mode in process threads; do
    kw='{}'; [ $mode = threads ] && kw='{"writer_process": false}'
    timeout 150 launch/mpirun.sh -n 2 kvdist bench multiturn --device cuda --model llama3-8b \
      --conversations 32 --turns 4 --system-len 512 --user-len 256 --answer-len 32 \
      --concurrency 8 --connectors tiered --cpu-capacity-bytes 5000000000 --disk-kwargs "$kw" \
      --out $out/multiturn_${mode}_$r.json > $out/multiturn_${mode}_$r.log 2>&1
    python3 -c "
import json,sys
d=json.load(open(sys.argv[1])); rs={r['connector']: r for r in d['runs']}
t, n = rs['tiered'], rs['none']; e = t['engine_stats']
print(sys.argv[2], 'tiered %.2f s / none %.2f s = %.3fx; model %.2f over %.2f hook %.2f' % (t['wall_s'], n['wall_s'], t['wall_s'] / n['wall_s'], e['model_seconds'], e['overhead_seconds'], e['hook_seconds']))
" $out/multiturn_${mode}_$r.json ${mode}_$r
  done
done
cd $OUT && tar czf f.tgz f && rm -rf f
