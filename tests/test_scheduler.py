"""Rank 0's scheduler alone, stepped by hand with a scripted connector and a clock that
moves one second a step: orders of events too precise to arrange through the engine
(which runs the same calls each step: expire_stalled, schedule, apply_consensus,
postprocess)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

from kvdist.api.types import Request
from kvdist.coordination.coordinator import Consensus
from kvdist.engine import scheduler as scheduler_module
from kvdist.engine.block_manager import BlockManager
from kvdist.engine.config import EngineConfig
from kvdist.engine.sampling import SamplingParams
from kvdist.engine.scheduler import Scheduler, StepPlan
from kvdist.engine.sequence import Sequence

DEADLINE_S = 3.0  # expire_stalled's limit: three steps of the rig's clock


class _Connector:
    """The scheduler half of a connector: a request in `reload` finds that many tokens to
    load asynchronously when it is admitted again (nothing at its first admission); the
    blocks of a request in `holds` stay held when it finishes (a save never reported)."""

    def __init__(self, reload: dict[str, int], holds: set[str]):
        self.reload, self.holds = reload, holds
        self.asked: Counter[str] = Counter()

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        rid = request.request_id
        self.asked[rid] += 1
        if self.asked[rid] > 1 and rid in self.reload:
            return self.reload[rid], True
        return 0, False

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        pass

    def request_finished(self, request, block_ids):
        return request.request_id in self.holds


class _Rig:
    """A scheduler and its block manager, stepped as the engine steps them; every step
    takes one second of the scheduler's clock and samples token 1."""

    def __init__(self, monkeypatch, connector: _Connector, **settings):
        self.now = 0.0
        clock = SimpleNamespace(monotonic=lambda: self.now, perf_counter=time.perf_counter)
        monkeypatch.setattr(scheduler_module, "time", clock)
        config = EngineConfig(**settings)
        assert config.num_blocks is not None
        blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.sched = Scheduler(config, blocks, connector, max_model_len=1024)
        self.seqs: dict[str, Sequence] = {}
        self.finished: dict[str, str] = {}
        self.errors: list[str] = []

    def add(self, rid: str, prompt_len: int, max_tokens: int) -> Sequence:
        first = 100 * (len(self.seqs) + 1)  # prompts share no prefix
        req = Request(rid, list(range(first, first + prompt_len)), max_tokens=max_tokens)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        seq = Sequence(req, params, index=len(self.seqs))
        self.seqs[rid] = seq
        self.sched.add(seq, b"root")
        return seq

    def step(self, loads_done: tuple[str, ...] = ()) -> StepPlan:
        self.now += 1.0
        self.sched.expire_stalled(DEADLINE_S, "timeout_s", lambda: "a save never reported")
        plan = self.sched.schedule()
        consensus = Consensus(step=self.sched.step, loads_done=list(loads_done))
        self.sched.apply_consensus(consensus, plan)
        self.sched.postprocess(plan, {e.seq.request_id: 1 for e in plan.scheduled if e.sample})
        for seq in self.sched.newly_finished:
            self.finished[seq.request_id] = seq.finish_reason
            if seq.error:
                self.errors.append(f"{seq.request_id}: {seq.error}")
        self.sched.newly_finished.clear()
        return plan

    def step_until(self, done: Callable[[], bool], what: str, limit: int = 200) -> None:
        for _ in range(limit):
            self.step()
            if done():
                return
        raise AssertionError(f"{what}: not within {limit} steps (finished: {self.finished})")


def test_a_recompute_beside_a_request_that_preempts_itself_is_not_a_stall(monkeypatch) -> None:
    """A request preempted after computing part of its prompt is admitted again with an
    async load of its first block only; meanwhile a save never reported holds blocks and
    the other request, alone with what the load left, preempts itself at every block it
    needs. Once the load is in, the loaded request goes first and recomputes the rest of
    what it had computed, for more steps than the stall deadline, while the other waits:
    a recompute that then goes further, and both requests finish. Before, a step that went
    no further than a request had got was no progress, so the stall deadline (started by
    the self-preemption) failed both with "no room in the KV cache" mid-recompute."""
    conn = _Connector(reload={"q": 4}, holds={"x"})
    rig = _Rig(monkeypatch, conn, block_size=4, num_blocks=32, max_num_batched_tokens=3,
               enable_prefix_caching=False)  # fmt: skip
    rig.add("x", 4, 1)
    rig.step_until(lambda: "x" in rig.finished, "x finishes")
    assert rig.sched.held, "x's blocks must stay held (its save is never reported)"
    r = rig.add("r", 2, 100)  # decodes: the step preempts the newest running for room
    rig.add("p", 20, 100)
    q = rig.add("q", 40, 2)
    rig.step_until(lambda: q.computed_high > 0 and not q.block_ids, "r preempts q")
    assert rig.sched.abort("p")  # room for q's load (its prompt's blocks at once)
    rig.step_until(lambda: "q" in rig.sched.loading, "q loads its first block")
    preemptions = rig.sched.counters["preemptions"]
    rig.step_until(lambda: rig.sched.counters["preemptions"] > preemptions, "r preempts itself")
    rig.step(loads_done=("q",))
    recompute_steps = 0  # q, alone, recomputing what it had computed before
    for _ in range(300):
        if not rig.sched.has_unfinished():
            break
        high = q.computed_high
        plan = rig.step()
        recompute_steps += [e.seq for e in plan.scheduled] == [q] and q.computed_high == high
    want = {"x": "length", "p": "abort", "q": "length", "r": "length"}
    assert rig.finished == want, rig.errors
    assert recompute_steps > DEADLINE_S, "the recompute must outlast the stall deadline"
    assert r.num_output_tokens == 100 and q.num_output_tokens == 2


def test_a_request_that_recomputes_its_start_again_and_again_is_a_stall(monkeypatch) -> None:
    """Without a prefix cache, a request that needs one block more than a save never
    reported leaves preempts itself there and recomputes from its first token, again and
    again. Its first recompute counts as progress (it might have got further), the next
    ones not, as no request got further in between: the stall deadline fails it. A
    failure (the step limit) means every recompute after a preemption counted and
    generate would never return."""
    rig = _Rig(monkeypatch, _Connector(reload={}, holds={"x"}), block_size=4, num_blocks=8,
               max_num_batched_tokens=3, enable_prefix_caching=False)  # fmt: skip
    rig.add("x", 4, 1)
    rig.step_until(lambda: "x" in rig.finished, "x finishes")
    rig.add("r", 2, 28)  # 30 tokens: 8 blocks, 7 left
    rig.step_until(lambda: "r" in rig.finished, "the stall deadline ends r", limit=300)
    assert rig.finished["r"] == "error" and "no room in the KV cache" in rig.errors[0]
    assert rig.sched.counters["preemptions"] > 0, "r must have preempted itself"
