"""Start multi-rank jobs from tests: the launchers' command lines, a clean environment, a
hard timeout that kills the whole job, and the JSON line that rank 0 prints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMM_WORKER = REPO / "tests" / "mp" / "comm_worker.py"
JOB_TIMEOUT_S = 120

# Launch variables of whatever started pytest must not leak into the job. Only these:
# other OMPI_* variables configure Open MPI itself (GPU hosts set OMPI_MCA_* so that
# mpiexec runs without ssh, and OMPI_ALLOW_RUN_AS_ROOT*).
_LAUNCH_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "MPI_LOCAL", "SLURM_", "TORCHELASTIC_", "KVDIST_")
_LAUNCH_NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass
class Job:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float

    def gathered(self) -> dict:
        """The JSON object rank 0 printed as its last JSON line."""
        for line in reversed(self.output.splitlines()):
            if line.startswith('{"'):
                return json.loads(line)
        raise AssertionError(f"no JSON line in the job's output:\n{self.output[-4000:]}")


def job_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_LAUNCH_PREFIXES) and k not in _LAUNCH_NAMES
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # ranks share two cores
    env.update(extra)
    return env


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`cmd` in a session of its own (so a timeout can kill mpiexec's proxies and ranks
    too), from the repository root, stdout and stderr together."""
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_job(cmd: list[str], env: dict[str, str], timeout_s: float = JOB_TIMEOUT_S) -> Job:
    """Run `cmd` in its own session; on timeout kill the whole session and fail the test."""
    start = time.monotonic()
    proc = _start(cmd, env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec's proxies and ranks too
        out, _ = proc.communicate()
        pytest.fail(f"job did not end within {timeout_s}s: {cmd}\n{out[-4000:]}")
    return Job(proc.returncode, out, time.monotonic() - start)


def run_jobs(jobs: list[tuple[list[str], dict[str, str]]], timeout_s: float) -> list[Job]:
    """Run several `(cmd, env)` at once (the nodes of one job), reading all their outputs
    together (one blocked on a full pipe would stall the others); on timeout kill them all
    and fail the test."""
    start = time.monotonic()
    procs = [_start(cmd, env) for cmd, env in jobs]
    outs = [""] * len(procs)

    def read(i: int) -> None:
        outs[i] = procs[i].communicate()[0]

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for t in readers:
        t.start()
    for t in readers:
        t.join(max(0.0, timeout_s - (time.monotonic() - start)))
    if any(t.is_alive() for t in readers):
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for t in readers:
            t.join(30)
        dump = "\n".join(f"--- {cmd}\n{out[-3000:]}" for (cmd, _), out in zip(jobs, outs))
        pytest.fail(f"jobs did not end within {timeout_s}s\n{dump}")
    seconds = time.monotonic() - start
    return [Job(p.returncode, out, seconds) for p, out in zip(procs, outs)]


def gone_pid() -> int:
    """The pid of a process that has exited (for what a killed process left behind)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    return int(done.stdout)


def free_port() -> int:
    """A TCP port free at the time of the call (for a rendezvous between jobs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@cache
def mpiexec_flavour() -> str | None:
    """ "openmpi", "mpich" or None when there is no mpiexec on PATH."""
    exe = shutil.which("mpiexec")
    if exe is None:
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    text = version.stdout + version.stderr
    return "openmpi" if "Open MPI" in text or "OpenRTE" in text else "mpich"


def mpiexec(n: int, *args: str) -> list[str]:
    """`python ARGS` on `n` ranks under mpiexec."""
    flavour = mpiexec_flavour()
    if flavour is None:
        pytest.skip("mpiexec is not on PATH (pip install mpich, or a system MPI)")
    extra = ["--oversubscribe"] if flavour == "openmpi" else []
    if flavour == "openmpi" and os.geteuid() == 0:
        extra.append("--allow-run-as-root")
    return ["mpiexec", *extra, "-n", str(n), sys.executable, *args]


def torchrun(n: int, *args: str) -> list[str]:
    """`python ARGS` on `n` ranks under torchrun (one node)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        *args,
    ]


def scenario_env(**extra: str) -> dict[str, str]:
    """job_env with tests/ on the path (scenario modules and the memory connector)."""
    env = job_env(KVDIST_TIMEOUT_S="120", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    return env


def launch(n: int, *args: str, launcher: str = "mpiexec") -> list[str]:
    """`python ARGS` on `n` ranks: mpiexec or torchrun, or a plain process when n == 1."""
    if n == 1:
        return [sys.executable, *args]
    return mpiexec(n, *args) if launcher == "mpiexec" else torchrun(n, *args)


def worker(scenario: str) -> list[str]:
    return [str(COMM_WORKER), scenario]
