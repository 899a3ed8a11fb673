"""launch/mpirun.sh and launch/torchrun.sh (the command lines they build, and real runs of
`kvdist env`), and init_distributed in process and under mpiexec."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from mp.jobs import REPO, job_env, mpiexec_flavour, run_job, worker

from kvdist.comm import LocalCommunicator, init_distributed, read_launch_env
from kvdist.comm.shm import shared_memory_supported
from kvdist.connectors.placement import online_cpus

MPIRUN_SH = str(REPO / "launch" / "mpirun.sh")
TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")

# --- the command lines, with a fake mpiexec / torchrun that prints its arguments ----------


def fake_launcher(tmp_path: Path, version: str) -> str:
    exe = tmp_path / "fake-launcher"
    exe.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "${{1:-}}" = --version ]; then echo "{version}"; exit 0; fi\n'
        'printf "%s\\n" "$@"\n'
    )
    exe.chmod(0o755)
    return str(exe)


def built_command(script: str, args: list[str], **env: str) -> list[str]:
    # PATH without a kvdist executable, so `kvdist` must become `python -m kvdist.cli.main`.
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "kvdist").exists()
    )
    job = run_job([script, *args], job_env(PATH=path, KVDIST_PYTHON="py", **env), timeout_s=30)
    assert job.returncode == 0, job.output
    return job.output.splitlines()


def test_mpirun_sh_mpich_command_line(tmp_path):
    """Options pass through in order (-genv takes two words; an unknown option takes the
    next word unless it is an option or the command), `kvdist` becomes the CLI module, and
    MPICH gets no Open MPI flags. A failure means the wrapper mangles mpiexec options,
    takes the command for an option's value, or cannot run `kvdist` from a checkout."""
    fake = fake_launcher(tmp_path, "HYDRA build details: Version: 5.0.2")
    got = built_command(
        MPIRUN_SH,
        ["-n", "2", "-genv", "A", "1", "-l", "kvdist", "env", "--json"],
        KVDIST_MPIEXEC=fake,
    )
    assert got == [
        "-n",
        "2",
        "-genv",
        "A",
        "1",
        "-l",
        "py",
        "-m",
        "kvdist.cli.main",
        "env",
        "--json",
    ]
    got = built_command(
        MPIRUN_SH, ["-n", "3", "--hostfile", "h", "-m", "mod", "x"], KVDIST_MPIEXEC=fake
    )
    assert got == ["-n", "3", "--hostfile", "h", "py", "-m", "mod", "x"]
    got = built_command(MPIRUN_SH, ["-n", "3", "--", "./-odd-name", "-n"], KVDIST_MPIEXEC=fake)
    assert got == ["-n", "3", "./-odd-name", "-n"]
    # Flags it does not know: before another option or the command they take no value.
    got = built_command(
        MPIRUN_SH,
        ["-print-all-exitcodes", "-n", "2", "--some-flag", "kvdist", "env"],
        KVDIST_MPIEXEC=fake,
    )
    assert got == [
        "-print-all-exitcodes",
        "-n",
        "2",
        "--some-flag",
        "py",
        "-m",
        "kvdist.cli.main",
        "env",
    ]
    got = built_command(MPIRUN_SH, ["-n", "2", "-unknown", "python3", "x.py"], KVDIST_MPIEXEC=fake)
    assert got == ["-n", "2", "-unknown", "python3", "x.py"]
    got = built_command(MPIRUN_SH, ["-n", "2", "-launcher", "ssh", "hostname"], KVDIST_MPIEXEC=fake)
    assert got == ["-n", "2", "-launcher", "ssh", "hostname"]  # other words stay values


def test_mpirun_sh_openmpi_command_line(tmp_path):
    """Open MPI gets --oversubscribe (and --allow-run-as-root as root) once, even when the
    user passes it too, and --bind-to none unless the user binds or maps. A failure means
    CI's oversubscribed runs or root GPU hosts break, or ranks run on one core each."""
    fake = fake_launcher(tmp_path, "mpiexec (OpenRTE) 4.1.5")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    got = built_command(
        MPIRUN_SH, ["-n", "2", "-x", "NCCL_DEBUG=INFO", "python", "s.py"], KVDIST_MPIEXEC=fake
    )
    unbound = ["--bind-to", "none"]
    assert got == [
        "--oversubscribe", *root, *unbound, "-n", "2", "-x", "NCCL_DEBUG=INFO", "python", "s.py",
    ]  # fmt: skip
    got = built_command(MPIRUN_SH, ["--oversubscribe", "-n", "2", "true"], KVDIST_MPIEXEC=fake)
    assert got.count("--oversubscribe") == 1
    for user in (["--bind-to", "core"], ["--map-by", "ppr:1:numa"], ["--bind-to=socket"]):
        got = built_command(MPIRUN_SH, [*user, "-n", "2", "true"], KVDIST_MPIEXEC=fake)
        assert got == ["--oversubscribe", *root, *user, "-n", "2", "true"]


def test_mpirun_sh_keeps_a_binding_set_as_an_open_mpi_mca_parameter(tmp_path):
    """A binding or mapping policy given as its MCA parameter, on the command line or as
    OMPI_MCA_* in the environment, is the user's binding too: no --bind-to none, which
    would override it. A failure means the script overrode it (found in review); the
    last case proves the check is not vacuous."""
    fake = fake_launcher(tmp_path, "mpiexec (OpenRTE) 4.1.5")
    for user, env in (
        (["--mca", "hwloc_base_binding_policy", "core"], {}),
        (["--mca", "rmaps_base_mapping_policy", "ppr:1:numa"], {}),
        ([], {"OMPI_MCA_hwloc_base_binding_policy": "core"}),
        ([], {"OMPI_MCA_rmaps_base_mapping_policy": "node"}),
    ):
        got = built_command(MPIRUN_SH, [*user, "-n", "2", "true"], KVDIST_MPIEXEC=fake, **env)
        assert "--bind-to" not in got, (user, env, got)
    got = built_command(MPIRUN_SH, ["--mca", "btl", "^openib", "true"], KVDIST_MPIEXEC=fake)
    assert got[got.index("--bind-to") + 1] == "none", got


def test_mpirun_sh_takes_options_in_kvdist_mpiexec(tmp_path):
    """KVDIST_MPIEXEC is words, as KVDIST_TORCHRUN is: the program, then options of its
    own, which go first; the flavour is asked of the program alone, and Open MPI options
    given there count as given (no second --oversubscribe, no --bind-to none beside the
    user's binding). A failure means `KVDIST_MPIEXEC="mpiexec -v"` was taken for one
    program name, "not found", or Open MPI went undetected and got none of its flags."""
    mpich = fake_launcher(tmp_path, "HYDRA build details: Version: 5.0.2")
    got = built_command(MPIRUN_SH, ["-n", "2", "true"], KVDIST_MPIEXEC=f"{mpich} -v")
    assert got == ["-v", "-n", "2", "true"], got
    ompi = fake_launcher(tmp_path, "mpiexec (OpenRTE) 4.1.5")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    got = built_command(
        MPIRUN_SH, ["-n", "2", "true"], KVDIST_MPIEXEC=f"  {ompi} --mca btl ^openib"
    )
    assert got == ["--mca", "btl", "^openib", "--oversubscribe", *root, "--bind-to", "none",
                   "-n", "2", "true"], got  # fmt: skip
    own = f"{ompi} --bind-to core --oversubscribe -x KVDIST_COMM"
    got = built_command(MPIRUN_SH, ["-n", "2", "true"], KVDIST_MPIEXEC=own, KVDIST_COMM="mpi")
    assert got == ["--bind-to", "core", "--oversubscribe", "-x", "KVDIST_COMM", *root,
                   "-n", "2", "true"], got  # fmt: skip
    job = run_job(
        [MPIRUN_SH, "-n", "2", "true"],
        job_env(KVDIST_MPIEXEC=f"{tmp_path}/no-such-mpirun --mca btl ^openib"),
        timeout_s=30,
    )
    assert job.returncode == 127, job.output
    assert f"mpirun.sh: '{tmp_path}/no-such-mpirun' not found" in job.output, job.output


def test_mpirun_sh_forwards_kvdist_settings_to_open_mpi_ranks_on_other_nodes(tmp_path):
    """Open MPI hands ranks on other nodes only the variables named with -x: the script
    names every KVDIST_* setting set (not its own KVDIST_MPIEXEC / KVDIST_PYTHON, and not
    one the user's -x names already), for Open MPI only. A failure means that with
    `--hostfile` the remote ranks ran with the default control plane and deadline while
    the launching node's ranks used KVDIST_COMM / KVDIST_TIMEOUT_S, and the job waited
    on itself (found in review)."""
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    args = ["-n", "4", "--hostfile", "h", "-x", "KVDIST_SHM=0", "kvdist", "env"]
    settings = dict(KVDIST_COMM="torch", KVDIST_TIMEOUT_S="30", KVDIST_SHM="1")
    fake = fake_launcher(tmp_path, "mpiexec (OpenRTE) 4.1.5")
    got = built_command(MPIRUN_SH, args, KVDIST_MPIEXEC=fake, **settings)
    forwarded = ["-x", "KVDIST_COMM", "-x", "KVDIST_TIMEOUT_S"]
    assert got[: 3 + len(root) + len(forwarded)] == [
        "--oversubscribe", *root, "--bind-to", "none", *forwarded,
    ]  # fmt: skip
    assert got.count("-x") == 3 and "KVDIST_SHM" not in got, got  # the user's own -x stays
    # MPICH forwards the whole environment itself: nothing added.
    fake = fake_launcher(tmp_path, "HYDRA build details: Version: 5.0.2")
    got = built_command(MPIRUN_SH, args, KVDIST_MPIEXEC=fake, **settings)
    assert got == [*args[:6], "py", "-m", "kvdist.cli.main", "env"], got


def test_torchrun_sh_command_line(tmp_path):
    """One node: --standalone (a free port, never a fixed one); several: the rendezvous from
    the environment; `kvdist`, `python -m` and other commands map to torchrun's forms. A
    failure means torchrun jobs collide on ports or run the wrong program."""
    fake = fake_launcher(tmp_path, "")
    got = built_command(TORCHRUN_SH, ["-n", "2", "kvdist", "env"], KVDIST_TORCHRUN=fake)
    assert got == ["--nproc-per-node", "2", "--standalone", "-m", "kvdist.cli.main", "env"]
    got = built_command(TORCHRUN_SH, ["-n", "2", "python", "-m", "mod"], KVDIST_TORCHRUN=fake)
    assert got[-2:] == ["-m", "mod"]
    got = built_command(TORCHRUN_SH, ["-n", "2", "python", "x.py", "-u"], KVDIST_TORCHRUN=fake)
    assert got[-2:] == ["x.py", "-u"]
    # python's own flags: torchrun cannot pass them to its python, so it runs python as is
    got = built_command(TORCHRUN_SH, ["-n", "2", "python", "-u", "x.py"], KVDIST_TORCHRUN=fake)
    assert got[-4:] == ["--no-python", "python", "-u", "x.py"]
    got = built_command(TORCHRUN_SH, ["--max-restarts=1", "hostname"], KVDIST_TORCHRUN=fake)
    assert got == [
        "--nproc-per-node",
        "1",
        "--standalone",
        "--max-restarts=1",
        "--no-python",
        "hostname",
    ]
    # Options it does not know: a value unless the next word is an option or the command.
    got = built_command(
        TORCHRUN_SH, ["--log-dir", "d", "--some-flag", "kvdist", "env"], KVDIST_TORCHRUN=fake
    )
    assert got[3:] == ["--log-dir", "d", "--some-flag", "-m", "kvdist.cli.main", "env"]
    got = built_command(
        TORCHRUN_SH,
        ["-n", "4", "kvdist", "env"],
        KVDIST_TORCHRUN=fake,
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="node0",
        MASTER_PORT="29511",
    )
    assert got[:10] == [
        "--nproc-per-node",
        "4",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "node0",
        "--master-port",
        "29511",
    ]
    got = built_command(
        TORCHRUN_SH,
        ["kvdist", "env"],
        KVDIST_TORCHRUN=fake,
        NNODES="2",
        RDZV_ENDPOINT="node0:29400",
        RDZV_ID="job42",
    )
    assert "--rdzv-endpoint" in got and "job42" in got and "--standalone" not in got


# --- real runs -------------------------------------------------------------------------------


def env_lines(job) -> list[dict]:
    assert job.returncode == 0, job.output[-4000:]
    return [json.loads(line) for line in job.output.splitlines() if line.startswith('{"rank"')]


@pytest.mark.multirank
def test_mpirun_sh_runs_kvdist_env_on_two_ranks():
    """`launch/mpirun.sh -n 2 python -m kvdist.cli.env` prints one line per rank, in rank
    order, with the MPI launcher detected, the MPI communicator and a working TP group. A
    failure means the wrapper or launch detection is broken under mpiexec."""
    flavour = mpiexec_flavour()
    if flavour is None:
        pytest.skip("mpiexec is not on PATH")
    lines = env_lines(
        run_job(
            [MPIRUN_SH, "-n", "2", "python", "-m", "kvdist.cli.env", "--json", "--device", "cpu"],
            job_env(KVDIST_PYTHON=sys.executable),
        )
    )
    assert [(r["rank"], r["world_size"]) for r in lines] == [(0, 2), (1, 2)]
    for r in lines:
        assert (r["launcher"], r["transport"], r["tp_allreduce"]) == (flavour, "mpi", "ok")
        assert r["comm"] == ("shm" if shared_memory_supported() else "mpi")
        # Where the rank may run, and where connector helpers would go.
        assert r["cpus"].endswith(f" of {len(online_cpus())}") and r["helper_cpus"]


@pytest.mark.multirank
def test_torchrun_sh_runs_kvdist_env_on_two_ranks():
    """Same through `launch/torchrun.sh -n 2`: torchrun detected, the torch communicator. A
    failure means the wrapper or launch detection is broken under torchrun."""
    lines = env_lines(
        run_job(
            [TORCHRUN_SH, "-n", "2", "python", "-m", "kvdist.cli.env", "--json", "--device", "cpu"],
            job_env(),
        )
    )
    assert [(r["rank"], r["world_size"]) for r in lines] == [(0, 2), (1, 2)]
    for r in lines:
        assert (r["launcher"], r["transport"], r["tp_allreduce"]) == ("torchrun", "torch", "ok")
        assert r["comm"] == ("shm" if shared_memory_supported() else "torch")


@pytest.mark.multirank
@pytest.mark.parametrize("comm", ["mpi", "torch"])
def test_init_distributed_under_mpiexec_without_master_variables(comm):
    """Under mpiexec with no MASTER_ADDR/MASTER_PORT (the job's environment has none), rank 0
    shares its store address over MPI; the gloo TP group all-reduces 1 + 2 = 3 with either
    control communicator; a second live init_distributed is refused with a clear error, and
    one after close() works. A failure means mpiexec jobs need torchrun-style variables, or
    tests that build several topologies in one process break."""
    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    env = job_env(KVDIST_COMM=comm, KVDIST_SHM="0", KVDIST_PYTHON=sys.executable)
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env
    job = run_job([MPIRUN_SH, "-n", "2", "python", *worker("tp")], env)
    assert job.returncode == 0, job.output[-4000:]
    gathered = job.gathered()
    assert gathered["comm"] == comm
    for r in gathered["ranks"]:
        res = r["result"]
        assert (res["sum"], res["sum_after_reinit"], res["tp_backend"]) == (3.0, 3.0, "gloo")
        assert "already initialised" in res["second_init"]


# --- init_distributed in this process (world size 1) ---------------------------------------


def test_init_distributed_world_size_one():
    """A plain process gets the local communicator, no TP group, the CPU here; closing twice
    is harmless. A failure means single-process runs need torch.distributed."""
    topo = init_distributed(env=read_launch_env({}), device="cpu")
    assert isinstance(topo.comm, LocalCommunicator)
    assert (topo.rank, topo.world_size, topo.tp_group, str(topo.device)) == (0, 1, None, "cpu")
    topo.close()
    topo.close()


def test_init_distributed_warns_when_comm_override_has_no_effect():
    """A failure means KVDIST_COMM=mpi at world size 1 is silently ignored."""
    with pytest.warns(UserWarning, match="KVDIST_COMM='mpi' has no effect"):
        init_distributed(env=read_launch_env({"KVDIST_COMM": "mpi"}), device="cpu").close()


def test_init_distributed_rejects_impossible_settings():
    """A failure means a contradictory setting hangs or half-starts instead of a clear error."""
    two = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match="KVDIST_COMM='local' needs world size 1"):
        init_distributed(env=read_launch_env(two | {"KVDIST_COMM": "local"}))
    with pytest.raises(ValueError, match="KVDIST_COMM='mpi' needs an MPI launcher"):
        init_distributed(
            env=read_launch_env(
                two
                | {
                    "TORCHELASTIC_RUN_ID": "x",
                    "LOCAL_RANK": "0",
                    "LOCAL_WORLD_SIZE": "2",
                    "KVDIST_COMM": "mpi",
                }
            )
        )
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "KVDIST_COMM": "torch"}
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT are not both set"):
        init_distributed(env=read_launch_env(slurm), device="cpu")
    # A bare RANK/WORLD_SIZE pair (a shell's leftovers): no launcher is blamed, and the
    # advice is to unset them (KVDIST_COMM=mpi would be refused without an MPI launcher).
    with pytest.raises(ValueError, match=r"^RANK=0 and WORLD_SIZE=2 are set but no launcher") as e:
        init_distributed(env=read_launch_env({"RANK": "0", "WORLD_SIZE": "2"}), device="cpu")
    assert "unset RANK and WORLD_SIZE" in str(e.value) and "KVDIST_COMM" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed(env=read_launch_env({}), device="cuda")


@pytest.mark.parametrize("script", [MPIRUN_SH, TORCHRUN_SH])
@pytest.mark.parametrize("n", ["0", "-1", "abc"])
def test_a_bad_rank_count_is_refused(script, n):
    job = run_job([script, "-n", n, "kvdist", "env"], job_env(), timeout_s=30)
    assert job.returncode == 2, job.output
    assert "needs a positive number of ranks" in job.output and f"'{n}'" in job.output


@pytest.mark.parametrize("script", [MPIRUN_SH, TORCHRUN_SH])
def test_a_missing_command_is_named(script):
    job = run_job([script, "-n", "2"], job_env(), timeout_s=30)
    assert job.returncode == 2 and "no COMMAND to run" in job.output, job.output


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([TORCHRUN_SH, "-n"], {}, "torchrun.sh: -n needs a value"),
        ([MPIRUN_SH, "-n", "2", "-genv", "FOO"], {}, "mpirun.sh: -genv needs NAME VALUE or"),
        ([TORCHRUN_SH, "-n", "1", "kvdist", "env"], {"NNODES": "2"}, "needs NODE_RANK set"),
    ],
)
def test_a_missing_option_value_is_one_line_and_exit_code_2(args, env, message):
    job = run_job(args, job_env(**env), timeout_s=30)
    assert job.returncode == 2 and message in job.output, job.output
    assert "line " not in job.output, job.output  # not bash's own "${x:?}" report


def test_genv_takes_name_and_value_in_one_or_two_words():
    """Hydra's mpiexec takes `-genv NAME VALUE` and `-genv NAME=VALUE`: the second form
    must not swallow the command as its value."""
    import sys

    show = [sys.executable, "-c", "import os; print('FOO is', os.environ.get('FOO'))"]
    for genv in (["-genv", "FOO", "bar"], ["-genv", "FOO=bar"]):
        if mpiexec_flavour() != "mpich":
            pytest.skip("-genv is MPICH's")
        job = run_job([MPIRUN_SH, "-n", "1", *genv, *show], job_env(), timeout_s=60)
        assert job.returncode == 0 and "FOO is bar" in job.output, (genv, job.output)


# --- what the launch scripts refuse before starting anything --------------------------------


def refused(script: str, args: list[str], fake: str, **env: str) -> str:
    """The one error line `script` prints; the fake launcher prints its arguments, so any
    more output means the script started it."""
    job = run_job(
        [script, *args], job_env(KVDIST_MPIEXEC=fake, KVDIST_TORCHRUN=fake, **env), timeout_s=30
    )
    assert job.returncode == 2, job.output
    assert len(job.output.splitlines()) == 1, job.output  # one line, the launcher not run
    return job.output.strip()


TWO = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571"}
ELASTIC = {"RDZV_ENDPOINT": "node0:29400"}


@pytest.mark.parametrize(
    "env, message",
    [
        (TWO | {"NODE_RANK": "5"}, "NODE_RANK needs a node number below NNODES=2, got '5'"),
        (TWO | {"NODE_RANK": "2"}, "NODE_RANK needs a node number below NNODES=2, got '2'"),
        (TWO | {"NODE_RANK": "-1"}, "NODE_RANK needs a node number below NNODES=2, got '-1'"),
        (TWO | {"NODE_RANK": "one"}, "NODE_RANK needs a node number below NNODES=2, got 'one'"),
        ({"NODE_RANK": "1"}, "NODE_RANK needs a node number below NNODES=1, got '1'"),
        ({"NNODES": "abc"}, "NNODES needs a positive number of nodes, got 'abc'"),
        ({"NNODES": "0"}, "NNODES needs a positive number of nodes, got '0'"),
        ({"NNODES": "-2"}, "NNODES needs a positive number of nodes, got '-2'"),
        (TWO | {"MASTER_ADDR": ""}, "NNODES=2 needs MASTER_ADDR set (on every node)"),
        (TWO | {"MASTER_PORT": ""}, "NNODES=2 needs MASTER_PORT set (on every node)"),
        (TWO | {"MASTER_PORT": "0"}, "MASTER_PORT needs a port number 1-65535, got '0'"),
        (TWO | {"MASTER_PORT": "65536"}, "MASTER_PORT needs a port number 1-65535, got '65536'"),
        (TWO | {"MASTER_PORT": "http"}, "MASTER_PORT needs a port number 1-65535, got 'http'"),
        (ELASTIC | {"NNODES": "0"}, "NNODES needs a positive number of nodes or MIN:MAX, got '0'"),
        (
            ELASTIC | {"NNODES": "4:2"},
            "NNODES needs a positive number of nodes or MIN:MAX, got '4:2'",
        ),
    ],
)
def test_torchrun_sh_refuses_a_bad_node_setting(tmp_path, env, message):
    """A node setting torchrun cannot use is one line naming the variable, exit code 2,
    before torchrun starts. A failure means a bad NODE_RANK waits forever for a node that
    never joins, a bad number ends in torchrun's traceback, or the error names the wrong
    variable."""
    line = refused(TORCHRUN_SH, ["-n", "1", "kvdist", "env"], fake_launcher(tmp_path, ""), **env)
    assert line.startswith("torchrun.sh: ") and message in line, line


def test_torchrun_sh_leaves_the_command_alone_after_the_users_no_python(tmp_path):
    """With the user's own --no-python, torchrun runs COMMAND as an executable: the script
    must not turn `python3 x.py` into `x.py` (not executable: FileNotFoundError) nor
    `kvdist env` into `-m kvdist.cli.main env` (torchrun refuses --no-python with -m). A
    failure means those rewrites are back (found in review)."""
    fake = fake_launcher(tmp_path, "")
    for command in (["python3", "x.py"], ["kvdist", "env"], ["./run.sh", "a"]):
        got = built_command(TORCHRUN_SH, ["--no-python", *command], KVDIST_TORCHRUN=fake)
        assert got == ["--nproc-per-node", "1", "--standalone", "--no-python", *command], got


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--nnodes", "2", "--node-rank", "0"], {}, "set NNODES in the environment instead of --nnodes"),
        (["--master_port=29500"], {}, "set MASTER_PORT in the environment instead of --master_port"),
        (["--rdzv-endpoint", "node0:1"], {}, "set RDZV_ENDPOINT in the environment instead of"),
        # Abbreviations torchrun's argparse reads as those options, - or _ spelled.
        (["--nnode", "2"], {}, "set NNODES in the environment instead of --nnode (short for --nnodes)"),
        (["--nn=2"], {}, "set NNODES in the environment instead of --nn (short for --nnodes)"),
        (["--node_r", "1"], {}, "set NODE_RANK in the environment instead of --node_r (short for --node-rank)"),
        (["--master-ad", "x"], {}, "set MASTER_ADDR in the environment instead of --master-ad (short for"),
        (["--master_p=1"], {}, "set MASTER_PORT in the environment instead of --master_p (short for"),
        (["--rdzv-end", "h:1"], {}, "set RDZV_ENDPOINT in the environment instead of --rdzv-end (short"),
        (["--rdzv_i", "j"], {}, "set RDZV_ID in the environment instead of --rdzv_i (short for --rdzv-id)"),
        (["--rdzv-b", "c10d"], {}, "set RDZV_BACKEND in the environment instead of --rdzv-b (short for"),
        (["--stand"], TWO, "--standalone runs one node on its own, but a shared rendezvous is set"),
        (["--standalone"], TWO, "--standalone runs one node on its own, but a shared rendezvous is set (NNODES=2)"),
        (["--standalone"], ELASTIC, "a shared rendezvous is set (NNODES=1, RDZV_ENDPOINT=node0:29400)"),
    ],
)  # fmt: skip
def test_torchrun_sh_refuses_rendezvous_options_on_its_command_line(tmp_path, args, env, message):
    """torchrun's own rendezvous options went to torchrun beside the script's --standalone
    (or --standalone beside the script's multi-node options), which wins: each node then
    waited alone at its own localhost port for nodes that never came (found in review:
    `launch/torchrun.sh -n 1 --nnodes 2 --node-rank i --master-addr ... --master-port ...`
    on two nodes hung where plain torchrun met). A failure means that silent hang is back."""
    fake = fake_launcher(tmp_path, "")
    line = refused(TORCHRUN_SH, [*args, "-n", "1", "kvdist", "env"], fake, **env)
    assert line.startswith("torchrun.sh: ") and message in line, line
    # On one node a --standalone of the user's own is the script's: given once.
    got = built_command(TORCHRUN_SH, ["--standalone", "kvdist", "env"], KVDIST_TORCHRUN=fake)
    assert got.count("--standalone") == 1, got


def test_torchrun_sh_passes_torchruns_other_options_and_their_abbreviations(tmp_path):
    """Options that are not the rendezvous's pass, whole or abbreviated, even where they
    share a refused option's start (--rdzv-conf, --max-restarts beside --master-*); an
    abbreviation of one the script reads is that option (--nproc 3 is -n 3, --no_p
    --no-python); an ambiguous prefix goes to torchrun, which says so. A failure means
    the check for abbreviated rendezvous options refuses what torchrun reads otherwise."""
    fake = fake_launcher(tmp_path, "")
    head = ["--nproc-per-node", "1", "--standalone"]
    for args in (
        ["--max-restarts", "0"],
        ["--max-r", "0"],
        ["--max_restarts=0"],
        ["--monitor-interval", "5"],
        ["--monitor_i", "5"],
        ["--rdzv-conf", "timeout=60"],
        ["--rdzv_c", "timeout=60"],
        ["--n", "2"],
        ["--master", "x"],
        ["--log-dir", "d"],
    ):
        got = built_command(TORCHRUN_SH, [*args, "kvdist", "env"], KVDIST_TORCHRUN=fake)
        assert got == [*head, *args, "-m", "kvdist.cli.main", "env"], (args, got)
    for args in (["-n", "3"], ["--nproc-per-node", "3"], ["--nproc_per_node=3"], ["--npr", "3"]):
        got = built_command(TORCHRUN_SH, [*args, "kvdist", "env"], KVDIST_TORCHRUN=fake)
        assert got == ["--nproc-per-node", "3", "--standalone", "-m", "kvdist.cli.main", "env"]
    got = built_command(TORCHRUN_SH, ["--stand", "--no_p", "./run.sh"], KVDIST_TORCHRUN=fake)
    assert got == [*head, "--no-python", "./run.sh"], got


def test_torchrun_sh_knows_torchruns_options():
    """The script resolves abbreviations against its own list of torchrun's long options.
    Each option the script reads itself must be one of the installed torchrun's, and every
    abbreviation of one must resolve against the list as against the installed torchrun's
    options (an option torch adds or drops elsewhere changes nothing there). A failure
    means torch changed what such an abbreviation reads as: update `torchrun_options`."""
    from torch.distributed.run import get_args_parser

    text = Path(TORCHRUN_SH).read_text()
    listed = text.split("torchrun_options=(", 1)[1].split(")", 1)[0].split()
    actions = [a.option_strings for a in get_args_parser()._actions if a.option_strings]
    installed = {
        o.removeprefix("--").replace("_", "-") for names in actions for o in names
        if o.startswith("--")
    }  # fmt: skip
    reads = [
        "nproc-per-node",
        "nnodes",
        "node-rank",
        "master-addr",
        "master-port",
        "rdzv-endpoint",
        "rdzv-id",
        "rdzv-backend",
        "standalone",
        "no-python",
        "run-path",
    ]
    assert set(reads) <= installed and set(reads) <= set(listed)

    def resolve(word: str, options) -> str | None:
        if word in options:
            return word
        found = [o for o in options if o.startswith(word)]
        return found[0] if len(found) == 1 else None

    for option in reads:
        for i in range(1, len(option) + 1):
            word = option[:i]
            assert resolve(word, listed) == resolve(word, installed), word


def test_torchrun_sh_accepts_node_settings_at_the_limits(tmp_path):
    """The last node rank, port 65535, NODE_RANK=0 on one node and an elastic MIN:MAX all
    pass through. A failure means the checks above refuse settings torchrun takes (and
    would pass whatever they refuse)."""
    fake = fake_launcher(tmp_path, "")
    got = built_command(
        TORCHRUN_SH,
        ["kvdist", "env"],
        KVDIST_TORCHRUN=fake,
        NNODES="3",
        NODE_RANK="2",
        MASTER_ADDR="node0",
        MASTER_PORT="65535",
    )
    assert got[2:10] == [
        "--nnodes", "3", "--node-rank", "2", "--master-addr", "node0", "--master-port", "65535",
    ]  # fmt: skip
    got = built_command(TORCHRUN_SH, ["kvdist", "env"], KVDIST_TORCHRUN=fake, NODE_RANK="0")
    assert got[2] == "--standalone"
    got = built_command(
        TORCHRUN_SH, ["kvdist", "env"], KVDIST_TORCHRUN=fake, NNODES="1:4", RDZV_ENDPOINT="n:1"
    )
    assert got[2:4] == ["--nnodes", "1:4"]


PYTHONS = [sys.executable, "/usr/bin/python3", ".venv/bin/python", "/opt/py/bin/python3.12"]


@pytest.mark.parametrize("python", PYTHONS)
def test_a_python_given_by_path_starts_the_command(tmp_path, python):
    """After a flag the scripts do not know, a python by path (sys.executable, a venv's)
    starts the command, as a bare `python3` does; any other word stays the flag's value.
    A failure means the python is passed to mpiexec / torchrun as the flag's value and the
    job runs `-m` or a script path as its program."""
    fake = fake_launcher(tmp_path, "HYDRA build details: Version: 5.0.2")
    run = [python, "-m", "kvdist.cli.env"]
    got = built_command(MPIRUN_SH, ["-n", "2", "-print-all-exitcodes", *run], KVDIST_MPIEXEC=fake)
    assert got == ["-n", "2", "-print-all-exitcodes", *run]
    got = built_command(
        TORCHRUN_SH, ["-n", "2", "--some-flag", python, "-u", "x.py"], KVDIST_TORCHRUN=fake
    )
    assert got[-5:] == ["--some-flag", "--no-python", python, "-u", "x.py"]
    # Not a python: still the value (Hydra's -launcher-exec takes a path).
    got = built_command(
        MPIRUN_SH, ["-n", "2", "-launcher-exec", "/usr/bin/ssh", "hostname"], KVDIST_MPIEXEC=fake
    )
    assert got == ["-n", "2", "-launcher-exec", "/usr/bin/ssh", "hostname"]
    got = built_command(
        MPIRUN_SH, ["-n", "2", "-x", "/opt/python3-tools", "true"], KVDIST_MPIEXEC=fake
    )
    assert got == ["-n", "2", "-x", "/opt/python3-tools", "true"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n=0"], "-n needs a positive number of ranks, got '0'"),
        (["--np=abc"], "--np needs a positive number of ranks, got 'abc'"),
        (["-np=-1"], "-np needs a positive number of ranks, got '-1'"),
        (["--n=2.5"], "--n needs a positive number of ranks, got '2.5'"),
        (["--n", "0"], "--n needs a positive number of ranks, got '0'"),
        (["-n0"], "-n needs a positive number of ranks, got '0'"),
        (["-np-1"], "-np needs a positive number of ranks, got '-1'"),
        (["-n2x"], "-n needs a positive number of ranks, got '2x'"),
        (["-n2"], "write the rank count as its own word, '-n 2', not '-n2'"),
        (["--np12"], "write the rank count as its own word, '--np 12', not '--np12'"),
    ],
)
def test_mpirun_sh_checks_the_rank_count_in_every_spelling(tmp_path, args, message):
    """-n=N, --np=N, --n N and -nN get the same check as `-n N`; -nN, which mpiexec does
    not read, is refused with the spelling to use. A failure means a bad count reaches
    mpiexec (its own multi-line parse error, or an odd job) instead of one line, exit 2."""
    fake = fake_launcher(tmp_path, "HYDRA build details: Version: 5.0.2")
    line = refused(MPIRUN_SH, [*args, "kvdist", "env"], fake)
    assert line == f"mpirun.sh: {message}", line


def test_mpirun_sh_passes_every_rank_count_spelling_it_accepts(tmp_path):
    """The spellings the check lets through reach mpiexec unchanged. A failure means the
    check refuses a count mpiexec takes, or rewrites it."""
    fake = fake_launcher(tmp_path, "HYDRA build details: Version: 5.0.2")
    for count in (["-n=2"], ["-np=2"], ["--n=2"], ["--np=12"], ["--n", "2"], ["-np", "2"]):
        assert built_command(MPIRUN_SH, [*count, "true"], KVDIST_MPIEXEC=fake) == [*count, "true"]


def test_mpich_reads_the_rank_count_spellings_mpirun_sh_passes():
    """Hydra's mpiexec starts N ranks for -n=N, --np=N and --n N and refuses -nN, as the
    script's comments say. A failure means an MPICH release changed its parsing and the
    script's checks no longer match what mpiexec accepts."""
    if mpiexec_flavour() != "mpich":
        pytest.skip("these spellings are Hydra's")
    hello = [sys.executable, "-c", "print('rank up')"]
    for count in (["-n=2"], ["--np=2"], ["--n", "2"]):
        job = run_job(["mpiexec", *count, *hello], job_env(), timeout_s=60)
        assert job.returncode == 0 and job.output.count("rank up") == 2, (count, job.output)
    job = run_job(["mpiexec", "-n2", *hello], job_env(), timeout_s=60)
    assert job.returncode != 0 and "rank up" not in job.output, job.output


def _per_rank(rank1: str, others: str) -> list[str]:
    """A command line for mpirun.sh: `sh -c` running `rank1` on rank 1, `others` on the
    other ranks (the rank read from MPICH's or Open MPI's variable)."""
    script = (
        'if [ "${PMI_RANK:-$OMPI_COMM_WORLD_RANK}" = 1 ]; then '
        + rank1
        + "; else "
        + others
        + "; fi"
    )
    return ["sh", "-c", script]


@pytest.mark.multirank
def test_a_rank_failing_before_mpi_starts_ends_the_job():
    """Rank 1's KVDIST_TIMEOUT_S is bad, found before it starts MPI: it starts MPI and
    ends the job with its error. Before, it just exited, and under MPICH rank 0 waited in
    MPI's start-up forever (spinning, deaf to SIGTERM)."""
    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    py = f"exec {sys.executable} -m kvdist.cli.main env"
    cmd = [MPIRUN_SH, "-n", "2", *_per_rank(f"KVDIST_TIMEOUT_S=abc {py}", py)]
    job = run_job(cmd, job_env(), timeout_s=120)
    assert job.returncode != 0, job.output[-4000:]
    assert "kvdist: rank 1 failed before the ranks could start" in job.output, job.output
    # Once: MPICH's MPI_Abort at times returns, and the rank went on to report it again.
    assert job.output.count("KVDIST_TIMEOUT_S must be a number of seconds") == 1, job.output
    assert job.seconds < 60, job.seconds


@pytest.mark.multirank
def test_a_rank_ending_the_job_before_it_starts_leaves_no_mpich_segments():
    """The same bad KVDIST_TIMEOUT_S on rank 1: the MPI it starts only to end the job maps
    MPICH's shared-memory segments, which MPICH removes at MPI_Finalize, not at MPI_Abort.
    Rank 1 prints what it mapped once MPI started; none may remain after the job. Before,
    each such job left a 2 MB segment in /dev/shm (the abort of a started job removed
    them; this one did not)."""
    import ast
    import re

    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    rank1 = (
        f"exec env KVDIST_TIMEOUT_S=abc {sys.executable} -c 'import contextlib, sys; "
        "import kvdist.comm.mpi_start as s, kvdist.cli.main as m; real = s.mpi_start_up\n"
        "@contextlib.contextmanager\ndef spy():\n    with real():\n        yield\n"
        '    maps = open("/proc/self/maps").read().split()\n'
        '    print("mapped segments:", sorted({w for w in maps if "/dev/shm/mpich_shm_" in w}), '
        "flush=True)\n"
        's.mpi_start_up = spy; sys.exit(m.main(["env"]))\''
    )
    py = f"exec {sys.executable} -m kvdist.cli.main env"
    job = run_job([MPIRUN_SH, "-n", "2", *_per_rank(rank1, py)], job_env(), timeout_s=120)
    assert job.returncode != 0, job.output[-4000:]
    assert "kvdist: rank 1 failed before the ranks could start" in job.output, job.output
    mapped = re.search(r"mapped segments: (\[.*\])", job.output)
    assert mapped, job.output[-4000:]
    segments = ast.literal_eval(mapped.group(1))
    if mpiexec_flavour() == "mpich":
        assert segments, "rank 1 mapped no MPICH segment: the check below proves nothing"
    left = [p for p in segments if os.path.exists(p)]
    assert left == [], left


def test_an_mpi_abort_that_returns_still_ends_the_process(monkeypatch):
    """MPI_Abort is not meant to return; where it does (MPICH, at times), the rank must
    not go on to report its error again and unwind: it exits with the abort's code."""
    from kvdist.comm import mpi as mpi_mod

    class Returns:
        def Abort(self, code):  # noqa: N802 (mpi4py's name)
            self.code = code

    world = Returns()
    exits = []
    monkeypatch.setattr(mpi_mod, "MPI", type("MPI", (), {"COMM_WORLD": world}))
    monkeypatch.setattr(mpi_mod, "remove_mpich_segments", lambda: None)
    monkeypatch.setattr(mpi_mod.os, "_exit", exits.append)
    mpi_mod.MPICommunicator.abort(None, 3)  # type: ignore[arg-type]
    assert world.code == 3 and exits == [3]


@pytest.mark.multirank
def test_sigterm_ends_a_rank_waiting_in_mpi_start_up(tmp_path):
    """Rank 1 never starts MPI (it sleeps), so rank 0 waits in MPI's start-up, which holds
    the GIL: the command line's SIGTERM handler could never run there, and the rank could
    only be killed. It now ends at the SIGTERM."""
    import signal
    import subprocess
    import time

    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    pid_file = tmp_path / "rank0.pid"
    rank0 = f"echo $$ > {pid_file}; exec {sys.executable} -m kvdist.cli.main env"
    cmd = [MPIRUN_SH, "-n", "2", *_per_rank("exec sleep 120", rank0)]
    proc = subprocess.Popen(
        cmd, env=job_env(), start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "rank 0 did not start"
            time.sleep(0.2)
        pid = int(pid_file.read_text())
        # Into MPI's start-up: once MPI's library is mapped (after torch's import, which
        # takes seconds on a loaded machine), and a moment more for its initialisation.
        while "libmpi" not in _maps(pid):
            assert time.monotonic() < deadline, "rank 0 did not reach MPI's start-up"
            time.sleep(0.1)
        time.sleep(1)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid):
            assert time.monotonic() < deadline, "rank 0 did not end at its SIGTERM"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.multirank
@pytest.mark.parametrize(
    "addr,message",
    [
        ("nonexistent.invalid", "KVDIST_MASTER_ADDR='nonexistent.invalid' does not resolve"),
        ("10.255.255.1", "KVDIST_MASTER_ADDR='10.255.255.1': rank 0 cannot reach its rendezvous"),
    ],
)
def test_a_wrong_master_addr_fails_at_once_naming_it(addr, message):
    """A KVDIST_MASTER_ADDR that does not resolve, or that rank 0 cannot reach, fails every
    rank in one line naming the setting. Before, rank 0's own store kept trying it for
    the whole deadline, and the others timed out first, blaming rank 0 for not arriving."""
    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    cmd = [MPIRUN_SH, "-n", "2", sys.executable, "-m", "kvdist.cli.main", "env"]
    job = run_job(cmd, job_env(KVDIST_MASTER_ADDR=addr, KVDIST_TIMEOUT_S="120"), timeout_s=100)
    assert job.returncode == 2, job.output[-4000:]
    assert job.output.count(message) == 2, job.output[-4000:]
    assert "Traceback" not in job.output
    assert job.seconds < 60, job.seconds


@pytest.mark.multirank
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_rank_signalled_before_mpi_starts_ends_the_job(signum):
    """Rank 1 is interrupted (or sent SIGTERM) before it starts MPI, while rank 0 waits
    in MPI's start-up for it: rank 1 starts MPI only to end the job, with the signal's
    exit code. Before, it just exited, and rank 0 spun in MPI's start-up forever (a
    Ctrl-C or a `timeout` in the job's first second hung it)."""
    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    rank1 = (
        f"exec {sys.executable} -c 'import os, sys, kvdist.cli.env as e, kvdist.cli.main as m; "
        f'e.run = lambda args: os.kill(os.getpid(), {int(signum)}) or __import__("time").sleep(5); '
        'sys.exit(m.main(["env"]))\''
    )
    py = f"exec {sys.executable} -m kvdist.cli.main env"
    job = run_job([MPIRUN_SH, "-n", "2", *_per_rank(rank1, py)], job_env(), timeout_s=120)
    code = 130 if signum == signal.SIGINT else 143
    assert job.returncode == code, (job.returncode, job.output[-4000:])
    what = "was interrupted" if signum == signal.SIGINT else "was told to end (SIGTERM)"
    assert f"kvdist: rank 1 {what} before the ranks could start, ending the job" in job.output
    assert job.seconds < 60, job.seconds


@pytest.mark.multirank
@pytest.mark.parametrize("command", ["cache", "env"])
def test_a_rank_interrupted_after_the_others_left_still_ends(command, tmp_path):
    """Rank 0 has already exited (no MPI) when rank 1 is interrupted: a `cache` command,
    which never starts MPI, just ends (130); a command whose ranks start MPI tries to end
    the job through MPI's start-up, where nobody comes, and a watchdog ends it after the
    control plane's deadline (KVDIST_TIMEOUT_S). Neither spins for ever, deaf to Ctrl-C
    (found in review)."""
    if mpiexec_flavour() is None:
        pytest.skip("mpiexec is not on PATH")
    argv = '["cache", "ls", "' + str(tmp_path) + '"]' if command == "cache" else '["env"]'
    rank1 = (
        f"exec {sys.executable} -c 'import os, sys, time, kvdist.cli.{command} as c, "
        "kvdist.cli.main as m; "
        "c.run = lambda args: time.sleep(2) or os.kill(os.getpid(), 2) or time.sleep(5); "
        f"sys.exit(m.main({argv}))'"
    )
    cmd = [MPIRUN_SH, "-n", "2", *_per_rank(rank1, "true")]
    job = run_job(cmd, job_env(KVDIST_TIMEOUT_S="15"), timeout_s=120)
    assert job.returncode != 0, job.output[-4000:]
    assert job.seconds < 60, (job.seconds, job.output[-4000:])
    if command == "cache":
        assert "ending the job" not in job.output, job.output[-4000:]
