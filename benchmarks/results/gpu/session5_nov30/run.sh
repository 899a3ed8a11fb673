#!/usr/bin/env bash
# 2026-11-30, fifth session, on a lent 1x H200 host: the session's check on its code
# (benchmarks/gpu_check.sh: the GPU tier, 8B multi-turn with every connector and the disk
# tier's report counters, the coordination benchmark at 256 in flight). Writes
# $OUT/check.tgz. From the repository root:
#   OUT=/absolute/dir bash benchmarks/results/gpu/session5_nov30/run.sh
set -u
OUT=$OUT bash benchmarks/gpu_check.sh check
