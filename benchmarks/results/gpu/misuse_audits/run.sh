#!/usr/bin/env bash
# The code after this session's audits of connectors as authors write them, of the engine
# against transformers and of the cpu and tiered connectors (2026-11-29), 1x H200, TP 1:
# benchmarks/gpu_check.sh with the float32 multi-turn run (every answer must equal the
# run without connector).
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/misuse_audits/run.sh
FP32=1 exec bash benchmarks/gpu_check.sh misuse_audits
