#!/usr/bin/env bash
# 2026-11-30, fifth session, on the 2-core VM: `kvdist bench shared-cache` (engines of 1,
# 1 and 2 ranks on one disk directory, 8 MiB, rescan_s 60, 30 s each) for the code before
# the over-trim fixes (ab_old/: `mkdir ab_old && git archive 16bb301 kvdist launch | tar
# -x -C ab_old`) and this code, alternated, two rounds: engines sharing most blocks (32
# prefixes, affinity 0) and sharing none (96 prefixes, affinity 1). Each tree runs from
# inside itself (`python -c` puts the working directory first on the path). (The committed
# results were made with the same commands, the old tree in /tmp/ab_old and the new one a
# clone in /tmp/ledger_fix.) From the repository root:
#   OUT=/absolute/dir bash benchmarks/results/shared_cache_overtrims/run.sh
set -u
[ -d ab_old ] || { echo "run.sh: no ab_old/ (see the header)" >&2; exit 2; }
mkdir -p $OUT
export PYTHONUNBUFFERED=1
bench() {  # tree, name, rescan_s, affinity, prefixes
  (cd $1 && PYTHONPATH=$1 timeout 400 python3 -c "import sys; from kvdist.bench.cli import run_benchmark; sys.exit(run_benchmark('shared-cache', sys.argv[1:]))" \
    --duration-s 30 --engines 1,1,2 --capacity 8M --prefixes $5 --rescan-s $3 --affinity $4 --out $OUT/$2.json > $OUT/$2.log 2>&1)
  grep -E "^directory|^served" $OUT/$2.log | sed "s/^/$2: /"
}
for round in 1 2; do
  bench $PWD/ab_old old_a0_r$round 60 0 32; bench $PWD new_a0_r$round 60 0 32
  bench $PWD/ab_old old_a1_r$round 60 1 96; bench $PWD new_a1_r$round 60 1 96
done
