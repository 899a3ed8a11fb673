#!/usr/bin/env bash
# After the audit fixes of 2026-11-29 (load deadline, disk index, eviction order), 1x H200, TP 1: the GPU tier; 8B
# multi-turn with none, cpu, tiered and disk, two rounds, with the disk tier's report
# counters; the coordination benchmark at 256 in flight under mpirun (2 and 4 ranks).
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/audit_fixes/run.sh
# (the steps are benchmarks/gpu_check.sh's)
exec bash benchmarks/gpu_check.sh audit_fixes
