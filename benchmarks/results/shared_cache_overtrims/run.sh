#!/usr/bin/env bash
# A/B of the shared-cache benchmark: /work/main HEAD (archived to /tmp/ab_old) against
# /tmp/ledger_fix, alternated, each tree run from inside itself.
set -u
OUT=/tmp/ledger_fix/out/ab
export PYTHONUNBUFFERED=1
bench() {  # tree, name, rescan_s, affinity, prefixes
  (cd $1 && PYTHONPATH=$1 timeout 400 python3 -c "import sys; from kvdist.bench.cli import run_benchmark; sys.exit(run_benchmark('shared-cache', sys.argv[1:]))" \
    --duration-s 30 --engines 1,1,2 --capacity 8M --prefixes $5 --rescan-s $3 --affinity $4 --out $OUT/$2.json > $OUT/$2.log 2>&1)
  grep -E "^directory|^served" $OUT/$2.log | sed "s/^/$2: /"
}
for round in 1 2; do
  bench /tmp/ab_old old_a0_r$round 60 0 32; bench /tmp/ledger_fix new_a0_r$round 60 0 32
  bench /tmp/ab_old old_a1_r$round 60 1 96; bench /tmp/ledger_fix new_a1_r$round 60 1 96
done
