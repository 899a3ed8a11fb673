#!/usr/bin/env bash
# The session of the loader, launch, command-line and API audits (2026-11-29), 1x H200,
# TP 1: the GPU tier, 8B multi-turn (none, cpu, tiered, disk; two rounds) and the
# coordination benchmark at 256 in flight under mpirun, on that session's code.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/launch_audits/run.sh
exec bash benchmarks/gpu_check.sh launch_audits
