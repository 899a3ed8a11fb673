#!/usr/bin/env bash
# The GPU tier on this session's later code, then probe_behind.py (with marks for the
# lookup, the loader's start and the staging buffer's creation), 1x H200.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/loads_in_child/probe2.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
out=$OUT/p2; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $out/machine.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
timeout 200 python3 benchmarks/results/gpu/loads_in_child/probe_behind.py /tmp > $out/probe_behind.jsonl 2> $out/probe_behind.err
python3 - $out/probe_behind.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(d["mode"], {k: v for k, v in d.items() if k.startswith("first_") and not k.startswith("first_child")})
PY
cd $OUT && tar czf p2.tgz p2 && rm -rf p2
