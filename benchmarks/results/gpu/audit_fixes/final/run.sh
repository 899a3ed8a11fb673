#!/usr/bin/env bash
# The audit fixes' session, its last code (after the failure-handling and input-check
# fixes), 1x H200, TP 1: the same check as ../run.sh.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/audit_fixes/final/run.sh
# (the steps are benchmarks/gpu_check.sh's)
exec bash benchmarks/gpu_check.sh final
