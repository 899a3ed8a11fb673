#!/usr/bin/env bash
# 2026-11-30, third session: `kvdist bench shared-cache` (engines of 1, 1 and 2 ranks on
# one disk cache directory, rescan_s 0.2, 30 s each) for the code before this session's
# disk changes (ab_old: `git archive c674574 kvdist launch`, plus this session's
# kvdist/bench/shared_cache*.py and cli.py) and the current code, alternated: 8 MiB
# with prompts drawn from the whole pool and with 90 % from each engine's own prefixes,
# twice; 2 MiB (one step's saves are a third of it) once. From the repository root:
#   OUT=dir bash benchmarks/results/shared_cache/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
mkdir -p $OUT
{ date -u; nproc; python3 -c 'import torch; print(torch.__version__)'; git log -1 --format=%H 2>/dev/null; } > $OUT/machine.txt
bench() {  # tree, name, capacity, affinity
  PYTHONPATH=$1 timeout 300 python3 -c "import sys; from kvdist.bench.cli import run_benchmark; sys.exit(run_benchmark('shared-cache', sys.argv[1:]))" \
    ${DEVICE:+--device $DEVICE} --duration-s 30 --engines 1,1,2 --capacity $3 --prefixes 32 --rescan-s 0.2 --affinity $4 --out $OUT/$2.json > $OUT/$2.log 2>&1
  grep -E "^directory|^served" $OUT/$2.log | sed "s/^/$2: /"
}
for i in 1 2; do
  for a in 0 0.9; do bench $PWD/ab_old old_8M_a${a}_$i 8M $a; bench $PWD new_8M_a${a}_$i 8M $a; done
done
bench $PWD/ab_old old_2M_a0_1 2M 0; bench $PWD new_2M_a0_1 2M 0
