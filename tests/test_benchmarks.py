"""The coordination benchmark and its two diagnostics run end to end under mpirun, with
few steps: their numbers are not checked (benchmarks are not timed tests), what they
assert about correctness is. Each compares implementations on the same steps and fails
when they disagree on which saves completed."""

from __future__ import annotations

import json
import sys

import pytest
from mp.jobs import REPO, job_env, run_job

MPIRUN_SH = str(REPO / "launch" / "mpirun.sh")
FEW_STEPS = ["--steps", "6", "--warmup", "2"]

pytestmark = pytest.mark.multirank


def test_coordination_benchmark_and_report(tmp_path) -> None:
    """`kvdist bench coordination` on 2 ranks: every size has all three implementations,
    they agree on every step's completions, kvdist and the per-step pickled pattern stay
    within 2 collectives per step, the other baseline makes one per finished request; the
    `report` step merges the part into the JSON and markdown that results/ holds."""
    part = tmp_path / "part.json"
    cmd = [MPIRUN_SH, "-n", "2", "kvdist", "bench", "coordination", "--sizes", "1,16"]
    job = run_job([*cmd, *FEW_STEPS, "--min-steps", "6", "--json", str(part)], job_env(), 180)
    assert job.returncode == 0, job.output[-4000:]
    rows = json.loads(part.read_text())["rows"]
    assert sorted((r["in_flight"], r["impl"]) for r in rows) == [
        (n, impl) for n in (1, 16) for impl in ("baseline", "kvdist", "pickled_step")
    ]
    assert all(r["completions_agree"] and r["steps"] == 6 for r in rows)
    by = {(r["in_flight"], r["impl"]): r for r in rows}
    assert all(
        by[n, impl]["collectives_per_step"] <= 2
        for n in (1, 16)
        for impl in ("kvdist", "pickled_step")
    )
    assert by[16, "baseline"]["collectives_per_step"] > 2  # 16 in flight: one finishes per step
    for n in (1, 16):
        kv = by[n, "kvdist"]
        assert kv["speedup_vs_pickled_step"] == pytest.approx(
            by[n, "pickled_step"]["median_us"] / kv["median_us"]
        )
    # The second speedup counts converting new prompts to int32, so it is never higher.
    for r in rows:
        if r["impl"] == "kvdist":
            assert r["speedup_with_admission"] <= r["speedup"], r

    merged, md = tmp_path / "merged.json", tmp_path / "merged.md"
    report = [sys.executable, "-m", "kvdist.bench.coordination", "report", str(part)]
    job = run_job([*report, "--json", str(merged), "--md", str(md)], job_env(), 60)
    assert job.returncode == 0, job.output[-4000:]
    assert json.loads(merged.read_text())["targets"]
    assert "## Targets" in md.read_text()


def test_coordination_timeline_and_floor(tmp_path) -> None:
    """The timeline prints every phase on both ranks; the floor step, kvdist and the
    baseline agree on completions at every step (the script raises otherwise)."""
    timeline = [MPIRUN_SH, "-n", "2", sys.executable, "benchmarks/coordination_timeline.py"]
    job = run_job([*timeline, "--in-flight", "16", *FEW_STEPS], job_env(), 180)
    assert job.returncode == 0, job.output[-4000:]
    assert "median step on rank 0" in job.output
    assert job.output.count("decode_plan") == 2  # rank 0 and rank 1

    out = tmp_path / "floor.json"
    floor = [MPIRUN_SH, "-n", "2", sys.executable, "benchmarks/coordination_floor.py"]
    args = ["--in-flight", "16", "--churn", "none", *FEW_STEPS, "--json", str(out)]
    job = run_job([*floor, *args], job_env(), 180)
    assert job.returncode == 0, job.output[-4000:]
    assert set(json.loads(out.read_text())["median_us"]) == {"kvdist", "floor", "baseline"}


def test_multiturn_benchmark_on_two_ranks(tmp_path) -> None:
    """`kvdist bench multiturn` on 2 ranks, tiny sizes: the device cache holds 2 of 6
    conversations, so later turns find their history evicted. With the cpu and tiered
    connectors every answer equals the run without connector, the histories are loaded
    rather than computed, and the fresh disk tier of the tiered run has no hit on the
    first turn (each connector gets its own directory). `--drop-page-cache` asks the
    kernel to drop the tiered run's disk files before the later turns, and no others."""
    out = tmp_path / "multiturn.json"
    cmd = [MPIRUN_SH, "-n", "2", "kvdist", "bench", "multiturn", "--conversations", "6"]
    sizes = ["--turns", "3", "--system-len", "32", "--user-len", "40", "--answer-len", "8"]
    args = ["--concurrency", "2", "--connectors", "cpu,tiered", "--out", str(out)]
    args.append("--drop-page-cache")
    job = run_job([*cmd, *sizes, *args], job_env(), 180)
    assert job.returncode == 0, job.output[-4000:]
    runs = {r["connector"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["none", "cpu", "tiered"]
    assert all(r["answers_identical"] == 18 for r in runs.values())
    none = runs["none"]["prompt_tokens"]
    assert none["loaded"] == 0
    for name in ("cpu", "tiered"):
        tokens = runs[name]["prompt_tokens"]
        assert tokens["loaded"] > 0 and tokens["computed"] < none["computed"], (name, tokens)
        assert runs[name]["max_collectives_per_step"] <= 2
    assert runs["tiered"]["prompt_tokens"]["computed"] >= 6 * 40  # turn 1's user messages
    dropped = {name: r["page_cache_dropped"]["files"] for name, r in runs.items()}
    assert dropped["none"] == dropped["cpu"] == 0 and dropped["tiered"] > 0, dropped


def test_shared_cache_benchmark_with_two_engines(tmp_path) -> None:
    """`kvdist bench shared-cache`: an engine of 1 rank and one of 2 on one directory of
    8 MiB for a few seconds. Every answer is the same whoever computed or loaded it, the
    engines filled the directory and evicted, loaded from the cache, and the directory
    was sampled. (An engine loads a prefix only the first time it meets it, so the pool
    has 32 prefixes, met throughout the run, and the capacity keeps saved blocks for a
    while: at 256 KiB and 8 prefixes they lived a fraction of a second, and 2 of 3 runs
    here loaded nothing.)"""
    out = tmp_path / "shared.json"
    cmd = [sys.executable, "-m", "kvdist.cli.main", "bench", "shared-cache", "--engines", "1,2"]
    args = ["--duration-s", "4", "--capacity", "8M", "--prefixes", "32", "--out", str(out)]
    job = run_job([*cmd, *args], job_env(), 240)
    assert job.returncode == 0, job.output[-4000:]
    res = json.loads(out.read_text())
    assert res["errors"] == 0 and res["answers_differing"] == 0
    assert res["served"] > 0 and res["evictions"] > 0 and res["tokens_loaded"] > 0, res
    assert res["series"] and max(ratio for _, ratio in res["series"]) >= 0.9, res["series"]
    assert [e["ranks"] for e in res["per_engine"]] == [1, 2]


def test_multiturn_repeats_summarise_each_round_against_its_own_baseline(tmp_path) -> None:
    """`--repeats 2` in one process: two rounds of (none, cpu), each round's cpu run
    compared with that round's none run, and every answer equal within its round."""
    from kvdist.bench.cli import run_benchmark
    from kvdist.bench.multiturn import format_summary, summarise

    out = tmp_path / "multiturn.json"
    args = ["--conversations", "4", "--turns", "2", "--system-len", "16", "--user-len", "24"]
    args += ["--answer-len", "4", "--concurrency", "2", "--repeats", "2", "--out", str(out)]
    assert run_benchmark("multiturn", args) == 0
    result = json.loads(out.read_text())
    assert [(r["round"], r["connector"]) for r in result["runs"]] == [
        (0, "none"), (0, "cpu"), (1, "none"), (1, "cpu"),
    ]  # fmt: skip
    assert all(r["answers_identical"] == 8 for r in result["runs"])
    # The run without connector is first in round 0 and last in round 1.
    assert [r["position"] for r in result["runs"]] == [0, 1, 1, 0]
    s = result["summary"]["cpu"]
    ratios = [result["runs"][i + 1]["wall_s"] / result["runs"][i]["wall_s"] for i in (0, 2)]
    assert s["rounds"] == 2
    assert s["wall_over_none_min"] == min(ratios) and s["wall_over_none_max"] == max(ratios)
    # The ratio is taken against the same round's baseline, not another round's; without
    # capture, graph capture in the timed turns is left out of both sides.
    # With shutdown, the wait for saves in flight after the turns counts on both sides.
    assert all(r["wall_s_with_shutdown"] == r["wall_s"] + r["shutdown_s"] for r in result["runs"])
    keys = ("wall_s", "wall_s_without_graph_capture", "wall_s_with_shutdown")
    fake = [
        {"round": 0, "connector": "none", **dict(zip(keys, (1.0, 1.0, 1.0)))},
        {"round": 0, "connector": "cpu", **dict(zip(keys, (2.0, 1.5, 3.0)))},
        {"round": 1, "connector": "none", **dict(zip(keys, (10.0, 8.0, 10.0)))},
        {"round": 1, "connector": "cpu", **dict(zip(keys, (5.0, 4.0, 6.0)))},
    ]
    got = summarise(fake)["cpu"]
    assert (got["wall_over_none_min"], got["wall_over_none_max"]) == (0.5, 2.0)
    assert got["wall_over_none_without_capture_min"] == 0.5
    assert got["wall_over_none_without_capture_max"] == 1.5
    assert (got["wall_over_none_with_shutdown_min"], got["wall_over_none_with_shutdown_max"]) == (
        0.6,
        3.0,
    )
    assert "| median with shutdown |" in format_summary(summarise(result["runs"]))


def test_multiturn_passes_disk_kwargs_to_the_disk_connector(capfd) -> None:
    """`--disk-kwargs` reaches the disk connector: a setting it refuses ends the run,
    naming the setting."""
    from kvdist.bench.cli import run_benchmark

    args = ["--conversations", "2", "--turns", "1", "--system-len", "16", "--user-len", "8"]
    args += ["--answer-len", "2", "--connectors", "disk", "--disk-kwargs", '{"io_threads": 0}']
    with pytest.raises(SystemExit) as exit_info:
        run_benchmark("multiturn", args)
    assert exit_info.value.code != 0
    assert "io_threads must be a positive integer, got 0" in capfd.readouterr().err


def test_engine_benchmark_with_a_configured_connector(tmp_path) -> None:
    """`kvdist bench engine` takes a connector with its settings (tiered needs its tiers)
    and reports the step split and the control plane."""
    from kvdist.bench.cli import run_benchmark

    tiers = {"tiers": [{"name": "cpu"}, {"name": "disk", "kwargs": {"path": str(tmp_path)}}]}
    out = tmp_path / "engine.json"
    args = ["--requests", "3", "--prompt-len", "40", "--max-tokens", "3", "--out", str(out)]
    args += ["--connector", "tiered", "--connector-kwargs", json.dumps(tiers)]
    assert run_benchmark("engine", args) == 0
    r = json.loads(out.read_text())
    assert r["connector"] == "tiered" and r["steps"] >= 3 and not r["cuda_graphs"]
    assert r["control_collectives_max_per_step"] <= 2
    assert 0 <= r["control_ms_mean"] <= r["step_ms_mean"]
    assert r["overhead_percentile_steps"] == r["steps"]  # the timed call's, not the warmup's


def test_the_coordination_benchmark_checks_the_plans_the_ranks_receive() -> None:
    """What a rank decodes is compared with the plan rank 0 built from the same step: a
    changed token, block or metadata byte is caught (`plans_received_intact`)."""
    from kvdist.bench.coordination import _kv_meta, _plan, _plan_received
    from kvdist.bench.coordination_workload import Workload
    from kvdist.wire.codec import decode_plan, encode_plan

    wl = Workload(64, 0)
    for _ in range(5):
        data = wl.next_step()
    plan = _plan(data)
    plan.connector_meta = _kv_meta(data)
    assert _plan_received(decode_plan(encode_plan(plan)), data)
    got = decode_plan(encode_plan(plan))
    got.scheduler_output.cached_requests.tokens[0] += 1
    assert not _plan_received(got, data)
    got = decode_plan(encode_plan(plan))
    got.connector_meta["save"] = got.connector_meta["save"][1:]
    assert not _plan_received(got, data)


def test_transfer_benchmark_measures_every_path_and_checks_its_bytes(tmp_path) -> None:
    """`kvdist bench transfer --quick` on the CPU: the contiguous ceiling, the batched
    transfer to one host buffer and to scattered pool slots (the cpu connector's path),
    each a positive rate, after the run checked that both paths copied the right bytes."""
    from kvdist.bench.cli import run_benchmark

    out = tmp_path / "transfer.json"
    assert run_benchmark("transfer", ["--quick", "--heads", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    for path in ("contiguous", "batched", "slots", "naive"):
        for kind in ("save", "load"):
            assert row[f"{path}_{kind}_gbps"] > 0, (path, kind)
    assert row["slots_load_pct_of_contiguous"] > 0


def test_transfer_benchmark_places_pool_rows_in_runs() -> None:
    """`--slot-run N`: the slots rows are runs of N consecutive pool rows, distinct, within
    the pool (twice the blocks), one host copy per run unless two runs happen to touch."""
    from kvdist.bench.transfer import _pool_rows
    from kvdist.kv.transfer import row_runs

    for n, run in ((64, 1), (64, 4), (63, 8), (5, 16)):
        rows = _pool_rows(n, run)
        assert len(rows) == n and len(set(rows)) == n and min(rows) >= 0 and max(rows) < 2 * n
        if run > 1:
            assert len(row_runs(rows)) <= -(-n // run)


def test_cpu_pool_benchmark_counts_copies_in_both_orders(tmp_path) -> None:
    """`kvdist bench cpu-pool`: a request saved into slots 0-3 and evicted by the next one
    gives that one slots 3, 2, 1, 0: one copy in slot order, four in the order given; the
    whole run's counts, on a pool that turns over, favour slot order."""
    import argparse

    from kvdist.bench.cli import run_benchmark
    from kvdist.bench.cpu_pool import _Counts, _key
    from kvdist.connectors.cpu.slots import SlotMap

    slots, counts = SlotMap(4), _Counts()
    counts.request(slots, [_key("a", i) for i in range(4)])
    counts.request(slots, [_key("b", i) for i in range(4)])
    assert [slots.get(_key("b", i)) for i in range(4)] == [3, 2, 1, 0]
    assert (counts.save_copies_slot_order, counts.save_copies_given_order) == (2, 5)
    counts.request(slots, [_key("b", i) for i in range(4)])  # found, in chain order
    assert (counts.load_copies_slot_order, counts.load_copies_given_order) == (1, 4)
    assert counts.found == 4 and counts.looked_up == 12

    out = tmp_path / "pool.json"
    args = ["--slots", "256", "--conversations", "200", "--requests", "2000", "--out", str(out)]
    assert run_benchmark("cpu-pool", args) == 0
    result = json.loads(out.read_text())
    assert result["evictions"] > 0 and 0 < result["hit_rate"] < 1
    for kind in ("save", "load"):
        per = result["blocks_per_copy"][kind]
        assert per["slot_order"] > per["given_order"] >= 1, (kind, per)
    with pytest.raises(ValueError, match="--slots"):
        from kvdist.bench.cpu_pool import simulate

        simulate(
            argparse.Namespace(
                slots=0,
                conversations=1,
                requests=1,
                turn_blocks=1,
                max_turns=1,
                system_blocks=0,
                zipf=1.0,
                seed=0,
            )
        )


@pytest.mark.parametrize(
    "args, said",
    [
        (["--engines", "abc"], "--engines: expected an integer"),
        (["--engines", "1,0"], "--engines: must be at least 1"),
        (["--duration-s", "-1"], "--duration-s: must be a positive number of seconds"),
        (["--affinity", "2"], "--affinity: must be from 0 to 1"),
    ],
)
def test_shared_cache_benchmark_refuses_bad_arguments(args, said, capsys) -> None:
    """Bad options are named before any engine starts (they were tracebacks from every
    engine, or a run that served nothing and passed)."""
    from kvdist.bench.cli import run_benchmark

    with pytest.raises(SystemExit):
        run_benchmark("shared-cache", args)
    assert said in capsys.readouterr().err
    with pytest.raises(ValueError, match="--capacity '0': must be at least one byte"):
        run_benchmark("shared-cache", ["--capacity", "0"])
