#!/usr/bin/env bash
# Eighth probe: CPU binding and quota of ranks launched by launch/mpirun.sh (Open MPI).
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
p=benchmarks/results/gpu/tiered_probe/cpu_probe.py
echo "nproc $(nproc); cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null); cpuset $(cat /sys/fs/cgroup/cpuset.cpus.effective 2>/dev/null)"
python3 -c 'import os; print("plain python: affinity", sorted(os.sched_getaffinity(0)))'
for n in 1 2 4; do echo "== launch/mpirun.sh -n $n"; timeout 60 launch/mpirun.sh -n $n python3 $p; done
echo "== launch/mpirun.sh --bind-to none -n 1"; timeout 60 launch/mpirun.sh --bind-to none -n 1 python3 $p
cat /sys/fs/cgroup/cpu.stat 2>/dev/null | head -6
