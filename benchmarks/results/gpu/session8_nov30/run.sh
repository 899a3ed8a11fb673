#!/usr/bin/env bash
# 2026-11-30, eighth session, the final tree on a lent 2x H200 host (Open MPI): the GPU
# tier, the 8B demo at TP 2 under mpirun and torchrun, launch/mpirun.sh with options in
# KVDIST_MPIEXEC under Open MPI, the launcher and communicator tests and the engine's
# multi-rank tests under Open MPI, and the coordination benchmark at 2 ranks. Writes
# $OUT/check-PART.tgz. Two parts, one device call each (a call may last 10 minutes):
#   OUT=/absolute/dir PART=a bash benchmarks/results/gpu/session8_nov30/run.sh   (GPU tier, demos, bench)
#   OUT=/absolute/dir PART=b bash benchmarks/results/gpu/session8_nov30/run.sh   (tests under Open MPI)
#   OUT=/absolute/dir PART=c bash benchmarks/results/gpu/session8_nov30/run.sh   (the bench alone, again)
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/check-$PART; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; mpiexec --version | head -1; } > $out/machine.txt
[ "$PART" = a ] && { timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log; }
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
[ "$PART" = a ] && { timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 2 $out/demo_8b_tp2_mpirun.txt; }
[ "$PART" = a ] && { timeout 120 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -n 2 $out/demo_8b_tp2_torchrun.txt; }
[ "$PART" = a ] && { KVDIST_MPIEXEC="mpiexec --tag-output" timeout 60 launch/mpirun.sh -n 2 kvdist env > $out/kvdist_mpiexec_words.txt 2>&1; cat $out/kvdist_mpiexec_words.txt; }
[ "$PART" = b ] && {
  pt="python3 -m pytest -q -rfE -p no:cacheprovider"
  timeout 280 $pt tests/test_launchers.py > $out/launcher_tests.log 2>&1 &
  timeout 280 $pt tests/test_comm.py > $out/comm_tests.log 2>&1 &
  timeout 280 $pt tests/test_engine_mp.py > $out/engine_mp_tests.log 2>&1 &
  wait; for f in launcher comm engine_mp; do echo "$f: $(tail -1 $out/${f}_tests.log)"; done; }
case $PART in a|c) LAUNCHERS=mpirun RANKS=2 SIZES=1,16,256 STEPS=400 MIN_STEPS=50 BUDGET_S=8 PYTHON=python3 OUT_DIR=$out timeout 120 bash benchmarks/run_coordination.sh > $out/coordination.log 2>&1
  grep -E "\| (1|16|256) \|" $out/coordination.md ;; esac
cd $OUT && tar czf check-$PART.tgz check-$PART && rm -rf check-$PART
