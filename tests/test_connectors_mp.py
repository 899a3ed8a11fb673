"""Built-in connectors in the engine at 1, 2 and 4 ranks: the persistent disk cache read
back at other TP sizes, corruption recomputed, two engines on one directory, the cpu and
tiered connectors. Every check compares tokens with a run that loaded nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mp.jobs import launch, run_job, scenario_env

HERE = Path(__file__).parent
WORKER = HERE / "mp" / "engine_worker.py"
pytestmark = pytest.mark.multirank


def _cmd(n: int, scenario: str, out: Path) -> list[str]:
    return launch(n, str(WORKER), f"connectors:{scenario}", str(out))


def run(n: int, scenario: str, cache: Path, tmp: Path) -> list[dict]:
    out = tmp / f"{scenario}-{n}-{len(list(tmp.iterdir()))}.json"
    job = run_job(_cmd(n, scenario, out), scenario_env(KVDIST_TEST_CACHE_DIR=str(cache)), 300)
    assert job.returncode == 0, job.output[-6000:]
    return json.loads(out.read_text())[scenario]


def _verify(cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvdist.cli.main", "cache", "verify", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_disk_cache_written_at_tp2_reads_at_tp1_and_tp4(tmp_path) -> None:
    """Each rank writes its own head range; a block is served to any TP size, which reads
    the slices it needs. A wrong slice would change the tokens."""
    cache = tmp_path / "cache"
    written = run(2, "disk_write", cache, tmp_path)
    base = written[0]["tokens"]
    assert sum(r["io"]["blocks_saved"] for r in written) > 0
    for n in (1, 4):
        read = run(n, "disk_read", cache, tmp_path)
        for r in read:
            assert r["tokens"] == base, f"TP {n}"
            assert r["external"][:4] == [32] * 4, r["external"]
            assert r["io"]["load_failures"] == 0
        assert read[0]["leaked"] == 0


def test_corrupt_records_are_recomputed_never_served(tmp_path) -> None:
    """Flipped payload bytes and a deleted shard: those blocks fail their checks and are
    recomputed; the tokens stay those of a run without cache."""
    cache = tmp_path / "cache"
    base = run(2, "disk_write", cache, tmp_path)[0]["tokens"]
    records = sorted(cache.rglob("*.kvb"))
    assert records, "the write run left no records"
    for path in records[::3]:
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF  # inside the payload: only the checksum can tell
        path.write_bytes(bytes(data))
    records[1].unlink()
    read = run(2, "disk_read", cache, tmp_path)
    for r in read:
        assert r["tokens"] == base
    assert sum(r["io"]["load_failures"] for r in read) > 0
    assert read[0]["leaked"] == 0
    verify = _verify(cache)
    assert verify.returncode == 1, verify.stdout  # corrupt records are reported


def test_two_engines_share_one_directory(tmp_path) -> None:
    """Two 2-rank engines write the same blocks into one directory at the same time; the
    directory stays valid and a third engine is served from it."""
    cache = tmp_path / "cache"
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    env = scenario_env(KVDIST_TEST_CACHE_DIR=str(cache))
    with ThreadPoolExecutor(2) as pool:  # both jobs at once, each with its hard timeout
        jobs = list(pool.map(lambda o: run_job(_cmd(2, "disk_write", o), env, 300), outs))
    for job in jobs:
        assert job.returncode == 0, job.output[-6000:]
    results = [json.loads(o.read_text())["disk_write"] for o in outs]
    assert results[0][0]["tokens"] == results[1][0]["tokens"]
    verify = _verify(cache)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    read = run(2, "disk_read", cache, tmp_path)
    assert read[0]["tokens"] == results[0][0]["tokens"]
    assert read[0]["external"][:4] == [32] * 4


@pytest.mark.parametrize("n", [1, 2, 4])
def test_cpu_connector_round_trip(n, tmp_path) -> None:
    """The pinned-CPU pool serves a second pass (device prefix cache off) on every rank."""
    for r in run(n, "cpu_roundtrip", tmp_path, tmp_path):
        assert r["second"] == r["base"] == r["first"]
        assert r["external"][:4] == [32] * 4
        assert r["max_collectives"] <= 2


@pytest.mark.parametrize("n", [1, 2])
def test_tiered_cpu_in_front_of_disk(n, tmp_path) -> None:
    """A new engine's empty cpu tier falls through to disk; tokens unchanged."""
    for r in run(n, "tiered_roundtrip", tmp_path / "cache", tmp_path):
        assert r["second"]["tokens"] == r["first"]["tokens"]
        assert r["second"]["external"][:4] == [32] * 4
        assert r["second"]["leaked"] in (0, -1)


def test_shared_prefix_is_loaded_once_per_step(tmp_path) -> None:
    """Requests sharing a prefix that is being loaded wait for that load and then hit the
    device prefix cache, instead of each loading their own copy."""
    cache = tmp_path / "cache"
    base = run(1, "disk_write", cache, tmp_path)[0]
    shared = run(1, "disk_read_shared", cache, tmp_path)[0]
    assert shared["tokens"] == base["tokens"]
    assert shared["external"][0] == 32 and shared["external"][1:4] == [0, 0, 0]
    assert shared["cached"][1:4] == [32, 32, 32]
    assert shared["io"]["blocks_loaded"] == 2
