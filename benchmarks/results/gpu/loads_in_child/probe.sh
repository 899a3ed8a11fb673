#!/usr/bin/env bash
# Where a load behind a save backlog spends its time (probe_behind.py), 1x H200.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/loads_in_child/probe.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/p; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $out/machine.txt
timeout 240 python3 benchmarks/results/gpu/loads_in_child/probe_behind.py /tmp > $out/probe_behind.jsonl 2> $out/probe_behind.err
python3 - $out/probe_behind.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    keys = ("first_sent_read_ms", "first__read_blocks_start_ms", "first_answer_read_ms", "last_answer_read_ms",
            "last__read_blocks_end_ms", "first__finish_start_ms", "first__finish_end_ms", "last_answer_write_ms",
            "last__write_blocks_end_ms", "last_copy_wait_end_ms", "first_load_end_ms", "child_read_task_s_sum")
    print(d["mode"], {k: d[k] for k in keys if k in d})
PY
cd $OUT && tar czf p.tgz p && rm -rf p
