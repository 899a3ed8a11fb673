"""The `kvdist` command as a user runs it: the demo through both launchers, generate."""

from __future__ import annotations

import json
import re
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


def test_generate_says_when_the_context_cuts_max_tokens(tmp_path) -> None:
    """A prompt 4 tokens short of the tiny model's 2048-token context with --max-tokens
    10: it stops after 4 tokens ("length"), and generate says why on stderr rather than
    serving fewer tokens than asked without a word. A prompt with room says nothing."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[7] * 2044, [1, 2, 3]]))
    job = _kvdist("generate", "--prompts-file", str(prompts), "--max-tokens", "10", "--json")
    assert job.returncode == 0, job.output[-4000:]
    outs = [json.loads(line) for line in job.output.splitlines() if line.startswith('{"')]
    assert [len(o["output_token_ids"]) for o in outs] == [4, 10]
    assert "0 stopped at the model's context of 2048 tokens, before --max-tokens 10" in (
        job.output
    ), job.output[-4000:]
    assert "1 stopped" not in job.output


def _kvdist(*args: str, timeout_s: int = 120):
    return run_job([sys.executable, "-m", "kvdist.cli.main", *args], job_env(), timeout_s)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--prompt", "hi", "--model", "nosuch"], "model 'nosuch' is neither"),
        (
            ["generate", "--prompt", "hi", "--connector-kwargs", '{"path": "x"}'],
            "without --connector",
        ),
        (["generate", "--prompt", "hi", "--device", "gpu"], "expected cpu, cuda or cuda:N"),
        (["generate", "--prompt", "hi", "--connector", "nosuch"], "nosuch"),
        (["demo", "--model", "nosuch"], "unknown preset 'nosuch'"),
        (["demo", "--prompts", "0"], "--prompts: must be at least 1"),
        (["bench", "engine", "--requests", "0"], "--requests: must be at least 1"),
        (["bench", "disk", "--quick", "--blocks", "0"], "--blocks: must be at least 1"),
        (["bench", "transfer", "--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_user_mistake_is_one_line_and_exit_code_2(args, message) -> None:
    """Bad arguments name what is wrong in one line, without a traceback, exit code 2."""
    job = _kvdist(*args)
    assert job.returncode == 2, job.output[-4000:]
    assert message in job.output, job.output[-4000:]
    assert "Traceback" not in job.output, job.output[-4000:]


def test_a_connector_of_your_own_from_the_current_directory(tmp_path) -> None:
    """`kvdist generate --connector module:Scheduler:Worker` imports the module from the
    current directory, as `python -m` would (the installed `kvdist` command has its own
    folder on sys.path, not the current one); a dotted name that is not registered is
    refused with the form to use."""
    import shlex
    import shutil

    kvdist = shutil.which("kvdist")
    assert kvdist, "the kvdist command is not installed"
    (tmp_path / "my_store.py").write_text(
        "from kvdist.connectors.cpu import CpuConnectorScheduler as S, CpuConnectorWorker as W\n"
    )
    args = [kvdist, "generate", "--prompt", "hello", "--max-tokens", "2", "--connector"]
    kwargs = ["--connector-kwargs", '{"capacity_bytes": 1000000}']
    script = f"cd {shlex.quote(str(tmp_path))} && exec " + shlex.join(
        [*args, "my_store:S:W", *kwargs]
    )
    job = run_job(["bash", "-c", script], job_env(), 120)
    assert job.returncode == 0, job.output[-4000:]
    job = _kvdist("generate", "--prompt", "hi", "--connector", "my_store.S")
    assert job.returncode == 2, job.output[-4000:]
    assert "module:SchedulerClass:WorkerClass" in job.output, job.output[-4000:]


def test_generate_help_names_every_preset() -> None:
    from kvdist.engine.model.presets import PRESETS

    job = _kvdist("generate", "--help")
    assert job.returncode == 0
    text = re.sub(r"-\s+", "-", job.output)  # argparse wraps lines at hyphens
    assert all(name in text for name in PRESETS), job.output


def test_generate_reads_a_prompts_file_as_lines_unless_it_is_json(tmp_path) -> None:
    """Chat-format lines that start with `[` are prompts, not broken JSON; a JSON list of
    numbers is refused with the form it should have."""
    lines = tmp_path / "chat.txt"
    lines.write_text("[INST] one [/INST]\n\n[INST] two [/INST]\n")
    job = _kvdist("generate", "--prompts-file", str(lines), "--max-tokens", "1", "--json")
    assert job.returncode == 0, job.output[-4000:]
    outs = [json.loads(line) for line in job.output.splitlines() if line.startswith('{"')]
    assert len(outs) == 2
    one = tmp_path / "one.txt"
    one.write_text("42\n")  # JSON, but not a list: a line of text
    job = _kvdist("generate", "--prompts-file", str(one), "--max-tokens", "1", "--json")
    assert job.returncode == 0, job.output[-4000:]
    flat = tmp_path / "flat.json"
    flat.write_text("[1, 2, 3]")
    job = _kvdist("generate", "--prompts-file", str(flat))
    assert job.returncode == 2 and "[[1, 2, 3]]" in job.output, job.output[-4000:]


@pytest.mark.multirank
def test_a_prompts_file_missing_on_one_rank_ends_every_rank(tmp_path) -> None:
    """Under mpirun, rank 1 cannot read its prompts file (on another node's disk, say):
    every rank ends at once, with the error, instead of rank 0 waiting for rank 1 to
    start (it used to wait forever, before any deadline applied)."""
    good = tmp_path / "p.txt"
    good.write_text("hello\n")
    script = (
        f'if [ "${{PMI_RANK:-${{OMPI_COMM_WORLD_RANK:-0}}}}" = 1 ]; then f={tmp_path}/nope; '
        f"else f={good}; fi; exec {sys.executable} -m kvdist.cli.main generate "
        "--prompts-file $f --max-tokens 1"
    )
    cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", "2", "bash", "-c", script]
    job = run_job(cmd, job_env(), 90)
    assert job.returncode != 0, job.output[-4000:]
    assert "nope" in job.output and "No such file" in job.output, job.output[-4000:]
    assert job.seconds < 60, "a rank waited for the one that failed"


@pytest.mark.multirank
def test_the_demo_removes_its_temporary_cache_when_it_fails(tmp_path) -> None:
    """A demo that fails on two ranks (an unknown model) aborts the job; its temporary
    cache directory (under TMPDIR) is gone all the same."""
    cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", "2", "kvdist", "demo", "--model", "nosuch"]
    job = run_job(cmd, job_env(TMPDIR=str(tmp_path)), 120)
    assert job.returncode != 0 and "unknown preset 'nosuch'" in job.output, job.output[-4000:]
    assert not list(tmp_path.glob("kvdist-demo-*"))


def test_a_timeout_is_no_user_mistake(capsys) -> None:
    """Only bad input is one line and exit code 2: a timeout (an OSError in Python) keeps
    its traceback and exit code 1, as a failure to look into."""
    from kvdist.cli.common import command_errors
    from kvdist.comm import LocalCommunicator

    with pytest.raises(SystemExit) as info, command_errors(LocalCommunicator(), "generate"):
        raise TimeoutError("shutdown: transfers did not finish")
    assert info.value.code == 1
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info, command_errors(LocalCommunicator(), "generate"):
        raise FileNotFoundError("no such prompts file")
    assert info.value.code == 2
    assert "kvdist generate: error: no such prompts file" in capsys.readouterr().err
