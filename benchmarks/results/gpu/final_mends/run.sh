#!/usr/bin/env bash
# This session's final code, after the review's mends (2026-11-29), 1x H200, TP 1:
# benchmarks/gpu_check.sh (the GPU tier, 8B multi-turn, coordination at 256 in flight).
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/final_mends/run.sh
exec bash benchmarks/gpu_check.sh final_mends
