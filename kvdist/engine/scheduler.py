"""Continuous-batching scheduler with chunked prefill (rank 0 only).

Each step: running requests first (decode, or the next prefill chunk), then waiting ones
are admitted while the token budget and free blocks last. Admission asks the prefix cache,
then the connector, how much of the prompt is already available. A request whose
connector load is asynchronous waits, holding its blocks, until every rank has reported the
load; then it runs its remainder. When blocks run out, the most recently admitted running
request is preempted (its blocks freed; it is recomputed later).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvdist.api.connector import ConnectorScheduler
from kvdist.api.types import SchedulerOutput
from kvdist.coordination.coordinator import Consensus
from kvdist.coordination.errors import (
    ConnectorError,
    ProtocolError,
    call_bool_hook,
    call_hook,
    matched_tokens,
)
from kvdist.engine.block_manager import BlockManager
from kvdist.engine.config import EngineConfig
from kvdist.engine.sequence import Sequence, Status
from kvdist.kv.hashing import extend_from_root

_Fields = tuple[list, list, list, list, list]
"""A batch's rows field by field: ids, tokens, block ids, positions, scheduled counts."""

log = logging.getLogger(__name__)


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int
    sample: bool
    rolled_back: bool = False


@dataclass
class StepPlan:
    output: SchedulerOutput
    scheduled: list[Scheduled]
    loading_req_ids: list[str]
    saving_req_ids: list[str]


COUNTER_NAMES = (
    "preemptions",
    "prefix_hit_tokens",
    "external_tokens",
    "load_failures",
    "recomputed_tokens",
    "lookup_failures",
)
"""The scheduler's counters (`Scheduler.counters`, in `LLM.stats` on every rank)."""


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        blocks: BlockManager,
        connector: ConnectorScheduler | None,
        *,
        max_model_len: int,
    ):
        self.config = config
        self.blocks = blocks
        self.connector = connector
        self.max_model_len = max_model_len
        self.bs = config.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: dict[str, Sequence] = {}
        self.held: dict[str, Sequence] = {}
        self.pending: dict[str, set[str]] = {}  # held request -> transfers still in flight
        self.step = 0
        self._finished_next: list[str] = []
        self._saving_next: list[str] = []
        self._preempted_next: list[str] = []
        self.newly_finished: list[Sequence] = []
        # Since when waiting requests find no room, with only held blocks to wait for.
        self._stalled_since: float | None = None
        # Steps that took a request past where it had got (`Sequence.computed_high`).
        self._advances = 0
        # Block hashes being loaded by the connector: async loads in flight (hash ->
        # request) and sync loads of this step. Requests needing them next wait.
        self._loading_hashes: dict[bytes, str] = {}
        self._step_loads: set[bytes] = set()
        self.roots: dict[str, bytes] = {}
        # `LLM.stats` reports these. prefix_hit_tokens: the sum of the requests'
        # `num_cached_tokens` (device prefix-cache hits of the prefill each one's first
        # token waited for): an admission after a preemption in that prefill replaces the
        # request's count, so the sum may go down, as external_tokens does when a failed
        # load is undone. external_tokens: every connector load, loads after preemptions
        # included (a request's `num_external_tokens` counts its first prefill's only).
        # lookup_failures: requests failed alone because the connector's
        # get_num_new_matched_tokens raised or answered malformed.
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)

    # -- queue management -------------------------------------------------------------
    def add(self, seq: Sequence, root: bytes) -> None:
        self._stalled_since = None  # the stall counts from the last change (see expire_stalled)
        self.roots[seq.request_id] = root
        extend_from_root(seq.request.block_hashes, seq.token_ids, self.bs, root)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """Requests not finished yet (one stopped during its async load is finished: its
        blocks are held, `has_held`, until the load is reported)."""
        return bool(
            self.waiting
            or self.running
            or any(s.status is not Status.FINISHED for s in self.loading.values())
        )

    def has_held(self) -> bool:
        return bool(self.held)

    def has_unsent_finished(self) -> bool:
        """Requests that finished after the last plan: the next one tells the ranks (and
        their connector workers, through `get_finished`)."""
        return bool(self._finished_next)

    def has_unsent_saves(self) -> bool:
        """Requests held for a save that no plan has carried yet: the next step sends
        them, with the connector's metadata for their saves."""
        return bool(self._saving_next)

    def abort(self, request_id: str) -> bool:
        self._stalled_since = None
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, "abort")
                return True
        loading = self.loading.get(request_id)
        if loading is not None and loading.status is not Status.FINISHED:
            self._finish(loading, "abort")  # its blocks stay until the load is done everywhere
            return True
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, "abort")
                return True
        return False

    def expire_loads(self, limit_s: float, waiting_for: Callable[[str], str]) -> None:
        """Fail the requests whose async load started more than `limit_s` ago (their
        blocks stay held until the load is reported). `waiting_for(request_id)` says which
        ranks have not reported it, for the error."""
        now = time.monotonic()
        for seq in list(self.loading.values()):
            if seq.status is not Status.FINISHED and now - seq.load_started > limit_s:
                error = (
                    f"the connector's async load did not finish within {limit_s:g} s "
                    f"(load_timeout_s): {waiting_for(seq.request_id)}"
                )
                log.warning("request %s: %s", seq.request_id, error)
                self._finish(seq, "error", error=error, kv_valid=False)

    def expire_stalled(self, limit_s: float, setting: str, held_by: Callable[[], str]) -> None:
        """Fail the unfinished requests once no step made progress for `limit_s` (named by
        `setting` in the error) while blocks are held and nothing loaded: the cache is
        full of blocks held for transfers the connector has not reported done, and only
        a report could free them. A step without progress schedules nothing, or only
        what a request computed before its preemption, when it was preempted before that
        too with no request getting further in between: it goes round in circles (one
        that needs a held block preempts itself, is admitted again and computes the same
        chunk, step after step). A recompute after a preemption is progress otherwise: it
        can outlast `limit_s` and then get further (a request whose async load is done
        recomputes what the load did not cover while another preempts itself for room).
        A request added or aborted, or a held transfer done, starts the count again.
        `held_by()` names the transfers, for the error."""
        since = self._stalled_since
        if since is None or time.monotonic() - since <= limit_s:
            return
        held = len({b for s in self.held.values() for b in s.block_ids})
        error = (
            f"no room in the KV cache for {limit_s:g} s ({setting}): {held} blocks are held "
            f"by finished requests whose connector transfers are not done: {held_by()}"
        )
        log.warning(
            "%d waiting and %d running request(s) fail: %s",
            len(self.waiting), len(self.running), error,
        )  # fmt: skip
        while self.waiting:
            self._finish(self.waiting.popleft(), "error", error=error, kv_valid=False)
        while self.running:
            self._finish(self.running.pop(), "error", error=error, kv_valid=False)
        self._stalled_since = None

    # -- planning ---------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.step += 1
        out = SchedulerOutput(step=self.step)
        out.finished_req_ids, self._finished_next = self._finished_next, []
        saving, self._saving_next = self._saving_next, []
        loading_ids: list[str] = []
        budget = self.config.max_num_batched_tokens
        plan: list[Scheduled] = []

        scheduled_ids: set[str] = set()
        preemptions_before = self.counters["preemptions"]
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + num_new, scheduled_ids):
                continue  # seq itself was preempted; the list shifted
            plan.append(self._entry(seq, num_new))
            scheduled_ids.add(seq.request_id)
            budget -= num_new
            i += 1

        self._step_loads.clear()
        w = 0
        blocked = False  # a request found no room: from there on only the loaded go
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[w]
            if not seq.block_ids:
                if blocked:
                    w += 1
                    continue
                admitted = self._admit(seq, budget, loading_ids)
                if admitted == "no_room":
                    # Requests behind it whose loads are in hold their blocks already, and
                    # may be what it waits for: they still run (else nothing ever does).
                    blocked = True
                    w += 1
                    continue
                if admitted == "deferred":
                    w += 1  # waits for another request's load of its prefix; look further
                    continue
                if admitted in ("loading", "failed"):
                    del self.waiting[w]
                    continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(
                seq, seq.num_computed_tokens + num_new, scheduled_ids, may_preempt=False
            ):
                break
            del self.waiting[w]
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.append(self._entry(seq, num_new))
            scheduled_ids.add(seq.request_id)
            budget -= num_new

        # Stalled: no room (nothing scheduled, or a preemption or an admission found none)
        # and no progress: nothing scheduled past where it got before, nor further in a
        # recompute that counts (`Sequence.recomputed_to`; a request that preempted itself
        # and computes the same chunk again makes none).
        advanced = recomputed = False
        for entry in plan:
            seq = entry.seq
            end = seq.num_computed_tokens + entry.num_new
            if end > seq.computed_high:
                seq.computed_high = end
                advanced = True
            elif seq.recomputed_to >= 0 and end > seq.recomputed_to:
                seq.recomputed_to = end
                recomputed = True
        if advanced:
            self._advances += 1
        progress = advanced or recomputed
        no_room = not plan or blocked or self.counters["preemptions"] > preemptions_before
        may_stall = bool(
            not progress and not loading_ids and (self.waiting or self.running) and self.held
        ) and all(s.status is Status.FINISHED for s in self.loading.values())
        # A step that found room but made no progress neither starts nor ends the count: a
        # chunked prefill that needs a held block computes a chunk it computed before,
        # preempts itself at the next step and computes it again, every other step with
        # room. Only progress (or a load, or nothing held) ends a stall.
        if not may_stall:
            self._stalled_since = None
        elif no_room and self._stalled_since is None:
            self._stalled_since = time.monotonic()
        out.preempted_req_ids, self._preempted_next = self._preempted_next, []
        # Each batch's rows gathered field by field, then added at once (`add_rows`).
        new_rows: _Fields = ([], [], [], [], [])
        cached_rows: _Fields = ([], [], [], [], [])
        for entry in plan:
            seq = entry.seq
            # A request new to the ranks goes whole; one they hold, what they lack.
            known = seq.known_to_ranks
            ids, tokens, blocks, positions, counts = cached_rows if known else new_rows
            ids.append(seq.request_id)
            tokens.append(seq.token_ids[seq.num_tokens_sent :] if known else seq.token_ids)
            blocks.append(seq.block_ids[seq.num_blocks_sent :] if known else seq.block_ids)
            positions.append(seq.num_computed_tokens)
            counts.append(entry.num_new)
            seq.known_to_ranks = True
            seq.num_tokens_sent = seq.num_tokens
            seq.num_blocks_sent = len(seq.block_ids)
            if seq.sync_load_step == self.step:
                out.sync_load_req_ids.append(seq.request_id)
        out.new_requests.add_rows(*new_rows)
        out.cached_requests.add_rows(*cached_rows)
        return StepPlan(out, plan, loading_ids, saving)

    def _entry(self, seq: Sequence, num_new: int) -> Scheduled:
        return Scheduled(seq, num_new, sample=seq.num_computed_tokens + num_new == seq.num_tokens)

    def _admit(self, seq: Sequence, budget: int, loading_ids: list[str]) -> str:
        """First admission: prefix cache, then connector. Returns "no_room" (stop
        admitting), "deferred" (its next block is being loaded for another request),
        "loading" (starts an async load), "failed" (the connector's lookup raised or
        answered malformed: the request is finished with that error) or "ready"."""
        req = seq.request
        max_hit_blocks = (seq.num_tokens - 1) // self.bs
        hits = self.blocks.match_prefix(req.block_hashes, max_hit_blocks)
        num_computed = len(hits) * self.bs
        if (
            self.blocks.enable_prefix_caching
            and len(hits) < max_hit_blocks
            and (
                req.block_hashes[len(hits)] in self._loading_hashes
                or req.block_hashes[len(hits)] in self._step_loads
            )
        ):
            # Loading the same blocks twice costs the connector twice; once the other
            # request's load is in, these blocks are prefix-cache hits on the device.
            return "deferred"
        ext, is_async = 0, False
        if self.connector is not None:
            # Asked about it, the connector gets its request_finished, admitted or not.
            seq.seen_by_connector = True
            try:
                ext, is_async = matched_tokens(self.connector, req, num_computed)
            except ConnectorError as exc:
                # Nothing was allocated or promised for it yet: it fails alone. The hooks
                # after allocation still fail the step (a load or save the connector
                # recorded could land in blocks freed and reused).
                self._lookup_failed(seq, str(exc))
                return "failed"
            # Keep at least the last prompt token to compute, so a token can be sampled.
            ext = max(0, min(ext, seq.num_tokens - 1 - num_computed))
            is_async = is_async and ext > 0
        covered = num_computed + ext
        if is_async:
            # Blocks for the whole prompt now: requests waiting on loads that each hold
            # part of what they need could otherwise starve one another for good.
            covered = seq.num_tokens
        else:  # blocks for the first chunk too, so admission is all or nothing
            covered = min(seq.num_tokens, covered + budget)
        need = self.blocks.blocks_for(covered) - len(hits)
        if not self.blocks.can_allocate(hits, need):
            return "no_room"
        seq.block_ids = self.blocks.allocate(hits, need)
        if seq.admission_time is None:
            seq.admission_time = time.perf_counter()
        seq.num_computed_tokens = num_computed
        if seq.num_output_tokens == 0:
            # Admitted again after a preemption in this prefill, it finds its own blocks
            # too: its count replaces the one before (see `counters`), not adds to it.
            self.counters["prefix_hit_tokens"] += num_computed - seq.num_cached_tokens
            seq.num_cached_tokens = num_computed
        if self.connector is not None:
            call_hook(self.connector, "update_state_after_alloc", req, list(seq.block_ids), ext)
        loaded = req.block_hashes[len(hits) : (num_computed + ext) // self.bs]
        if is_async:
            self._loading_hashes.update(dict.fromkeys(loaded, seq.request_id))
            seq.invalid_kv_to = num_computed + ext  # valid once loaded (or recomputed)
            seq.status = Status.WAITING_FOR_LOAD
            seq.loading_tokens = ext
            seq.load_started = time.monotonic()
            self.loading[seq.request_id] = seq
            loading_ids.append(seq.request_id)
            return "loading"
        if ext:
            self._step_loads.update(loaded)
            seq.num_computed_tokens += ext
            self._loaded(seq, ext)
            seq.sync_load_step = self.step
        return "ready"

    def _lookup_failed(self, seq: Sequence, error: str) -> None:
        log.warning("request %s: %s", seq.request_id, error)
        self.counters["lookup_failures"] += 1
        # Asked about, it gets its request_finished (no blocks). That hook raising still
        # fails the step, as for any request that stops: then the connector's own
        # bookkeeping broke, not one request's lookup.
        self._finish(seq, "error", error=error, kv_valid=False)

    def _loaded(self, seq: Sequence, tokens: int) -> None:
        """The connector supplied `tokens` more of `seq` (fewer, when negative: a failed
        load undone). The request's own count describes its first prefill, the one its
        first token waited for; the engine's counter counts every load."""
        self.counters["external_tokens"] += tokens
        if seq.num_output_tokens == 0:
            seq.num_external_tokens += tokens

    def _grow(
        self, seq: Sequence, num_tokens: int, protected: set[str], may_preempt: bool = True
    ) -> bool:
        """Ensure `seq` has blocks for `num_tokens`, preempting others if allowed."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_ids)
        while need > 0 and not self.blocks.can_allocate([], need):
            if not may_preempt:
                return False
            victim = next(
                (s for s in reversed(self.running) if s.request_id not in protected), None
            )
            if victim is None:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_ids += self.blocks.allocate([], need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.invalid_kv_to = 0
        if seq.num_output_tokens == 0:  # its first prefill starts over
            seq.num_external_tokens = 0
        seq.status = Status.WAITING
        if seq.known_to_ranks:
            self._preempted_next.append(seq.request_id)
        seq.known_to_ranks = False
        seq.num_tokens_sent = seq.num_blocks_sent = 0
        # Recomputing what this drops is progress (`expire_stalled`) unless it was preempted
        # before with no request getting further since: then it goes round in circles.
        # Every request counts at most one recompute between two advances, and advances
        # are bounded by the requests' lengths: a loop ends in a stall all the same.
        seq.recomputed_to = 0 if seq.preempted_at != self._advances else -1
        seq.preempted_at = self._advances
        # First in line, but behind the requests whose async load is done: they hold their
        # blocks while they wait, and only running requests can be preempted. Ahead of
        # them, a request in chunked prefill that preempted itself for a block one of them
        # holds was admitted again in the same step, took the whole token budget, and
        # preempted itself again at the next: they never ran.
        i = 0
        while i < len(self.waiting) and self.waiting[i].block_ids:
            i += 1
        self.waiting.insert(i, seq)
        self.counters["preemptions"] += 1

    # -- after the step -----------------------------------------------------------------
    def apply_consensus(self, consensus: Consensus, plan: StepPlan) -> None:
        if consensus.failed_blocks:
            self._apply_failures(consensus.failed_blocks, plan)
        for rid in consensus.loads_done:
            seq = self.loading.pop(rid, None)
            if seq is None:
                raise ProtocolError(f"load of {rid!r} reported done, but it is not loading")
            self._release_loading_hashes(rid)
            self._load_done(seq)
        for rid in consensus.saves_done:
            self._transfer_done(rid, "save")

    def _release_loading_hashes(self, rid: str) -> None:
        """Requests needing the blocks `rid` loads no longer wait for its load."""
        for h in [h for h, owner in self._loading_hashes.items() if owner == rid]:
            del self._loading_hashes[h]

    def _load_done(self, seq: Sequence) -> None:
        failed_blocks = seq.failed_load_blocks
        seq.failed_load_blocks = set()  # a later load (after a preemption) counts afresh
        if seq.status is Status.FINISHED:  # aborted while loading
            self._transfer_done(seq.request_id, "load")
            return
        loaded_to = seq.num_computed_tokens + seq.loading_tokens
        if seq.load_limit is not None:
            if self.config.load_failure_policy == "fail":
                # As for a synchronous load: what loaded before the first failed block.
                self._loaded(seq, max(0, min(loaded_to, seq.load_limit) - seq.num_computed_tokens))
                self._finish(
                    seq,
                    "error",
                    error=f"connector load failed at block index {seq.load_limit // self.bs} "
                    f"of the request (device blocks {sorted(failed_blocks)} failed on "
                    "some rank; policy 'fail')",
                    kv_valid=False,
                )
                return
            self.counters["recomputed_tokens"] += loaded_to - max(
                seq.load_limit, seq.num_computed_tokens
            )
            loaded_to = max(seq.num_computed_tokens, min(loaded_to, seq.load_limit))
        self._loaded(seq, loaded_to - seq.num_computed_tokens)
        seq.num_computed_tokens = loaded_to
        seq.loading_tokens = 0
        seq.load_limit = None
        self.blocks.cache_blocks(seq.block_ids, seq.request.block_hashes, loaded_to // self.bs)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _apply_failures(self, failed: set[int], plan: StepPlan) -> None:
        self.blocks.uncache_blocks(sorted(failed))
        new_failures = len(failed)
        this_step = {e.seq.request_id: e for e in plan.scheduled}
        for seq in list(self.loading.values()) + list(self.running):
            bad = [i for i, b in enumerate(seq.block_ids) if b in failed]
            if not bad:
                continue
            limit = bad[0] * self.bs
            if seq.request_id in self.loading:
                # An async load's ranks report its failures in their own steps (finished
                # or expired, its load is still in flight): each block counts once.
                here = {seq.block_ids[i] for i in bad}
                new_failures -= len(here & seq.failed_load_blocks)
                seq.failed_load_blocks |= here
            if seq.status is Status.WAITING_FOR_LOAD:
                seq.load_limit = limit if seq.load_limit is None else min(limit, seq.load_limit)
                continue
            entry = this_step.get(seq.request_id)
            if entry is None or seq.sync_load_step != self.step or limit >= seq.num_computed_tokens:
                continue  # not a load of this step: the block was computed, not loaded
            # A synchronous load of this step failed: the forward used bad KV. Undo the step.
            entry.rolled_back = True
            lost = seq.num_computed_tokens - limit
            self._loaded(seq, -lost)  # what the load gave up to the failed block
            if self.config.load_failure_policy == "fail":
                self.running.remove(seq)
                blocks = [seq.block_ids[i] for i in bad]
                self._finish(
                    seq,
                    "error",
                    error=f"connector load failed at block index {bad[0]} of the request "
                    f"(device blocks {blocks} failed on some rank; policy 'fail')",
                    kv_valid=False,
                )
                continue
            self.counters["recomputed_tokens"] += lost
            # Until recomputed, its blocks up to where this step wrote hold bad KV.
            seq.invalid_kv_to = max(seq.invalid_kv_to, seq.num_computed_tokens + entry.num_new)
            seq.num_computed_tokens = limit
            seq.computed_high = min(seq.computed_high, limit)  # recomputing is progress
        self.counters["load_failures"] += new_failures

    def postprocess(self, plan: StepPlan, sampled: dict[str, int]) -> None:
        """Advance computed counts, append sampled tokens, finish requests that stop."""
        for entry in plan.scheduled:
            seq = entry.seq
            if entry.rolled_back or seq.status is not Status.RUNNING:
                continue
            seq.num_computed_tokens += entry.num_new
            seq.sync_load_step = -1
            req = seq.request
            self.blocks.cache_blocks(
                seq.block_ids, req.block_hashes, seq.num_computed_tokens // self.bs
            )
            if not entry.sample:
                continue
            token = sampled[seq.request_id]
            seq.append_token(token)
            extend_from_root(req.block_hashes, seq.token_ids, self.bs, self.roots[seq.request_id])
            reason = self._stop_reason(seq, token)
            if reason:
                self.running.remove(seq)
                self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> str:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return ""

    eos_token_ids: frozenset[int] = frozenset()

    def _finish(
        self, seq: Sequence, reason: str, error: str | None = None, *, kv_valid: bool = True
    ) -> None:
        """`kv_valid` False: its blocks hold KV of a failed load, which the connector gets
        no block ids of (nothing there may be saved)."""
        # Stopped (aborted) while loading, or after a failed load's step was undone and
        # before it was recomputed: some of its blocks hold no valid KV.
        kv_valid = kv_valid and seq.num_computed_tokens >= seq.invalid_kv_to
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.error = error
        self.newly_finished.append(seq)
        rid = seq.request_id
        self._finished_next.append(rid)
        pending: set[str] = set()
        if rid in self.loading:
            pending.add("load")
            # Requests waiting for these blocks look them up again (the load may never end).
            self._release_loading_hashes(rid)
        # Every request the connector was asked about gets exactly one request_finished.
        if (
            self.connector is not None
            and seq.seen_by_connector
            and call_bool_hook(
                self.connector,
                "request_finished",
                seq.request,
                list(seq.block_ids) if kv_valid else [],
            )
        ):
            pending.add("save")
            self._saving_next.append(rid)
        if pending:
            self.pending[rid] = pending
            self.held[rid] = seq
        else:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []
        self.roots.pop(rid, None)

    def _transfer_done(self, rid: str, kind: str) -> None:
        pending = self.pending.get(rid)
        if pending is None or kind not in pending:
            raise ProtocolError(f"{kind} of request {rid!r} reported done, but none was pending")
        pending.discard(kind)
        if not pending:
            del self.pending[rid]
            seq = self.held.pop(rid)
            self.blocks.free(seq.block_ids)
            seq.block_ids = []
            self._stalled_since = None  # blocks freed: a stall starts again from here
