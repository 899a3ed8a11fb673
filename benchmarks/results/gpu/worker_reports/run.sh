#!/usr/bin/env bash
# After workers report their saves to rank 0 (wire v6), 1x H200, TP 1: the GPU tier; 8B
# multi-turn with none, cpu, tiered and disk, two rounds, with the disk tier's report
# counters; the coordination benchmark at 256 in flight under mpirun (2 and 4 ranks).
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/worker_reports/run.sh
# (the steps are benchmarks/gpu_check.sh's)
exec bash benchmarks/gpu_check.sh worker_reports
