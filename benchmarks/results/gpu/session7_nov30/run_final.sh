#!/usr/bin/env bash
# 2026-11-30, seventh session, the final tree on a lent 2x H200 host (Open MPI): the GPU
# tier, the 8B demo at TP 2 under mpirun and torchrun, `kvdist env` with a KVDIST_*
# setting through launch/mpirun.sh, and the launcher and communicator tests under Open
# MPI. Writes $OUT/final.tgz. From the repository root:
#   OUT=/absolute/dir bash benchmarks/results/gpu/session7_nov30/run_final.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=$OUT/final; mkdir -p $out
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'; mpiexec --version | head -1; } > $out/machine.txt
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests > $out/gpu_tests.log 2>&1; tail -1 $out/gpu_tests.log
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_8b_tp2_mpirun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_mpirun.txt
timeout 120 launch/torchrun.sh -n 2 $demo > $out/demo_8b_tp2_torchrun.txt 2>&1; tail -n 1 $out/demo_8b_tp2_torchrun.txt
KVDIST_TIMEOUT_S=77 timeout 60 launch/mpirun.sh -n 2 python3 -c 'import os; print("KVDIST_TIMEOUT_S", os.environ.get("KVDIST_TIMEOUT_S"))' > $out/env_forwarding.txt 2>&1; cat $out/env_forwarding.txt
timeout 60 launch/mpirun.sh -n 2 kvdist env > $out/kvdist_env.txt 2>&1; cat $out/kvdist_env.txt
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_launchers.py tests/test_comm.py > $out/launcher_comm_tests.log 2>&1; tail -3 $out/launcher_comm_tests.log
cd $OUT && tar czf final.tgz final && rm -rf final
