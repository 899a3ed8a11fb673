#!/usr/bin/env bash
# 2026-11-30, fourth session, on a lent 1x H200 host: the session's check
# (benchmarks/gpu_check.sh: the GPU tier, 8B multi-turn with every connector, the
# coordination benchmark at 256 in flight), then the shared-cache A/B of the disk ledgers
# on the GPU (benchmarks/results/shared_cache_ledger/run.sh with DEVICE=cuda): the code
# before them (ab_old/, carried: `git archive 1cb0df8 kvdist launch`) against the current
# code, at rescan_s 60 with every prompt from the engine's own prefixes (96 of them), and
# with prompts from the whole pool; engines of 1 rank each (three, on the one GPU). Writes $OUT/check.tgz and $OUT/ledger.tgz. From the
# repository root: OUT=/absolute/dir bash benchmarks/results/gpu/ledger_nov30/run.sh [check|ledger]
# (one part per device call: each fits in its 10 minutes).
set -u
part=${1:-all}
if [ $part != ledger ]; then OUT=$OUT bash benchmarks/gpu_check.sh check; fi
if [ $part != check ]; then
  mkdir -p $OUT/ledger
  export ENGINES=1,1,1  # one GPU: an engine of 2 ranks would put both on it (NCCL refuses)
  DEVICE=cuda RUNS="60,1" PREFIXES=96 OUT=$OUT/ledger bash benchmarks/results/shared_cache_ledger/run.sh
  DEVICE=cuda RUNS="60,0" OUT=$OUT/ledger bash benchmarks/results/shared_cache_ledger/run.sh
  cd $OUT && tar czf ledger.tgz ledger && rm -rf ledger
fi
