"""Rank 0's checks of the request ids, block ids and step numbers of an engine's plans.

The coordinator cannot check an engine's block tables in full (which blocks a request
owns is the engine's business), but it sees every plan, and some mistakes in them corrupt
or lose KV without any error further on, or with one only deep in a kernel:

- a block id outside the KV cache (`num_blocks`, when the coordinator is told it) indexes
  past the cache: on a GPU, a device-side assert that ends the process without naming
  the request;
- a request scheduled while its async load is still running computes on blocks the load
  has not filled;
- two live requests under one id share the connector's state, and one's saves are lost;
- a save held for a request that no plan said finished (since its last save) is never
  reported, and an engine that waits for it waits for good;
- a request scheduled as cached that the ranks never received whole (or dropped since)
  has each worker extend a block table it does not hold;
- a step number that does not increase names the wrong step in every later error;
- a stop plan that carries work (requests, finishes, transfers, connector metadata): it
  runs no step, so no worker hears of it, and a transfer it starts is waited for for good.

A stop plan ends the engine's loop, not the coordinator: async transfers in flight when
it is sent stay pending, and the steps of the next loop collect their reports (the
reference engine ends each `generate` call so, its saves still running). At shutdown the
engine steps until none is pending before its last stop.

These checks name them before the plan is broadcast, so every rank raises together. They
cost a few set operations on the step's ids and one max over its block ids.
"""

from __future__ import annotations

from array import array

import numpy as np

from kvdist.api.step import RequestBatch
from kvdist.coordination.errors import ProtocolError
from kvdist.coordination.tracker import CompletionTracker, RecentIds
from kvdist.wire.codec import Plan

_FINISHED_KEPT = 65536
"""Finished ids remembered for a save that starts a plan or more after the finish."""


class PlanChecker:
    """What earlier plans said about request ids (rank 0 only)."""

    def __init__(self, num_blocks: int | None = None) -> None:
        self.num_blocks = num_blocks
        """The KV cache's blocks per rank, when known: block ids must be below it."""
        self.live: set[str] = set()
        """Sent as new and not finished or preempted since."""
        self.last_step: int | None = None
        self._finished = RecentIds(_FINISHED_KEPT)

    def admit(self, plan: Plan, loads: CompletionTracker, saves: CompletionTracker) -> None:
        """Check `plan` against the earlier ones and record it; `loads`, `saves`: the async
        transfers not yet reported by every rank. Raises `ProtocolError` naming the first
        problem. The well-formed plan passes on a few C-level set operations."""
        so = plan.scheduler_output
        last = self.last_step
        runs = not plan.stop and plan.error is None  # a plan that ends the loop may repeat
        if last is not None and (plan.step < last or (plan.step == last and runs)):
            raise ProtocolError(
                f"the plan of step {plan.step} comes after the plan of step {last}: number "
                "each plan's step above the last one's (a stop or error plan's may repeat it)"
            )
        if plan.stop:
            _refuse_work_in_stop(plan)
            self.last_step = plan.step
            return
        if self.num_blocks is not None:
            for name in ("new_requests", "cached_requests"):
                blocks = getattr(so, name).block_ids
                if blocks and _largest_unsigned(blocks) >= self.num_blocks:
                    _refuse_blocks(plan.step, name, getattr(so, name), self.num_blocks)
        finished = so.finished_req_ids
        if finished:
            self.live.difference_update(finished)
            for rid in finished:
                self._finished.add(rid)
        if so.preempted_req_ids:
            self.live.difference_update(so.preempted_req_ids)
        cached = so.cached_requests.request_ids
        if cached and not self.live.issuperset(cached):
            unknown = sorted(set(cached) - self.live)
            raise ProtocolError(
                f"the plan of step {plan.step} schedules request(s) {unknown[:5]} as cached "
                "(cached_requests), but no plan sent them as new since they last started, "
                "or they finished or were preempted since: send a request whole as new "
                "first (again after a preemption)"
            )
        if len(cached) > 1 and len(set(cached)) != len(cached):
            twice = sorted({rid for rid in cached if cached.count(rid) > 1})
            raise ProtocolError(
                f"the plan of step {plan.step} schedules request(s) {twice[:5]} more than once "
                "in cached_requests: one row per request per step"
            )
        # A live request's async load (started in this plan or an earlier one) is caught
        # here, not by the new requests' check below: it schedules the request as cached.
        if cached and (len(loads) or plan.loading_req_ids):
            pending = loads.pending_ids()
            if not pending.isdisjoint(cached) or not set(plan.loading_req_ids).isdisjoint(cached):
                loading = set(pending).union(plan.loading_req_ids)
                raise ProtocolError(
                    f"the plan of step {plan.step} schedules request(s) "
                    f"{sorted(loading.intersection(cached))[:5]} (cached_requests) while their "
                    "async load is in flight: schedule a request once the consensus's "
                    "loads_done names it"
                )
        new = so.new_requests.request_ids
        new_set = set(new)
        # Views and sets on the left: isdisjoint walks the smaller side only then, and the
        # step's new ids are few while the live, pending and finished ids may be many.
        if new_set and (
            len(new_set) != len(new)
            or not self.live.isdisjoint(new_set)
            or not new_set.isdisjoint(finished)
            or not saves.pending_ids().isdisjoint(new_set)
            or not new_set.isdisjoint(plan.saving_req_ids)
            or not loads.pending_ids().isdisjoint(new_set)
            or not new_set.isdisjoint(plan.loading_req_ids)
        ):
            self._refuse_new(plan, new, loads, saves)
        for kind, ids, tracker in (
            ("load", plan.loading_req_ids, loads),
            ("save", plan.saving_req_ids, saves),
        ):
            if ids and (len(set(ids)) != len(ids) or not tracker.pending_ids().isdisjoint(ids)):
                _refuse_restart(plan.step, kind, ids, tracker)
        unfinished = [r for r in plan.saving_req_ids if r not in self._finished]
        if unfinished:
            raise ProtocolError(
                f"the plan of step {plan.step} holds request(s) {sorted(unfinished)[:5]} for "
                "a save (saving_req_ids) that no plan listed in finished_req_ids since its "
                "last save (if any): the workers learn of a request's finish from "
                "finished_req_ids, once, so its save would never be reported"
            )
        if plan.saving_req_ids:
            # A finish starts one save: a second one held for it would never be reported.
            self._finished.discard(set(plan.saving_req_ids))
        self.live.update(new_set)
        self.last_step = plan.step
        if new_set:
            self._finished.discard(new_set)  # ids reused: they must finish again

    def _refuse_new(
        self, plan: Plan, new: list[str], loads: CompletionTracker, saves: CompletionTracker
    ) -> None:
        step = f"the plan of step {plan.step}"
        twice = sorted({r for r in new if new.count(r) > 1})
        if twice:
            raise ProtocolError(f"{step} schedules request(s) {twice} twice as new")
        clash = sorted(self.live.intersection(new))
        if clash:
            raise ProtocolError(
                f"{step} sends request(s) {clash} as new while a live request has that id "
                "(sent as new, and not finished or preempted since): request ids must be "
                "unique among live requests"
            )
        reused = sorted(set(plan.scheduler_output.finished_req_ids).intersection(new))
        if reused:
            raise ProtocolError(
                f"{step} lists request(s) {reused} both as finished and as new: reuse a "
                "finished request's id in a later plan"
            )
        saving = sorted(r for r in new if r in saves or r in plan.saving_req_ids)
        if saving:
            raise ProtocolError(
                f"{step} sends request(s) {saving} as new while the save of an earlier "
                "request with that id is in flight: reuse an id once saves_done named it"
            )
        early = sorted({r for r in new if r in loads or r in plan.loading_req_ids})
        raise ProtocolError(
            f"{step} schedules request(s) {early} while their async load is in flight: "
            "schedule a request once the consensus's loads_done names it"
        )


def _refuse_work_in_stop(plan: Plan) -> None:
    so = plan.scheduler_output
    carried = [
        f"{name} {sorted(ids)[:5]}"
        for name, ids in (
            ("new_requests", so.new_requests.request_ids),
            ("cached_requests", so.cached_requests.request_ids),
            ("finished_req_ids", so.finished_req_ids),
            ("preempted_req_ids", so.preempted_req_ids),
            ("sync_load_req_ids", so.sync_load_req_ids),
            ("loading_req_ids", plan.loading_req_ids),
            ("saving_req_ids", plan.saving_req_ids),
        )
        if ids
    ]
    if plan.connector_meta is not None:
        carried.append("connector metadata")
    if carried:
        raise ProtocolError(
            f"the stop plan of step {plan.step} carries {', '.join(carried)}: a stop plan "
            "runs no step (no forward, no connector hooks, no report exchange), so no rank "
            "would act on it, and a transfer it started would never be reported; send it "
            "in a plan that runs, and stop with an empty plan"
        )


def _refuse_restart(step: int, kind: str, ids: list[str], tracker: CompletionTracker) -> None:
    field = "loading_req_ids" if kind == "load" else "saving_req_ids"
    twice = sorted({r for r in ids if ids.count(r) > 1})
    if twice:
        raise ProtocolError(f"the plan of step {step} names request(s) {twice} twice in {field}")
    again = sorted(r for r in ids if r in tracker)
    raise ProtocolError(
        f"the plan of step {step} starts an async {kind} of request(s) {again[:5]} "
        f"({field}) while their earlier one is in flight: start it again once the "
        f"consensus's {kind}s_done named it"
    )


def _largest_unsigned(ids: array) -> int:
    """The largest of int32 `ids` read as uint32 (a negative id reads as >= 2**31, so one
    pass checks both ends of a range): a C loop for few ids, numpy's past that (its call
    costs ~1 µs, the loop ~15 ns an id)."""
    if len(ids) < 64:
        return max(memoryview(ids).cast("B").cast("I"))
    return int(np.frombuffer(ids, dtype=np.uint32).max())


def _refuse_blocks(step: int, name: str, batch: RequestBatch, num_blocks: int) -> None:
    for rid, _, _, _, blocks in batch.rows():
        bad = [b for b in blocks if not 0 <= b < num_blocks]
        if bad:
            raise ProtocolError(
                f"the plan of step {step} gives request {rid!r} ({name}) block id(s) "
                f"{bad[:5]} outside the KV cache's {num_blocks} blocks [0, {num_blocks})"
            )
