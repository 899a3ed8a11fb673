"""The `kvdist` command as a user runs it: the demo through both launchers, generate."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys

import pytest
from mp.jobs import REPO, gone_pid, job_env, run_job

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
    # A read rate: bytes over the reads' time (not zero, not the bytes over a save's time).
    assert cold["load_GBps"] == 0 and warm["load_GBps"] > 0
    assert cold["run"] == "1: fresh engine, cold cache"


def test_the_demo_on_a_cache_dir_an_earlier_demo_filled(tmp_path) -> None:
    """`--cache-dir` of an earlier demo: run 1 loads too, and is not called cold."""
    cmd = [sys.executable, "-m", "kvdist.cli.main", "demo", *SMALL, "--cache-dir", str(tmp_path)]
    assert run_job(cmd, job_env(), 300).returncode == 0
    job = run_job([*cmd, "--json"], job_env(), 300)
    assert job.returncode == 0, job.output[-4000:]
    first, _ = job.gathered()["rows"]
    assert first["prompt_tokens_loaded"] > 0
    assert first["run"] == "1: fresh engine, cache of an earlier run"
    assert "with the cache (run 1 loaded from it too)" in job.output


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


def test_generate_no_prefix_caching_leaves_a_repeated_prompt_to_the_connector() -> None:
    """One prompt twice, with a cache too small to run both at once (8 blocks, the prompt
    and its tokens take 6): the second runs once the first is done, finds its prompt's
    blocks on the device (num_cached_tokens), and under --no-prefix-caching loads them
    from the cpu connector instead (num_external_tokens). A failure means the flag does
    not reach the engine, or generate no longer reports the loads of a repeated prompt."""
    prompt = "a prompt of ninety-four bytes: long enough to fill five blocks of sixteen tokens"
    prompt = prompt.ljust(94, ".")
    args = ["generate", "--connector", "cpu", "--num-blocks", "8", "--max-tokens", "2"]
    seen = {}
    for flags in ([], ["--no-prefix-caching"]):
        job = _kvdist(*args, "--prompt", prompt, "--prompt", prompt, "--json", *flags)
        assert job.returncode == 0, job.output[-4000:]
        outs = [json.loads(line) for line in job.output.splitlines() if line.startswith('{"')]
        assert [o["request_id"] for o in outs] == ["req-0", "req-1"], job.output[-4000:]
        first, second = outs
        assert first["num_cached_tokens"] == first["num_external_tokens"] == 0
        assert first["output_token_ids"] == second["output_token_ids"]
        seen[bool(flags)] = (second["num_cached_tokens"], second["num_external_tokens"])
    # Five whole blocks of the 94-token prompt: on the device, or loaded.
    assert seen == {False: (80, 0), True: (0, 80)}, seen


def test_generate_plain_output_shows_hits_loads_and_the_connectors_counters() -> None:
    """Without --json, the repeated prompt of the test above: each request's line says how
    many of its prompt tokens were a device hit and how many were loaded, and with a
    connector a last line sums the run's connector counters. A failure means a user
    trying a connector can no longer see its hits without --json."""
    prompt = "a prompt of ninety-four bytes: long enough to fill five blocks of sixteen tokens"
    prompt = prompt.ljust(94, ".")
    args = ["generate", "--num-blocks", "8", "--max-tokens", "2", "--prompt", prompt]
    job = _kvdist(*args, "--prompt", prompt)
    assert job.returncode == 0, job.output[-4000:]
    lines = [ln for ln in job.output.splitlines() if ln.startswith(("req-", "connector"))]
    assert len(lines) == 2, job.output[-4000:]
    assert lines[0].endswith(", 94 prompt tokens: 0 device hit, 0 loaded]"), lines
    assert lines[1].endswith(", 94 prompt tokens: 80 device hit, 0 loaded]"), lines
    assert "[length, ttft " in lines[1], lines
    job = _kvdist(*args, "--prompt", prompt, "--connector", "cpu", "--no-prefix-caching")
    assert job.returncode == 0, job.output[-4000:]
    lines = [ln for ln in job.output.splitlines() if ln.startswith(("req-", "connector"))]
    assert len(lines) == 3, job.output[-4000:]
    assert lines[1].endswith(", 94 prompt tokens: 0 device hit, 80 loaded]"), lines
    assert lines[2] == (
        "connector cpu: 80 tokens loaded, 0 blocks failed to load, 0 lookups failed; "
        "rank 0: 5 blocks hit, 5 missed, 5 loaded (0.16 MB), 5 saved (0.16 MB), "
        "0 evicted, 0 failed to save"
    ), lines


def test_the_connector_summary_of_a_connector_without_the_built_in_counters() -> None:
    """A connector of your own need not keep the built-ins' `stats`: its summary is the
    engine's counters alone, not a KeyError after every output was served."""
    from kvdist.cli.generate import _connector_summary

    stats = {"external_tokens": 32, "load_failures": 1, "lookup_failures": 0}
    assert _connector_summary("m:S:W", {**stats, "connector_hits": 2}) == (
        "connector m:S:W: 32 tokens loaded, 1 blocks failed to load, 0 lookups failed"
    )


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
        (["demo", "--model", "nosuch"], "model 'nosuch' is neither"),
        (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens: must be at least 1"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be 0"),
        (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", "--prompt", "hi", "--seed", "-5"], "--seed: must be at least 0"),
        (
            ["generate", "--prompt", "hi", "--connector", "json:JSONDecoder:JSONEncoder"],
            "json.JSONDecoder must be a subclass of kvdist.ConnectorScheduler",
        ),
        (["demo", "--prefix-len", "8", "--suffix-len", "0"], "must be more than --block-size"),
        (
            ["demo", "--prefix-len", "2040", "--suffix-len", "8"],
            "--prefix-len + --suffix-len (2048) must be less than the model's context (2048",
        ),
        (
            ["bench", "transfer", "--quick", "--out", "/nonexistent/x.json"],
            "--out /nonexistent/x.json: directory '/nonexistent' does not exist",
        ),
        (
            ["bench", "coordination", "--sizes", "1", "--out", "/nonexistent/x.json"],
            "--out /nonexistent/x.json: directory '/nonexistent' does not exist",
        ),
        (["demo", "--prompts", "0"], "--prompts: must be at least 1"),
        (["bench", "engine", "--requests", "0"], "--requests: must be at least 1"),
        (["bench", "coordination", "--budget-s", "-1"], "--budget-s must be a number of seconds"),
        (["bench", "disk", "--quick", "--blocks", "0"], "--blocks: must be at least 1"),
        (["bench", "transfer", "--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
        (["bench", "transfer", "--heads", "8,abc"], "argument --heads: expected an integer"),
        (["generate", "--prompt", "hi", "--device", "meta"], "device 'meta': expected cpu, cuda"),
        (["env", "--tp-backend", "nccl"], "tp_backend 'nccl' needs a CUDA device"),
    ],
)
def test_a_user_mistake_is_one_line_and_exit_code_2(args, message) -> None:
    """Bad arguments name what is wrong in one line, without a traceback, exit code 2
    (those found while parsing too: argparse printed its usage block before)."""
    job = _kvdist(*args)
    assert job.returncode == 2, job.output[-4000:]
    assert message in job.output, job.output[-4000:]
    assert "Traceback" not in job.output, job.output[-4000:]
    lines = [ln for ln in job.output.splitlines() if ln.strip()]
    assert all(": error: " in ln for ln in lines), job.output[-4000:]


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


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_help_prints_on_rank_0_alone(rank, printed, monkeypatch, capsys) -> None:
    # Every rank parses the same command line: N copies of the help say nothing more.
    from kvdist.cli.main import main

    monkeypatch.setenv("PMI_RANK", rank)
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    assert ("usage: kvdist generate" in capsys.readouterr().out) is printed


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
    """A demo that fails on two ranks once its temporary cache exists (an engine refusing
    its KV cache size) aborts the job; that cache directory (under TMPDIR) is gone all the
    same."""
    cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", "2", "kvdist", "demo", "--num-blocks", "1"]
    job = run_job(cmd, job_env(TMPDIR=str(tmp_path)), 120)
    assert job.returncode != 0 and "num_blocks must be >= 2" in job.output, job.output[-4000:]
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


def test_version_is_the_installed_packages() -> None:
    import kvdist

    got = subprocess.run(
        [sys.executable, "-m", "kvdist.cli.main", "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert got.stdout.strip() == f"kvdist {kvdist.__version__}"


def test_errors_whose_message_says_all_are_one_line(capsys, monkeypatch) -> None:
    """A collective's timeout and another rank's error name what happened where: they are
    said in one line (exit code 1), not with a traceback of where this rank noticed it,
    from every rank; under `main` too, where a start-up timeout comes before the command's
    own error handling."""
    from kvdist.cli import main as main_mod
    from kvdist.cli.common import command_errors
    from kvdist.comm import LocalCommunicator
    from kvdist.comm.base import CollectiveTimeout
    from kvdist.coordination.errors import RemoteError

    for exc in (
        CollectiveTimeout("plan broadcast (step 3)", 5.0, 0, [1]),
        RemoteError(1, 3, "ConnectorError: MyWorker.wait_for_save raised OSError: disk gone"),
    ):
        with pytest.raises(SystemExit) as info, command_errors(LocalCommunicator(), "generate"):
            raise exc
        err = capsys.readouterr().err
        assert info.value.code == 1 and "Traceback" not in err, err
        assert err.strip().endswith(f"{type(exc).__name__}: {exc}"), err

    def times_out(args):
        raise CollectiveTimeout("engine start", 5.0, 1, [0])

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(command="env", func=times_out)

    monkeypatch.setattr(main_mod, "build_parser", Parser)
    assert main_mod.main(["env"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "kvdist env: CollectiveTimeout: rank 1: collective " in err


def test_a_one_process_benchmark_under_a_launcher_is_refused() -> None:
    """`bench transfer` measures one process: under a 2-rank launch it is a usage error on
    every rank (it ran on each, printing twice and sharing the cores). A failure means two
    results, each skewed by the other."""
    cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", "2", "kvdist", "bench", "transfer", "--quick"]
    job = run_job(cmd, job_env(), 120)
    assert job.returncode == 2, job.output[-4000:]
    assert "measures one process; run it without a launcher" in job.output, job.output[-4000:]
    assert '"bandwidth' not in job.output and "Traceback" not in job.output


def _demo_args(*extra: str):
    from kvdist.cli.main import build_parser

    return build_parser().parse_args(["demo", "--prompts", "2", "--max-tokens", "2", *extra])


def test_a_demo_whose_check_fails_says_so_in_one_line(monkeypatch, capsys) -> None:
    """When run 2 loads nothing, the demo ends with exit code 1 and one FAILED line, not
    an AssertionError traceback. A failure means the check's outcome reads as a crash."""
    from kvdist.cli import demo

    def one_run(args, topo, path, prompts, label):
        out = [type("Out", (), {"output_token_ids": [1], "finish_reason": "length"})()]
        row = {"run": label, "ttft_ms_mean": 1.0, "prompt_tokens_computed": 10,
               "prompt_tokens_loaded": 0, "prompt_tokens_on_device_hit": 0, "bytes_saved": 0,
               "bytes_loaded": 0, "load_GBps": 0.0, "wall_s": 0.1}  # fmt: skip
        return out, row

    monkeypatch.setattr(demo, "_one_run", one_run)
    assert demo.run(_demo_args()) == 1
    err = capsys.readouterr().err
    assert "kvdist demo: FAILED: run 2 loaded nothing from the cache" in err, err
    assert "Traceback" not in err


def test_the_demo_refuses_a_temporary_cache_across_hosts(monkeypatch, capsys) -> None:
    """Ranks on several hosts cannot share rank 0's temporary directory: without
    --cache-dir the demo refuses up front. A failure means run 2 loads nothing on the
    other hosts and the demo reports a misleading table."""
    import kvdist.comm.shm as shm
    from kvdist.cli import demo

    monkeypatch.setattr(shm, "same_host", lambda comm, timeout_s: False)
    with pytest.raises(SystemExit) as info:
        demo.run(_demo_args())
    assert info.value.code == 2
    assert "pass --cache-dir on a filesystem they all share" in capsys.readouterr().err


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the demo's rank `rank` among the launcher's descendants (not its IO
    process, which has the rank's environment too)."""
    import os

    todo, found = [launcher_pid], []
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(c) for c in f.read().split()]
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                demo = b"demo" in f.read().split(b"\0")
        except OSError:
            continue
        ranks = {f"{k}={rank}".encode() for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")}
        if demo and ranks.intersection(env):
            found.append(pid)
    assert len(found) == 1, (found, os.getpid())
    return found[0]


def _interrupt_demo(
    tmp_path, cmd: list[str], signum: int, *, group: bool, rank: int | None = None
) -> tuple[int, str]:
    """Start the demo (`cmd`, its temporary cache under `tmp_path`) in a session of its
    own, send `signum` once it is saving, to every process of the session when `group` (a
    terminal's Ctrl-C), to rank `rank`'s process alone when given, else to the command
    alone (`kill`), and return its exit code and output."""
    import os
    import subprocess
    import time

    env = job_env(TMPDIR=str(tmp_path), KVDIST_PYTHON=sys.executable)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not list(tmp_path.glob("kvdist-demo-*/*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob("kvdist-demo-*/*")), "the demo never started saving"
        time.sleep(0.5)
        if rank is not None:
            os.kill(_rank_pid(proc.pid, rank), signum)
        else:
            (os.killpg if group else os.kill)(proc.pid, signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out


DEMO_TO_INTERRUPT = ["kvdist", "demo", "--prompts", "16", "--max-tokens", "400"]


def test_sigterm_removes_the_demos_temporary_cache(tmp_path) -> None:
    """SIGTERM (what timeout, kill and scancel send) unwinds the command: the demo's
    temporary cache directory is removed, after its IO process stopped (it would make its
    block directories again). A failure means every terminated demo leaves megabytes
    under /tmp."""
    import os

    cmd = [sys.executable, "-m", "kvdist.cli.main", *DEMO_TO_INTERRUPT[1:]]
    code, out = _interrupt_demo(tmp_path, cmd, signal.SIGTERM, group=False)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    assert not list(tmp_path.glob("kvdist-demo-*")), list(os.walk(tmp_path))


@pytest.mark.multirank
def test_sigterm_to_one_rank_reaches_rank_0_which_removes_the_cache(tmp_path) -> None:
    """SIGTERM to rank 1 alone (`kill` of its pid) during a 2-rank demo: rank 1 passes it
    on to rank 0, which removes the temporary cache and ends the job. A failure means
    rank 1 unwound alone, rank 0 waited for it in a collective, and rank 1's abort at the
    end of its grace killed rank 0 before its cleanup: the cache stays under /tmp."""
    import os

    cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", "2", *DEMO_TO_INTERRUPT]
    code, out = _interrupt_demo(tmp_path, cmd, signal.SIGTERM, group=False, rank=1)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "[kvdist rank 0/2] kvdist demo: exiting with code 143 (SIGTERM)" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not list(tmp_path.glob("kvdist-demo-*")), list(os.walk(tmp_path))


@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_is_one_line_per_rank_and_no_traceback(tmp_path, ranks) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during the demo:
    a rank says it was interrupted in one line, the exit code is 130, and no process
    prints a traceback (before, every rank and every disk IO process printed a
    KeyboardInterrupt's). At 1 rank the temporary cache is removed. With 2 ranks, rank 0
    may be waiting in the model's all-reduce for a rank already unwinding, where it sees
    the signal only once the job ends: then nobody removes the cache."""
    cmd = [sys.executable, "-m", "kvdist.cli.main", *DEMO_TO_INTERRUPT[1:]]
    if ranks > 1:
        cmd = [str(REPO / "launch" / "mpirun.sh"), "-n", str(ranks), *DEMO_TO_INTERRUPT]
    code, out = _interrupt_demo(tmp_path, cmd, signal.SIGINT, group=True)
    assert code == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert "kvdist demo: interrupted" in out, out[-3000:]
    if ranks == 1:
        assert not list(tmp_path.glob("kvdist-demo-*"))


def test_a_closed_pipe_is_no_traceback(tmp_path) -> None:
    """`kvdist cache ls DIR | head -1`: output to a reader that went away ends quietly with
    exit code 1, not a BrokenPipeError traceback."""
    import subprocess

    (tmp_path / "cache").mkdir()
    cmd = [sys.executable, "-m", "kvdist.cli.main", "cache", "list", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command prints (it takes a moment to start)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err


def test_a_result_path_only_rank_0_has_does_not_stop_the_other_ranks(tmp_path) -> None:
    """`bench coordination --out results/c.json` where `results/` exists only in rank 0's
    working directory (as on rank 0's host alone): rank 0, which writes it, checks it; the
    others run. A failure means the other ranks exit before the rendezvous and rank 0
    waits for them until the deadline."""
    from mp.jobs import mpiexec_flavour

    if mpiexec_flavour() != "mpich":
        pytest.skip("the per-rank working directories use MPICH's -wdir")
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "results").mkdir(parents=True)
    b.mkdir()
    bench = ["-m", "kvdist.cli.main", "bench", "coordination", "--sizes", "1", "--steps", "5"]
    bench += ["--min-steps", "5", "--warmup", "2", "--no-profile", "--out", "results/c.json"]
    cmd = ["mpiexec", "-n", "1", "-wdir", str(a), sys.executable, *bench]
    cmd += [":", "-n", "1", "-wdir", str(b), sys.executable, *bench]
    job = run_job(cmd, job_env(PYTHONPATH=str(REPO), KVDIST_TIMEOUT_S="60"), 120)
    assert job.returncode == 0, job.output[-4000:]
    assert json.loads((a / "results" / "c.json").read_text())["rows"]
    assert not (b / "results").exists()


def test_sigterm_ends_a_rank_stuck_in_native_code(tmp_path) -> None:
    """A SIGTERM that the main thread cannot see (it is blocked in native code: here
    SIGTERM is masked in it, as a C call that never returns to Python would be) still
    ends the command, after the grace period. A failure means a rank stuck in a
    collective outlives `timeout` and the launcher's SIGTERM."""
    import signal
    import subprocess
    import time

    script = tmp_path / "stuck.py"
    # "ready" is printed once the main thread is inside libc's sleep (its syscall in
    # /proc is a nanosleep's): printed just before the call, a SIGTERM sent at once could
    # find the main thread still running Python code, which then unwinds at once.
    script.write_text(
        "import ctypes, os, signal, threading, time\n"
        "from kvdist.cli.main import unwind_on_sigterm\n"
        "unwind_on_sigterm(grace_s=1.0)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "def say_ready():\n"
        "    with open(f'/proc/self/task/{os.getpid()}/syscall') as f:\n"
        "        for _ in range(1000):  # 10 s at most (x86-64 numbers; others go on)\n"
        "            if f.read().split(' ')[0] in ('35', '230'):\n"
        "                break\n"
        "            f.seek(0)\n"
        "            time.sleep(0.01)\n"
        "    print('ready', flush=True)\n"
        "threading.Thread(target=say_ready, daemon=True).start()\n"
        "ctypes.CDLL(None).sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=job_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert 0.9 < took < 20, took


def test_the_demo_removes_caches_left_by_killed_demos(tmp_path, monkeypatch, capsys) -> None:
    """A demo killed before its cleanup (SIGKILL; a rank 0 stuck in an all-reduce when the
    launcher ended the job) leaves its temporary cache. The next demo removes those whose
    rank 0 is gone and that are an hour old, and nothing else: a live demo's, a fresh one
    (its rank 0 may be in another pid namespace), a directory not named as a demo makes
    them."""
    import os
    import tempfile
    import time

    from kvdist.cli import demo

    dead = gone_pid()
    dirs = {
        "old, maker gone": f"kvdist-demo-{dead}-abcd_123",
        "fresh, maker gone": f"kvdist-demo-{dead}-efgh_456",
        "old, written to just now, maker gone": f"kvdist-demo-{dead}-qrst_345",
        "old, maker alive": f"kvdist-demo-{os.getpid()}-ijkl_789",
        "no pid": "kvdist-demo-mnop_012",
    }
    for what, name in dirs.items():
        block = tmp_path / name / "0123456789abcdef" / "ab" / "ab12"
        block.mkdir(parents=True)
        label = tmp_path / name / "0123456789abcdef" / "NAMESPACE"
        label.write_text("x")
        if what == "fresh, maker gone":
            continue
        for d in (block, block.parent, label, block.parent.parent, tmp_path / name):
            if what.startswith("old, written") and d == block:
                continue  # a record was just written there: the cache is live
            os.utime(d, (0, time.time() - 7200))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    demo._remove_left_behind_caches()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for w, n in dirs.items() if w != "old, maker gone"
    )
    assert (
        f"removed {tmp_path / dirs['old, maker gone']}, left by a demo" in capsys.readouterr().err
    )
    # What the demo makes is what it looks for.
    made = tempfile.mkdtemp(prefix=f"kvdist-demo-{os.getpid()}-")
    assert demo._DEMO_CACHE.fullmatch(os.path.basename(made))


def test_signals_during_the_heavy_imports_are_acted_on_after_them() -> None:
    """A Ctrl-C or SIGTERM while torch (and numpy) import is held until the import is
    done, then raised as it would have been: raised midway, it left numpy half
    initialised (no numpy.ma) or was swallowed, and the command ran on broken."""
    from kvdist.cli.main import _terminate, deferred_signals

    # An earlier in-process main() left its SIGTERM watcher reading the wakeup fd: the
    # SIGTERM below must not reach it, or it ends this process 10 s later.
    wakeup = signal.set_wakeup_fd(-1)
    try:
        _signals_held_then_raised(_terminate, deferred_signals)
    finally:
        signal.set_wakeup_fd(wakeup)


def _signals_held_then_raised(_terminate, deferred_signals) -> None:
    import faulthandler

    with pytest.raises(KeyboardInterrupt), deferred_signals():
        signal.raise_signal(signal.SIGINT)
        reached = True  # not interrupted in the block
    assert reached
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        with pytest.raises(SystemExit) as exit_info, deferred_signals():
            signal.raise_signal(signal.SIGTERM)
            reached = False
        assert exit_info.value.code == 143 and reached is False
    finally:
        faulthandler.cancel_dump_traceback_later()  # _terminate's watchdog
        signal.signal(signal.SIGTERM, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_python_dash_m_kvdist_is_the_kvdist_command() -> None:
    """`python -m kvdist ...` runs the command line, as `kvdist ...` does."""
    out = subprocess.run(
        [sys.executable, "-m", "kvdist", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.startswith("kvdist "), out
