#!/usr/bin/env bash
# 2026-11-30, fifth session, on a lent 1x H200 host: `kvdist bench shared-cache` (three
# engines of 1 rank each on the one GPU, one disk directory, 8 MiB capacity, rescan_s 60,
# 30 s each) for the code before the over-trim fixes (ab_old/, carried: `mkdir ab_old &&
# git archive 16bb301 kvdist launch | tar -x -C ab_old`) and this code, alternated, ROUNDS
# rounds (default 2): engines sharing most blocks (32 prefixes, affinity 0) and sharing none
# (96 prefixes, affinity 1). Each tree runs from inside itself (`python -c` puts the
# working directory first on the path). Writes $OUT/overtrims.tgz. From the repository root:
#   OUT=/absolute/dir bash benchmarks/results/gpu/overtrims_nov30/run.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
[ -d ab_old ] || { echo "run.sh: no ab_old/ (see the header)" >&2; exit 2; }
out=$OUT/overtrims; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; } > $out/machine.txt
bench() {  # tree, name, prefixes, affinity
  (cd $1 && PYTHONPATH=$1 timeout 170 python3 -c "import sys; from kvdist.bench.cli import run_benchmark; sys.exit(run_benchmark('shared-cache', sys.argv[1:]))" \
    --device cuda --duration-s 30 --engines 1,1,1 --capacity 8M --prefixes $3 --rescan-s 60 --affinity $4 --out $out/$2.json > $out/$2.log 2>&1)
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], d['over_capacity'], 'served', d['served'], 'differing', d['answers_differing'], 'errors', d['errors'])" $out/$2.json $2 2>/dev/null || echo "$2: no result"
}
for round in $(seq ${ROUNDS:-2}); do
  bench $PWD/ab_old old_a0_r$round 32 0; bench $PWD new_a0_r$round 32 0
  bench $PWD/ab_old old_a1_r$round 96 1; bench $PWD new_a1_r$round 96 1
done
cd $OUT && tar czf overtrims.tgz overtrims && rm -rf overtrims
