#!/usr/bin/env bash
# The whole coordination matrix on the lent 1x H200 host (mpirun and torchrun, 2 and 4
# ranks, 1 to 1024 in flight), after the step began timing kvdist's metadata packing.
# Run from the repository root: OUT=dir bash benchmarks/results/gpu/meta_timed/coordination_matrix.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
mkdir -p $OUT/matrix
PYTHON=python3 LAUNCHERS='mpirun torchrun' SIZES=1,16,64,256,1024 STEPS=200 MIN_STEPS=50 \
  BUDGET_S=4 OUT_DIR=$OUT/matrix timeout 560 bash benchmarks/run_coordination.sh > $OUT/matrix/run.log 2>&1
grep -E "\| 256 \||NOT met|: met" $OUT/matrix/coordination.md
cd $OUT && tar czf matrix.tgz matrix && rm -rf matrix
