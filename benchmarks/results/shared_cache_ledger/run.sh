#!/usr/bin/env bash
# 2026-11-30, fourth session: `kvdist bench shared-cache` (engines of 1, 1 and 2 ranks on
# one disk cache directory, 8 MiB, 30 s each) for the code before the ledgers (ab_old:
# `git archive 1cb0df8 kvdist launch`; the benchmark itself is unchanged since) and the
# current code, alternated: at the default rescan_s (60 s: no re-read within a run) with
# prompts drawn from the whole pool and with 90 % from each engine's own prefixes (more
# blocks that only one engine writes), and at 5 s with 90 %; then (RUNS="60,1") with
# every prompt from the engine's own prefixes, of 96 (PREFIXES=96). From the repository root:
#   OUT=/absolute/dir bash benchmarks/results/shared_cache_ledger/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
mkdir -p $OUT
made=
if [ ! -d ab_old ]; then  # (a device run carries it: its checkout's history may lack 1cb0df8)
  mkdir ab_old && git archive 1cb0df8 kvdist launch | tar -x -C ab_old && made=1
fi
{ date -u; nproc; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%H 2>/dev/null; } > $OUT/machine.txt
bench() {  # tree, name, rescan_s, affinity
  # From inside the tree: `python -c` and `-m` put the working directory first on the
  # path, so a run from the repository root imports its kvdist whatever PYTHONPATH says.
  (cd $1 && PYTHONPATH=$1 timeout 400 python3 -c "import sys; from kvdist.bench.cli import run_benchmark; sys.exit(run_benchmark('shared-cache', sys.argv[1:]))" \
    ${DEVICE:+--device $DEVICE} --duration-s 30 --engines ${ENGINES:-1,1,2} --capacity 8M --prefixes ${PREFIXES:-32} --rescan-s $3 --affinity $4 --out $OUT/$2.json > $OUT/$2.log 2>&1)
  grep -E "^directory|^served|^unreachable" $OUT/$2.log | sed "s/^/$2: /"
}
for ra in ${RUNS:-60,0 60,0.9 5,0.9}; do
  r=${ra%,*} a=${ra#*,}
  bench $PWD/ab_old old_r${r}_a$a $r $a; bench $PWD new_r${r}_a$a $r $a
done
[ -n "$made" ] && rm -rf ab_old
