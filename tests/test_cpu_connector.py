"""The `cpu` connector: rank 0's slot map, LRU eviction, pins, and every rank's pool
mirroring the map (simulated ranks in one process)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from devices import DEVICES

from kvdist.api.types import SchedulerOutput
from kvdist.connectors import create_connector
from kvdist.connectors.cpu.settings import slot_bytes
from kvdist.connectors.testing import (
    SimulatedRanks,
    make_request,
    new_request_output,
    shard,
    tp_context,
)
from kvdist.engine.sampling import SamplingParams
from kvdist.kv.layout import host_memory_bytes

BS = 4


def cpu(slots, world=2, **settings):
    capacity = slots * slot_bytes(tp_context(0, world))
    return {"name": "cpu", "kwargs": {"capacity_bytes": capacity, **settings}}


def save(ranks, rid, tokens, block_ids, step=0):
    req = make_request(rid, tokens, ranks.ctx)
    ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ranks.scheduler.update_state_after_alloc(req, block_ids, 0)
    ranks.step(new_request_output(step, req, block_ids, 0, len(tokens)))
    assert ranks.scheduler.request_finished(req, block_ids) is False
    return req


def load(ranks, rid, tokens, block_ids, step=10, finish=True):
    req = make_request(rid, tokens, ranks.ctx)
    n, is_async = ranks.scheduler.get_num_new_matched_tokens(req, 0)
    ext = min(n, len(tokens) - 1)
    ranks.scheduler.update_state_after_alloc(req, block_ids, ext)
    if ext:
        # Synchronous loads are in place once the step's layers waited for them.
        assert is_async == ranks.workers[0].settings.load_async
        ranks.step(SchedulerOutput(step=step))
        if is_async:
            assert ranks.wait(started={rid}) == set()
    if finish:
        ranks.scheduler.request_finished(req, block_ids)
    return n


@pytest.mark.parametrize("load_async", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_on_every_rank(full, device, load_async):
    """Blocks saved into the pools come back into other device blocks on every rank, each
    rank with its head slice, loaded within the step (the default: each layer waits for
    its blocks) or beside it; a failure means the pools and the map disagree."""
    full = full.to(device)
    writer_blocks = [5, 9, 2]
    ranks = SimulatedRanks(cpu(8, load_async=load_async), 2, full, fill=True, device=device)
    save(ranks, "a", list(range(13)), writer_blocks + [11])
    for kv in ranks.caches:
        kv.zero_()  # the device copy is gone; only the pools hold the blocks
    assert load(ranks, "b", list(range(13)), [1, 3, 4, 6]) == 12
    for ctx, kv in zip(ranks.ctxs, ranks.caches):
        ref = shard(full, ctx)
        for src, dst in zip(writer_blocks, [1, 3, 4]):
            assert torch.equal(kv[:, :, dst], ref[:, :, src])
        assert torch.all(kv[:, :, 6] == 0)
    assert ranks.workers[1].stats["blocks_loaded"] == 3
    assert ranks.scheduler.stats["hits"] == 3
    ranks.shutdown()


def test_blocks_move_in_slot_order_one_copy_per_run(full):
    """A request saved into slots 0-3 is evicted last block first, so the next request's
    blocks get slots 3, 2, 1, 0 and its loads list them in chain order: the workers move
    them in slot order, one host copy for the four (four, in the order given), and each
    block still lands in its own slot and comes back into its own device block."""
    ranks = SimulatedRanks(cpu(4), 2, full, fill=True)
    save(ranks, "a", list(range(17)), [0, 1, 2, 3, 4])
    b_tokens = list(range(100, 117))
    b_blocks = [5, 6, 7, 8, 9]
    save(ranks, "b", b_tokens, b_blocks, step=1)
    keys = make_request("b", b_tokens, ranks.ctx).block_hashes
    assert [ranks.scheduler.slots.get(k) for k in keys] == [3, 2, 1, 0]
    for w in ranks.workers:
        assert (w.stats["blocks_saved"], w.stats["save_copies"]) == (8, 2)
    for kv in ranks.caches:
        kv.zero_()
    assert load(ranks, "c", b_tokens, [10, 11, 12, 13, 14], step=2) == 16
    for ctx, kv, w in zip(ranks.ctxs, ranks.caches, ranks.workers):
        ref = shard(full, ctx)
        for src, dst in zip(b_blocks[:4], [10, 11, 12, 13]):
            assert torch.equal(kv[:, :, dst], ref[:, :, src])
        assert (w.stats["blocks_loaded"], w.stats["load_copies"]) == (4, 1)
    ranks.shutdown()


def test_lru_eviction_and_hit_answers(full):
    """With 4 slots, a third 2-block prompt evicts the least recently used one; a hit
    refreshes a prompt; hit answers stop at the first missing block."""
    ranks = SimulatedRanks(cpu(4), 2, full, fill=True)
    a, b, c = (list(range(k, k + 9)) for k in (0, 100, 200))
    save(ranks, "a", a, [0, 1, 2], step=0)
    save(ranks, "b", b, [3, 4, 5], step=1)
    assert load(ranks, "a-hit", a, [10, 11, 12], step=2) == 8  # a is now most recent
    save(ranks, "c", c, [6, 7, 8], step=3)
    sched = ranks.scheduler
    answers = {
        name: sched.get_num_new_matched_tokens(make_request(name, t, ranks.ctx), 0)
        for name, t in (("a", a), ("b", b), ("c", c))
    }
    # A hit is loaded within the step that schedules it (not async) by default.
    assert answers == {"a": (8, False), "b": (0, False), "c": (8, False)}
    assert sched.stats["evictions"] == 2
    # After the on-device prefix: asking from block 1 counts from there.
    assert sched.get_num_new_matched_tokens(make_request("a", a, ranks.ctx), BS) == (4, False)
    ranks.shutdown()


def test_eviction_takes_a_prompts_last_blocks_first(full):
    """With 4 slots, a 4-block prompt A fills the pool; B's 2 blocks must evict A's last
    two, so A's first two still hit (8 tokens). Evicting A's first blocks, the least
    recently touched when a request's blocks are touched in order, would leave A's other
    blocks unreachable (a hit needs every block before it) while they keep their slots."""
    ranks = SimulatedRanks(cpu(4), 2, full, fill=True)
    a, b = list(range(0, 17)), list(range(100, 109))
    save(ranks, "a", a, [0, 1, 2, 3, 4], step=0)
    save(ranks, "b", b, [5, 6, 7], step=1)
    sched = ranks.scheduler
    assert sched.stats["evictions"] == 2
    assert sched.get_num_new_matched_tokens(make_request("a2", a, ranks.ctx), 0) == (8, False)
    assert sched.get_num_new_matched_tokens(make_request("b2", b, ranks.ctx), 0) == (8, False)
    # A hit touches its blocks the same way: A's first block is now the most recent.
    assert load(ranks, "a3", a, [10, 11, 12, 13, 14], step=2) == 8
    save(ranks, "c", list(range(200, 205)), [15, 16], step=3)  # 1 block: evicts B's last
    assert sched.get_num_new_matched_tokens(make_request("a4", a, ranks.ctx), 0) == (8, False)
    assert sched.get_num_new_matched_tokens(make_request("b3", b, ranks.ctx), 0) == (4, False)
    ranks.shutdown()


def test_a_prompt_saved_over_several_steps_is_evicted_last_block_first(full):
    """A's 4 blocks are saved in two chunked-prefill steps (0-1, then 2-3), so within its
    life the second chunk is more recent than the first. Once A finishes, its blocks are
    ordered last-first: B's 1 block evicts A's block 3, and A's first 3 blocks still hit."""
    from kvdist.api.step import RequestBatch

    ranks = SimulatedRanks(cpu(4, world=1), 1, full, fill=True)
    sched = ranks.scheduler
    a, blocks = list(range(0, 17)), [0, 1, 2, 3, 4]
    req = make_request("a", a, ranks.ctx)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, blocks, 0)
    ranks.step(new_request_output(0, req, blocks, 0, 8))  # blocks 0 and 1
    rest = RequestBatch()
    rest.add("a", [], [], 8, 9)  # blocks 2 and 3
    ranks.step(SchedulerOutput(step=1, cached_requests=rest))
    assert sched.request_finished(req, blocks) is False
    save(ranks, "b", list(range(100, 105)), [5, 6], step=2)
    assert sched.stats["evictions"] == 1
    assert sched.get_num_new_matched_tokens(make_request("a2", a, ranks.ctx), 0) == (12, False)
    ranks.shutdown()


@pytest.mark.parametrize("slots, chunk", [(4, 16), (2, 32), (2, 2048)])
def test_a_prompt_longer_than_the_pool_keeps_its_first_blocks(slots, chunk):
    """A 5-block prompt through a pool of fewer slots, prefilled `chunk` tokens a step:
    its later chunks must not evict its own first blocks (they were the least recently
    used), which would leave the pool holding blocks no lookup can reach; the pool keeps
    the first `slots` blocks, and the same prompt again loads them, and again (saving
    the blocks a hit computed must not evict the ones it loaded)."""
    import kvdist
    from kvdist.kv.hashing import block_hashes

    llm = kvdist.LLM(
        "tiny",
        connector={"name": "cpu", "kwargs": {"capacity_bytes": slots * 32768}},
        num_blocks=64,
        enable_prefix_caching=False,
        max_num_batched_tokens=chunk,
    )
    prompt = list(range(1, 82))  # 5 full blocks of 16, and a token
    once = SamplingParams(max_tokens=1)
    llm.generate([prompt], once)
    keys = block_hashes(prompt, 16, llm.namespace)
    held = [i for i, k in enumerate(keys) if llm.connector_scheduler.slots.get(k) is not None]
    (again,) = llm.generate([prompt], once)
    (third,) = llm.generate([prompt], once)
    llm.shutdown()
    assert held == list(range(slots)), held
    assert again.num_external_tokens == 16 * slots, again
    assert third.num_external_tokens == 16 * slots, third


def test_a_hit_keeps_the_blocks_it_loaded_when_saving_the_rest(full):
    """A 4-block prompt through a 2-slot pool keeps its first 2 blocks. The same prompt
    again loads them and computes blocks 2-3, which are then offered for saving: they must
    not evict blocks 0-1 (its own prefix, in the pool before the step), which would leave
    the pool holding blocks no lookup can reach. A failure means every other run of a
    prompt longer than the pool misses."""
    from kvdist.api.step import RequestBatch

    ranks = SimulatedRanks(cpu(2, world=1), 1, full, fill=True)
    sched = ranks.scheduler
    toks = list(range(17))  # 4 full blocks and a token
    save(ranks, "a", toks, [0, 1, 2, 3, 4])
    assert sched.get_num_new_matched_tokens(make_request("x", toks, ranks.ctx), 0) == (8, False)
    req = make_request("b", toks, ranks.ctx)
    blocks = [5, 6, 7, 8, 9]
    assert sched.get_num_new_matched_tokens(req, 0) == (8, False)
    sched.update_state_after_alloc(req, blocks, 8)
    so = new_request_output(1, req, blocks, 8, 9)
    so.sync_load_req_ids.append("b")  # its computed blocks are offered in its next step
    ranks.step(so)
    decode = RequestBatch()
    decode.add("b", [], [], 17, 1)
    meta = ranks.step(SchedulerOutput(step=2, cached_requests=decode))
    assert meta["saves"]["slots"] == b""  # no room but the prefix's own slots
    assert sched.get_num_new_matched_tokens(make_request("c", toks, ranks.ctx), 0) == (8, False)
    ranks.shutdown()


@pytest.mark.parametrize("load_async", [False, True])
def test_slots_being_loaded_are_not_overwritten(full, load_async):
    """A slot an in-flight load reads is pinned: a save in the same step that would evict it
    is skipped instead, and the load gets the right data."""
    ranks = SimulatedRanks(cpu(2, world=1, load_async=load_async), 1, full, fill=True)
    a = list(range(9))
    save(ranks, "a", a, [0, 1, 2])
    sched = ranks.scheduler
    req = make_request("load-a", a, ranks.ctx)
    assert sched.get_num_new_matched_tokens(req, 0) == (8, load_async)
    sched.update_state_after_alloc(req, [20, 21, 22], 8)
    # Same step: another request wants two new blocks saved; both slots are pinned.
    other = make_request("b", list(range(50, 59)), ranks.ctx)
    sched.get_num_new_matched_tokens(other, 0)
    sched.update_state_after_alloc(other, [3, 4, 5], 0)
    so = new_request_output(1, other, [3, 4, 5], 0, 9)
    meta = ranks.step(so)
    assert meta["saves"]["slots"] == b""
    if load_async:
        assert ranks.wait(started={"load-a"}) == set()
    for kv in ranks.caches:
        assert torch.equal(kv[:, :, [20, 21]], kv[:, :, [0, 1]])
    # Once the load is over (the request scheduled or finished) its slots may be reused.
    sched.request_finished(req, [20, 21, 22])
    c = save(ranks, "c", list(range(70, 79)), [6, 7, 8], step=2)
    assert sched.get_num_new_matched_tokens(c, 0) == (8, load_async)
    assert sched.get_num_new_matched_tokens(make_request("a", a, ranks.ctx), 0) == (0, False)
    ranks.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_every_rank_holds_what_rank_0_answers(full, device):
    """Randomised: after many saves, evictions and loads, every block rank 0 would answer as
    a hit is in every rank's pool slot, with that rank's slice. A failure means a hit could
    load stale or foreign data on some rank."""
    rng = random.Random(7)
    ranks = SimulatedRanks(cpu(6, world=4), 4, full.to(device), fill=True, device=device)
    prompts = [[p * 100 + t for t in range(rng.randint(5, 14))] for p in range(10)]
    origin: dict[bytes, int] = {}  # block hash -> reference device block it came from
    for i in range(30):
        p = rng.randrange(len(prompts))
        toks = prompts[p]
        blocks = rng.sample(range(0, 16), 4)
        if rng.random() < 0.5:
            before = set(ranks.scheduler.slots._slots)
            req = save(ranks, f"s{i}", toks, blocks, step=i)
            for k, h in enumerate(req.block_hashes):
                if h not in before:  # saved by this step (else deduplicated)
                    origin[h] = blocks[k]
        else:
            load(ranks, f"l{i}", toks, rng.sample(range(16, 32), 4), step=i)
        sched = ranks.scheduler
        if device == "cuda":
            torch.cuda.synchronize()  # pool copies run on side streams
        for h, slot in list(sched.slots._slots.items()):
            for ctx, w in zip(ranks.ctxs, ranks.workers):
                assert torch.equal(w.pool[slot], shard(full, ctx)[:, :, origin[h]].cpu())
    assert ranks.scheduler.stats["evictions"] > 0  # the check covered reassigned slots
    ranks.shutdown()


def test_finished_ids_are_never_reported(full):
    """cpu saves hold no blocks, so a finished id must not be reported as an async save."""
    ranks = SimulatedRanks(cpu(4, world=1), 1, full, fill=True)
    save(ranks, "a", list(range(9)), [0, 1, 2])
    ranks.step(SchedulerOutput(step=1, finished_req_ids=["a"]))
    assert ranks.workers[0].get_finished({"a"}, set()) == (set(), set())
    ranks.shutdown()


def test_bad_settings():
    """Unknown kwargs and a capacity below one block are ValueErrors that say what to fix."""
    with pytest.raises(
        ValueError, match=r"capacity\b.*valid settings: \['capacity_bytes', 'load_async'\]"
    ):
        create_connector({"name": "cpu", "kwargs": {"capacity": 1}}, tp_context(0, 1))
    with pytest.raises(ValueError, match="holds no block"):
        create_connector({"name": "cpu", "kwargs": {"capacity_bytes": 10}}, tp_context(0, 1))
    with pytest.raises(ValueError, match="positive integer"):
        create_connector({"name": "cpu", "kwargs": {"capacity_bytes": -1}}, tp_context(0, 1))
    with pytest.raises(ValueError, match="more than this host's memory"):
        # A unit typo must not take the host's memory (rank 0's slot map, the pools).
        create_connector({"name": "cpu", "kwargs": {"capacity_bytes": 1 << 60}}, tp_context(0, 1))
    # A pool that fits once but not once per rank of the host: refused, naming the sum.
    third = {"name": "cpu", "kwargs": {"capacity_bytes": host_memory_bytes() // 3}}
    for part in create_connector(third, tp_context(0, 1)):  # builds; allocates nothing yet
        part.shutdown()
    with pytest.raises(ValueError, match="on each of the 4 ranks on this host, [0-9]+ bytes in"):
        create_connector(third, dataclasses.replace(tp_context(0, 1), ranks_on_host=4))
    with pytest.raises(ValueError, match="load_async must be a bool"):
        create_connector({"name": "cpu", "kwargs": {"load_async": "yes"}}, tp_context(0, 1))


@pytest.mark.parametrize("name", ["cpu", "disk"])
def test_block_ids_outside_the_cache_are_refused_at_admission(full, tmp_path, name):
    """An engine that hands `update_state_after_alloc` block ids outside its KV cache gets
    an error there, naming the ids and the cache's range. A failure means the load is
    planned and fails later in an IO thread, blamed on the worker."""
    from kvdist.connectors.registry import create_connector
    from kvdist.connectors.testing import tp_context

    kwargs = {"path": str(tmp_path)} if name == "disk" else {"capacity_bytes": 2**20}
    cfg = {"name": name, "kwargs": kwargs}
    ctx = tp_context(0, 1)
    sched, worker = create_connector(cfg, ctx)
    try:
        req = make_request("a", list(range(40)), ctx)
        sched.get_num_new_matched_tokens(req, 0)
        with pytest.raises(ValueError, match=rf"block ids \[{ctx.num_blocks}, -1\] are not "
                           rf"blocks of the KV cache \[0, {ctx.num_blocks}\)"):  # fmt: skip
            sched.update_state_after_alloc(req, [0, ctx.num_blocks, -1], 0)
        sched.update_state_after_alloc(req, [0, 1, ctx.num_blocks - 1], 0)
    finally:
        worker.shutdown()
        sched.shutdown()


@pytest.mark.parametrize("name", ["cpu", "disk"])
def test_request_finished_twice_is_refused(full, tmp_path, name):
    """A second `request_finished` for one request is an error naming it: an engine that
    took the second answer (False) would free blocks the first (True) held for a save. A
    new request under the same id (a new `Request`) may finish again. A failure means the
    second call quietly answers False."""
    kwargs = {"path": str(tmp_path)} if name == "disk" else {"capacity_bytes": 2**20}
    ctx = tp_context(0, 1)
    sched, worker = create_connector({"name": name, "kwargs": kwargs}, ctx)
    try:
        req = make_request("a", list(range(40)), ctx)
        sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, [0, 1, 2], 0)
        sched.request_finished(req, [0, 1, 2])
        with pytest.raises(ValueError, match=r"request_finished\('a'\) was called twice"):
            sched.request_finished(req, [0, 1, 2])
        again = make_request("a", list(range(40)), ctx)
        sched.get_num_new_matched_tokens(again, 0)
        assert sched.request_finished(again, []) is False
    finally:
        worker.shutdown()
        sched.shutdown()


def test_a_lookup_from_inside_a_block_is_refused(full):
    """The hit answer counts whole blocks from `num_computed_tokens // block_size`: asked
    from inside a block (5 tokens of 4-token blocks), 12 tokens after token 5 would claim
    token 16 computed while the loaded blocks 1-3 end at token 15. A failure means such a
    call is answered, and the engine takes an unloaded token's KV as computed."""
    ranks = SimulatedRanks(cpu(8, world=1), 1, full, fill=True)
    toks = list(range(21))
    save(ranks, "a", toks, [0, 1, 2, 3, 4, 5])
    sched = ranks.scheduler
    assert sched.get_num_new_matched_tokens(make_request("b", toks, ranks.ctx), 4) == (16, False)
    with pytest.raises(ValueError, match="whole number"):
        sched.get_num_new_matched_tokens(make_request("c", toks, ranks.ctx), 5)
    ranks.shutdown()


def test_a_preempted_request_saves_again_what_was_evicted_meanwhile(full):
    """A 4-block prompt fills a 4-slot pool, and is preempted; another request's saves
    evict its last 2 blocks. Admitted again, it loads its first 2 and computes the other
    2: those must be offered for saving again (they were offered once before the
    preemption), so the pool holds the whole prompt once more."""
    from kvdist.api.step import RequestBatch

    ranks = SimulatedRanks(cpu(4, world=1), 1, full, fill=True)
    sched = ranks.scheduler
    toks = list(range(17))  # 4 full blocks and a token
    req = make_request("a", toks, ranks.ctx)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, [0, 1, 2, 3, 4], 0)
    ranks.step(new_request_output(1, req, [0, 1, 2, 3, 4], 0, 17))
    assert sched.get_num_new_matched_tokens(make_request("x", toks, ranks.ctx), 0)[0] == 16
    ranks.step(SchedulerOutput(step=2, preempted_req_ids=["a"]))
    save(ranks, "b", list(range(100, 109)), [5, 6, 7], step=3)  # 2 blocks: evicts a's last 2
    assert sched.get_num_new_matched_tokens(make_request("y", toks, ranks.ctx), 0)[0] == 8
    assert sched.get_num_new_matched_tokens(req, 0) == (8, False)
    sched.update_state_after_alloc(req, [8, 9, 10, 11, 12], 8)
    so = new_request_output(4, req, [8, 9, 10, 11, 12], 8, 9)
    so.sync_load_req_ids.append("a")  # its computed blocks are offered in its next step
    ranks.step(so)
    decode = RequestBatch()
    decode.add("a", [], [], 17, 1)
    ranks.step(SchedulerOutput(step=5, cached_requests=decode))
    assert sched.get_num_new_matched_tokens(make_request("z", toks, ranks.ctx), 0)[0] == 16
    ranks.shutdown()
