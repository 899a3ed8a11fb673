"""Random restarts of an engine on one disk cache (the `disk` connector, or `tiered` with a
small cpu tier in front of it), with the cache damaged between runs.

Each seed draws an engine (few blocks, so requests preempt; chunked prefill; prefix
caching on or off; a block size; a load-failure policy), the disk settings (a capacity of
a few blocks, so saves evict, or none; records written by an IO process or by threads),
and two or three runs, each a fresh engine on the same directory with prompts sharing
prefixes and aborts at random steps. Before a run some records may be damaged (truncated,
a byte flipped, one block's record copied over another's, deleted, a stray temporary
file): `kvdist cache verify` must then name exactly the records left corrupt. After every
run: each request that ran to its length has the tokens of a run without connector, with
no more cached and loaded tokens than its prompt; no block is left in use; no load failed
unless a corrupt record was there to fail it; and, with no capacity bound and nothing
damaged, a prompt finished in an earlier run finds its full blocks in the next run's
first call (a fresh engine has them on disk only). A failure names its seed (`_draw(seed)`
is what it drew); the script this comes from ran hundreds of seeds, at TP 2 too.
"""

from __future__ import annotations

import os
import random

import pytest
from test_engine_fuzz import check_blocks

from kvdist.connectors.disk.maintenance import verify_cache
from kvdist.engine.llm import LLM
from kvdist.engine.sampling import SamplingParams

SEEDS = range(10)
MAX_TOKENS = 6
BLOCK_BYTES = 4 * 2 * 4 * 16 * 4  # tiny: layers * (k, v) * kv heads * head dim * float32


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    prefixes = [
        [(7 + p * 61 + k * 3) % 500 + 5 for k in range(n)] for p, n in enumerate([16, 33, 48])
    ]
    return [
        prefixes[i % 3] + [rng.randrange(5, 505) for _ in range(rng.choice([1, 9, 20]))]
        for i in range(8)
    ]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    llm = LLM("tiny", num_blocks=256)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    llm.shutdown()
    return [o.output_token_ids for o in outs]


def _draw(seed: int) -> dict:
    rng = random.Random(seed)
    bs = rng.choice([8, 16])
    need = -(-(max(map(len, PROMPTS)) + MAX_TOKENS) // bs)
    engine = {
        "block_size": bs,
        "num_blocks": rng.choice([need, 2 * need]),
        "max_num_batched_tokens": rng.choice([16, 64, 2048]),
        "enable_prefix_caching": rng.random() < 0.5,
        "max_num_seqs": rng.choice([2, 256]),
        "load_failure_policy": rng.choice(["recompute", "fail"]),
    }
    block = bs * BLOCK_BYTES + 400
    disk = {
        "capacity_bytes": rng.choice([None, None, 3 * block, 12 * block]),
        "writer_process": rng.random() < 0.5,
        "rescan_s": rng.choice([None, 0.05]),
    }
    tiered = rng.random() < 0.4
    runs = []
    for r in range(rng.randint(2, 3)):
        runs.append(
            {
                "prompts": rng.sample(range(len(PROMPTS)), rng.randrange(2, 6)),
                "abort_p": rng.choice([0, 0, 0.1]),
                "damage": [rng.choice(_DAMAGE) for _ in range(rng.randrange(1, 3))]
                if r and rng.random() < 0.5
                else [],
                "pick": rng.random(),
            }
        )
    return {"engine": engine, "disk": disk, "tiered": tiered, "runs": runs}


def _records(root: str) -> list[str]:
    return sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".kvb")
    )


def _read(path: str) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read())


def _damage(root: str, kind: str, pick: float, corrupt: set[str]) -> None:
    """Damage one record not damaged yet (`corrupt`: those left corrupt, updated)."""
    recs = [r for r in _records(root) if r not in corrupt]
    if not recs:
        return
    path = recs[int(pick * len(recs))]
    data = _read(path)
    if kind == "delete":
        os.unlink(path)
        return
    if kind == "temp":  # a write that died: not a record, never read
        with open(os.path.join(os.path.dirname(path), ".h0-4of4.kvb.dead-1.tmp"), "wb") as f:
            f.write(data[: len(data) // 2])
        return
    if kind == "truncate":
        data = data[: int(pick * len(data))]
    elif kind == "flip":
        data[int(pick * len(data))] ^= 0x10
    elif kind == "swap":  # another block's sound record in this one's place
        others = [r for r in recs if os.path.dirname(r) != os.path.dirname(path)]
        if not others:
            return
        data = _read(others[0])
    with open(path, "wb") as f:
        f.write(data)
    corrupt.add(path)


_DAMAGE = ["truncate", "flip", "swap", "delete", "temp"]


def _corrupt_now(root: str) -> set[str]:
    if not any(len(n) == 16 for n in os.listdir(root)):
        return set()  # no namespace yet
    report = verify_cache(root)
    assert not report.unchecked, report.unchecked
    return {path for path, _ in report.corrupt}


@pytest.mark.parametrize("seed", SEEDS)
def test_restarts_on_a_damaged_cache_keep_the_outputs(seed: int, reference, tmp_path) -> None:
    draw = _draw(seed)
    rng = random.Random(seed + 1000)
    root = str(tmp_path / "cache")
    disk = {"name": "disk", "kwargs": {"path": root, **draw["disk"]}}
    if draw["disk"]["capacity_bytes"] is None:
        del disk["kwargs"]["capacity_bytes"]
    conn = disk
    if draw["tiered"]:
        cpu = {
            "name": "cpu",
            "kwargs": {"capacity_bytes": 3 * BLOCK_BYTES * draw["engine"]["block_size"]},
        }
        conn = {"name": "tiered", "kwargs": {"tiers": [cpu, disk]}}
    engine = dict(draw["engine"])
    bs = engine.pop("block_size")
    corrupt: set[str] = set()
    done: set[int] = set()
    damaged = False
    for r, run in enumerate(draw["runs"]):
        for kind in run["damage"]:
            _damage(root, kind, run["pick"], corrupt)
        damaged = damaged or any(k != "temp" for k in run["damage"])
        if run["damage"]:
            assert _corrupt_now(root) == corrupt, f"seed {seed} run {r}: verify after damage"
        before = set(corrupt)
        llm = LLM("tiny", connector=conn, block_size=bs, **engine)

        def on_step(llm: LLM, step: int, p: float = run["abort_p"]) -> None:
            check_blocks(llm)
            assert step < 2000, "no end after 2000 steps: the engine is stuck"
            if rng.random() < p:
                llm.abort_request(f"req-{rng.randrange(llm._num_requests)}")

        prompts = [PROMPTS[i] for i in run["prompts"]]
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate(prompts, params, on_step=on_step)
        llm.shutdown()
        stats = llm.stats
        where = f"seed {seed} run {r}"
        assert llm.num_used_blocks() == 0, f"{where}: blocks leaked"
        failed = stats["load_failures"] > 0
        for i, out in zip(run["prompts"], outs):
            assert out.num_cached_tokens + out.num_external_tokens < len(PROMPTS[i]), where
            if out.finish_reason == "length":
                assert out.output_token_ids == reference[i], f"{where}: {out.request_id}"
            else:
                assert out.finish_reason == "abort" or failed, f"{where}: {out}"
        assert not (failed and not before), f"{where}: loads failed with no corrupt record"
        if draw["disk"]["capacity_bytes"] is None and not damaged:
            for i, out in zip(run["prompts"], outs):
                if i in done and out.finish_reason == "length":
                    found = out.num_cached_tokens + out.num_external_tokens
                    assert found >= (len(PROMPTS[i]) - 1) // bs * bs, f"{where}: {out} missed"
                    break  # the first such request; later ones may share its prefix
        done |= {i for i, o in zip(run["prompts"], outs) if o.finish_reason == "length"}
        corrupt &= _corrupt_now(root)  # those the engine read were removed
        assert _corrupt_now(root) == corrupt, f"{where}: verify finds records nobody damaged"


def test_the_seeds_cover_the_cases() -> None:
    """The seeds draw both connectors, bounded and unbounded capacities, both IO paths,
    prefix caching on and off, every kind of damage, and a restart whose hits are
    checked (no bound, nothing damaged, a prompt of an earlier run): otherwise the test
    above could pass by never meeting what it checks."""
    draws = [_draw(seed) for seed in SEEDS]
    assert {d["tiered"] for d in draws} == {False, True}
    assert {d["disk"]["capacity_bytes"] is None for d in draws} == {False, True}
    assert {d["disk"]["writer_process"] for d in draws} == {False, True}
    assert {d["engine"]["enable_prefix_caching"] for d in draws} == {False, True}
    assert {k for d in draws for r in d["runs"] for k in r["damage"]} == set(_DAMAGE)

    def hits_checked(d: dict) -> bool:
        runs = d["runs"]
        return d["disk"]["capacity_bytes"] is None and any(
            not any(r["damage"] for r in runs[: i + 1])
            and set(runs[i]["prompts"]) & {p for r in runs[:i] for p in r["prompts"]}
            for i in range(1, len(runs))
        )

    assert any(hits_checked(d) for d in draws)
