#!/usr/bin/env bash
# The last code of the session of the loader, launch, command-line, API and benchmark
# audits (2026-11-29), 1x H200, TP 1: benchmarks/gpu_check.sh with the float32 multi-turn
# run (every answer must equal the run without connector), after the coordination step
# began timing kvdist's metadata packing.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/meta_timed/run.sh
FP32=1 exec bash benchmarks/gpu_check.sh meta_timed
