"""The `kvdist` command as a user runs it: the demo through both launchers, generate."""

from __future__ import annotations

import json
import sys

import pytest
from mp.jobs import REPO, job_env, run_job

SMALL = ["--prompts", "4", "--prefix-len", "96", "--suffix-len", "8", "--max-tokens", "4"]


def test_demo_single_process() -> None:
    """Run 2 loads what run 1 saved, and the outputs are identical (the demo checks)."""
    job = run_job(
        [sys.executable, "-m", "kvdist.cli.main", "demo", *SMALL, "--json"], job_env(), 300
    )
    assert job.returncode == 0, job.output[-4000:]
    result = job.gathered()
    assert result["identical"] is True
    cold, warm = result["rows"]
    assert cold["prompt_tokens_loaded"] == 0 and cold["bytes_saved"] > 0
    assert warm["prompt_tokens_loaded"] > 0 and warm["bytes_loaded"] > 0


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["mpirun.sh", "torchrun.sh"])
def test_demo_under_the_launchers(launcher: str) -> None:
    """`launch/<launcher> -n 2 kvdist demo` as the README shows it."""
    cmd = [str(REPO / "launch" / launcher), "-n", "2", "kvdist", "demo", *SMALL]
    job = run_job(cmd, job_env(), 300)
    assert job.returncode == 0, job.output[-4000:]
    assert "kvdist demo: 2 rank(s)" in job.output
    assert "outputs identical: True" in job.output


def test_generate_reports_bad_prompts_and_exits_nonzero(tmp_path) -> None:
    """Good prompts are served, a bad one is an error line, and the exit code says so."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[1, 2, 3], [], "hello"]))
    cmd = [
        "python",
        "-m",
        "kvdist.cli.main",
        "generate",
        "--prompts-file",
        str(prompts),
        "--max-tokens",
        "3",
        "--json",
    ]
    job = run_job(cmd, job_env(), 300)
    assert job.returncode == 1, job.output[-4000:]
    outs = [json.loads(line) for line in job.output.splitlines() if line.startswith('{"')]
    assert [o["finish_reason"] for o in outs] == ["length", "error", "length"]
    assert "empty prompt" in outs[1]["error"]
