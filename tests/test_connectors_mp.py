"""Built-in connectors in the engine at 1, 2 and 4 ranks: the persistent disk cache read
back at other TP sizes, corruption recomputed, two engines on one directory, the cpu and
tiered connectors. Every check compares tokens with a run that loaded nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from checkpoints import tiny_with_kv_heads
from mp.jobs import launch, run_job, scenario_env

HERE = Path(__file__).parent
WORKER = HERE / "mp" / "engine_worker.py"
pytestmark = pytest.mark.multirank


def _cmd(n: int, scenario: str, out: Path) -> list[str]:
    return launch(n, str(WORKER), f"connectors:{scenario}", str(out))


def run(n: int, scenario: str, cache: Path, tmp: Path, **env: str) -> list[dict]:
    out = tmp / f"{scenario}-{n}-{len(list(tmp.iterdir()))}.json"
    env = scenario_env(KVDIST_TEST_CACHE_DIR=str(cache), **env)
    job = run_job(_cmd(n, scenario, out), env, 300)
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
    # By shutdown, rank 0 heard from both ranks that each block it planned was stored.
    assert [r["io"]["blocks_saved"] for r in written] == [written[0]["confirmed"]] * 2
    for n in (1, 4):
        read = run(n, "disk_read", cache, tmp_path)
        for r in read:
            assert r["tokens"] == base, f"TP {n}"
            assert r["external"][:4] == [32] * 4, r["external"]
            assert r["io"]["load_failures"] == 0
        assert read[0]["leaked"] == 0


def test_disk_round_trip_on_a_qwen3_model(tmp_path) -> None:
    """Qwen3 (q/k norms before RoPE, head_dim apart from hidden_size) at TP 2: blocks saved
    by one engine are loaded by the next, and both give the tokens of a run without
    connector. A failure means the KV the connector moves is not the KV attention reads."""
    cache = tmp_path / "cache"
    model = {"KVDIST_TEST_MODEL": "tiny-qwen3"}
    base = run(2, "no_connector", cache, tmp_path, **model)[0]["tokens"]
    assert all(r["tokens"] == base for r in run(2, "disk_write", cache, tmp_path, **model))
    for r in run(2, "disk_read", cache, tmp_path, **model):
        assert r["tokens"] == base
        assert r["external"][:4] == [32] * 4, r["external"]


@pytest.mark.parametrize("n,heads", [(2, 1), (4, 2)])
def test_replicated_kv_heads_are_written_once(n, heads, tmp_path) -> None:
    """More ranks than KV heads (1 head over 2 ranks, 2 over 4): the ranks holding one
    head hold the same bytes, so only the first of them writes, and each block gets one
    record per head. Engines at this TP size and at TP 1 then load every block and give
    the tokens of a run without connector. A failure means replicas write each record
    twice, or a replicated rank loads or computes with another head's KV."""
    model = str(tiny_with_kv_heads(tmp_path / "model", heads))
    cache = tmp_path / "cache"
    base = run(n, "no_connector", cache, tmp_path, KVDIST_TEST_MODEL=model)[0]["tokens"]
    written = run(n, "disk_write", cache, tmp_path, KVDIST_TEST_MODEL=model)
    replicas = n // heads
    saved = [r["io"]["blocks_saved"] for r in written]
    assert all(saved[r] > 0 for r in range(0, n, replicas)), saved  # the first of each head
    assert all(saved[r] == 0 for r in range(n) if r % replicas), saved  # the other replicas
    assert written[0]["confirmed"] == saved[0], "rank 0 heard from each head's writer"
    assert all(r["tokens"] == base for r in written)
    per_block = Counter(p.parent for p in cache.rglob("*.kvb"))
    assert per_block and set(per_block.values()) == {heads}, per_block
    for m in (n, 1):
        for r in run(m, "disk_read", cache, tmp_path, KVDIST_TEST_MODEL=model):
            assert r["tokens"] == base, f"read at TP {m}"
            assert r["external"][:4] == [32] * 4, r["external"]
            assert r["io"]["load_failures"] == 0


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
    before = _verify(cache)
    assert before.returncode == 1, before.stdout  # corrupt records are reported
    read = run(2, "disk_read", cache, tmp_path)
    for r in read:
        assert r["tokens"] == base
    assert sum(r["io"]["load_failures"] for r in read) > 0
    assert read[0]["leaked"] == 0
    # The ranks deleted the corrupt records they read (their blocks are saved again).
    after = _verify(cache)

    def corrupt(out):
        return int(re.search(r"(\d+) corrupt", out.stdout).group(1))

    assert corrupt(after) < corrupt(before), (before.stdout, after.stdout)


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
    """The pinned-CPU pool serves a second pass (device prefix cache off) on every rank,
    loading within the steps that schedule the requests: the 37 prompt tokens left after
    the hits take two prefill steps at the 24-token budget, then the last request decodes
    its other 7 tokens, 9 steps in all. A failure of the step count means hits wait for a
    later step (with `load_async`: 10), which costs more than recomputing on a GPU."""
    for r in run(n, "cpu_roundtrip", tmp_path, tmp_path):
        assert r["second"] == r["base"] == r["first"]
        assert r["external"][:4] == [32] * 4
        assert r["max_collectives"] <= 2
        assert r["second_steps"] == r["max_tokens"] + 1, r["second_steps"]


@pytest.mark.parametrize("n", [1, 2])
def test_tiered_cpu_in_front_of_disk(n, tmp_path) -> None:
    """A new engine's empty cpu tier falls through to disk; tokens unchanged."""
    for r in run(n, "tiered_roundtrip", tmp_path / "cache", tmp_path):
        assert r["second"]["tokens"] == r["first"]["tokens"]
        assert r["second"]["external"][:4] == [32] * 4
        assert r["second"]["leaked"] in (0, -1)


def test_cpu_and_tiered_with_a_replicated_kv_head(tmp_path) -> None:
    """One KV head over 2 ranks: each rank's pinned pool holds its own copy of the head,
    and the tiered connector (cpu in front of a disk tier only rank 0 writes) serves a new
    engine from disk; tokens as without a hit either way."""
    model = str(tiny_with_kv_heads(tmp_path / "model", 1))
    for r in run(2, "cpu_roundtrip", tmp_path, tmp_path, KVDIST_TEST_MODEL=model):
        assert r["second"] == r["base"] == r["first"]
        assert r["external"][:4] == [32] * 4
    tiered = run(2, "tiered_roundtrip", tmp_path / "cache", tmp_path, KVDIST_TEST_MODEL=model)
    for r in tiered:
        assert r["second"]["tokens"] == r["first"]["tokens"]
        assert r["second"]["external"][:4] == [32] * 4


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
