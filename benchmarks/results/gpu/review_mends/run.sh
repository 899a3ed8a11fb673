#!/usr/bin/env bash
# A later session's code after its review mends (2026-11-29), 1x H200, TP 1, with FP32=1:
# benchmarks/gpu_check.sh (the GPU tier, 8B multi-turn in bf16 and float32, coordination
# at 256 in flight). Run from the repository root:
#   OUT=dir bash benchmarks/results/gpu/review_mends/run.sh
FP32=1 exec bash benchmarks/gpu_check.sh review_mends
