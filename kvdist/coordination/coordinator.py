"""The per-step protocol between ranks (DESIGN.md §1), independent of any engine.

Per step, exactly two control-plane collectives whatever the number of requests:

1. `publish_plan`: rank 0 passes the `Plan` it built (scheduler output, connector metadata,
   async loads started, async saves held); one broadcast; every rank decodes the same bytes
   and binds the metadata to its worker.
2. The engine runs the worker hooks and the forward pass on every rank.
3. `exchange_reports`: every rank asks its worker what finished *since the last step*,
   checks each id was handed to it, and one allgather shares the new reports. Every rank
   then applies the same consensus: an async save or load is done when all ranks reported
   it; failed blocks are the union over ranks. The same exchange carries what each
   rank's worker has to tell rank 0's connector scheduler (`build_worker_meta`), for the
   engine to pass to `update_from_workers`.

Rank 0 also checks each plan's request ids against the earlier plans before broadcasting
it (`kvdist.coordination.plan_checks`): an id reused while live, a request scheduled while
its async load is in flight, a save held for a request no plan finished, a stop plan
that carries work (a stop runs no step; transfers in flight stay pending across it).

A failure on any rank during the step (a bad report, an exception in a hook) travels in
that rank's report, so every rank raises the same `RemoteError` together instead of
leaving the others waiting in a collective. That includes the worker refusing the step's
metadata in `bind_connector_meta`: `publish_plan` then returns normally and sets
`bind_error`, so that the rank can still run the step's forward (without the connector)
and meet the others in its tensor-parallel collectives before the report ends the step.
"""

from __future__ import annotations

import operator
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import SchedulerOutput, positive_int
from kvdist.comm.base import CommStats, Communicator
from kvdist.comm.launch_env import check_timeout
from kvdist.coordination.errors import ConnectorError, ProtocolError, RemoteError, call_hook
from kvdist.coordination.plan_checks import PlanChecker
from kvdist.coordination.tracker import CompletionTracker
from kvdist.wire.codec import Plan, Report, decode_plan, decode_report, encode_plan, encode_report

_NOT_HELD = (
    " (finished_gen_req_ids holds every finished request; only those whose "
    "request_finished returned True, the plan's saving_req_ids, have a save to report: "
    "the built-in connectors name them to the workers in their metadata)"
)


@dataclass
class Consensus:
    """What every rank agrees on after a step's report exchange."""

    step: int
    saves_done: list[str] = field(default_factory=list)
    """Requests whose async save finished on every rank (release their blocks)."""
    loads_done: list[str] = field(default_factory=list)
    """Requests whose async load finished on every rank (they may be scheduled)."""
    failed_blocks: set[int] = field(default_factory=set)
    """Device blocks whose load failed on at least one rank."""
    worker_metas: list[Any] = field(default_factory=list)
    """Each rank's `ConnectorWorker.build_worker_meta` result this step, by rank (None
    where a rank had nothing); empty when no rank had anything. For rank 0's
    `ConnectorScheduler.update_from_workers`."""


@dataclass
class CoordinatorStats:
    """Control-plane counters for one coordinator."""

    steps: int = 0
    collectives: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    """Control-plane seconds of each recent step (plan broadcast + report exchange)."""
    step_collectives: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    step_bytes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "collectives": self.collectives,
            "control_seconds": self.seconds,
            "control_bytes_sent": self.bytes_sent,
            "max_collectives_per_step": max(self.step_collectives, default=0),
        }


class Coordinator:
    """Runs the step protocol for one rank. `worker` may be None (no connector)."""

    def __init__(
        self,
        comm: Communicator,
        worker: ConnectorWorker | None,
        *,
        timeout_s: float,
        num_blocks: int | None = None,
    ):
        """`num_blocks`: the KV cache's blocks per rank, when known; a plan giving a
        request a block outside `[0, num_blocks)`, or a worker reporting a failed block
        outside it, is then a protocol error."""
        if worker is not None and not isinstance(worker, ConnectorWorker):
            raise TypeError(
                f"worker must be a kvdist.ConnectorWorker or None, got {type(worker).__name__}"
            )
        timeout_s = check_timeout(timeout_s, "timeout_s")
        if num_blocks is not None:
            num_blocks = positive_int(num_blocks, "num_blocks")
        self.comm = comm
        self.num_blocks = num_blocks
        self.worker = worker
        self.timeout_s = timeout_s
        self.rank = comm.rank
        self.world_size = comm.world_size
        self.saves = CompletionTracker(comm.world_size, "save")
        self.loads = CompletionTracker(comm.world_size, "load")
        self._plans = PlanChecker(num_blocks)  # used on rank 0
        # Ids this rank already reported: a repeat is ignored, never counted twice.
        self._reported_saves: set[str] = set()
        self._reported_loads: set[str] = set()
        self.stats = CoordinatorStats()
        self._last_plan: bytes = b""
        self.bind_error: Exception | None = None
        """Set when the worker raised binding this step's metadata (see the module doc);
        `exchange_reports` reports it."""
        # Comm counters and the clock at the start of the step in progress.
        self._step_start: tuple[CommStats, float] | None = None
        self._last_step: int | None = None  # of the last plan received
        # The step whose plan is published and whose reports are not exchanged yet: each
        # publish_plan is followed by exactly one exchange_reports (the stop plan by none).
        self._open_step: int | None = None
        self._failure: str | None = None  # why this coordinator stopped, once it has

    # -- step part 1 ------------------------------------------------------------------
    def publish_plan(self, plan: Plan | None) -> Plan:
        """Broadcast rank 0's plan; every rank returns the decoded plan.

        Rank 0 passes the plan, other ranks None. A plan carrying `error`, or one whose
        connector metadata cannot be encoded, makes every rank raise `RemoteError`."""
        self._check_usable("publish_plan")
        if self._open_step is not None:
            raise ProtocolError(
                f"publish_plan: the reports of step {self._open_step} were not exchanged; "
                "call exchange_reports(plan) once after each publish_plan"
            )
        self._step_start = (self.comm.stats.snapshot(), time.perf_counter())
        self.bind_error = None
        payload: bytes | None = None
        encode_error: Exception | None = None
        misuse = None
        if self.rank != 0 and plan is not None:
            # Reported like a bind error: this rank still runs the step (the others wait
            # for it in the forward's collectives), and every rank raises it in the
            # report exchange.
            misuse = ProtocolError(
                f"publish_plan on rank {self.rank} was given a plan; only rank 0 passes "
                "one (the others pass None and receive rank 0's)"
            )
            plan = None
        if self.rank == 0:
            if plan is None:  # still broadcast: the others are waiting for a plan
                n = 1 if self._last_step is None else self._last_step + 1
                plan = Plan(step=n, scheduler_output=SchedulerOutput(step=n))
                encode_error = ValueError(
                    "rank 0 passed no plan to publish_plan (the other ranks pass None)"
                )
            else:
                try:
                    self._plans.admit(plan, self.loads, self.saves)
                    payload = encode_plan(plan)
                except Exception as exc:
                    encode_error = exc
            if encode_error is not None:  # every rank raises it, from the plan they receive
                step_n = plan.step
                if type(step_n) is not int or not -(2**63) <= step_n < 2**64:
                    # The step itself may be what failed to encode (a numpy integer): the
                    # error plan must encode whatever the plan held, or rank 0 raises alone.
                    step_n = 1 if self._last_step is None else self._last_step + 1
                failure = Plan(
                    step=step_n,
                    scheduler_output=SchedulerOutput(step=step_n),
                    error=f"{type(encode_error).__name__}: {encode_error}",
                )
                payload = encode_plan(failure)
        if plan is not None:
            step = f"step {plan.step}"
        else:  # this rank learns the step from the plan it waits for
            step = "the first step" if self._last_step is None else f"after {self._last_step}"
        data = self.comm.broadcast_bytes(
            payload, root=0, timeout_s=self.timeout_s, what=f"plan broadcast ({step})"
        )
        self._last_plan = data
        try:
            # Rank 0 reuses the request batches it encoded; the rest comes from the bytes.
            received = decode_plan(data, sent=plan if encode_error is None else None)
        except Exception as exc:
            # Tell the others through the report exchange, so nobody waits on this rank.
            step_of = getattr(exc, "step", None)  # known when the plan's header was read
            self._exchange(
                Report(
                    rank=self.rank,
                    step=-1 if step_of is None else step_of,
                    error=f"cannot decode plan: {exc}",
                )
            )
            raise AssertionError("unreachable: the exchange above raises") from exc
        self._last_step = received.step
        if received.error is not None:
            self._fail(received.step, received.error)
            raise RemoteError(0, received.step, received.error) from encode_error
        if not received.stop:
            self._open_step = received.step
        try:  # rank 0's plan checks refused a transfer started twice: this is a backstop
            self.loads.expect_all(received.loading_req_ids)
            self.saves.expect_all(received.saving_req_ids)
        except ProtocolError as exc:  # the same on every rank, from the same plan
            self._fail(received.step, str(exc))
            raise
        # A transfer started again under an id this rank reported before (a request id
        # reused right after its last transfer completed) has not been reported yet:
        # forget the old report, or this one would be dropped as its repeat.
        if received.loading_req_ids:
            self._reported_loads.difference_update(received.loading_req_ids)
        if received.saving_req_ids:
            self._reported_saves.difference_update(received.saving_req_ids)
        if self.worker is not None and not received.stop and misuse is None:
            try:
                call_hook(self.worker, "bind_connector_meta", received.connector_meta)
            except ConnectorError as exc:
                self.bind_error = exc
        if misuse is not None:
            self.bind_error = misuse
        return received

    # -- step part 3 ------------------------------------------------------------------
    def exchange_reports(self, plan: Plan, error: BaseException | None = None) -> Consensus:
        """Collect this rank's new completions, share them, and apply the consensus.

        Pass `error` when this rank failed during the step: every rank then raises (as
        for `bind_error`, passed or not)."""
        self._check_usable("exchange_reports")
        if self._open_step is None or plan.step != self._open_step:
            published = (
                "no plan is published"
                if self._open_step is None
                else f"the published plan is step {self._open_step}'s"
            )
            raise ProtocolError(
                f"exchange_reports got the plan of step {plan.step}, but {published}: call "
                "it once per publish_plan, with the plan publish_plan returned"
            )
        self._open_step = None
        error = error if error is not None else self.bind_error
        self.bind_error = None
        report = Report(rank=self.rank, step=plan.step)
        if error is not None:
            report.error = f"{type(error).__name__}: {error}"
        elif self.worker is not None:
            try:
                self._collect(plan, report)
            except Exception as exc:
                report.error = f"{type(exc).__name__}: {exc}"
        reports = self._exchange(report)
        consensus = Consensus(step=plan.step)
        for r in reports:
            for rid in r.saved:
                if self.saves.report(rid, r.rank):
                    consensus.saves_done.append(rid)
            for rid in r.loaded:
                if self.loads.report(rid, r.rank):
                    consensus.loads_done.append(rid)
            if r.failed_blocks:
                consensus.failed_blocks.update(r.failed_blocks)
        if any(r.worker_meta is not None for r in reports):
            consensus.worker_metas = [r.worker_meta for r in reports]
        self._end_step()
        return consensus

    def _collect(self, plan: Plan, report: Report) -> None:
        assert self.worker is not None
        finished = set(plan.scheduler_output.finished_req_ids)
        result = call_hook(self.worker, "get_finished", finished, set(plan.loading_req_ids))
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ProtocolError(
                f"{type(self.worker).__name__}.get_finished on rank {self.rank} must return "
                f"(saved ids, loaded ids), got {result!r:.80}"
            )
        saved, loaded = result
        report.saved = self._filter_new(saved, self.saves, self._reported_saves, "save")
        report.loaded = self._filter_new(loaded, self.loads, self._reported_loads, "load")
        failed = call_hook(self.worker, "get_block_ids_with_load_errors")
        if failed is not None:  # not `if failed:`, which drops a block 0 returned alone
            report.failed_blocks = self._check_blocks(failed)
        report.worker_meta = call_hook(self.worker, "build_worker_meta")

    def _filter_new(
        self, ids: set[str], tracker: CompletionTracker, reported: set[str], kind: str
    ) -> list[str]:
        """The ids of `ids` this rank has not reported yet, sorted; each must be pending.
        `reported` holds the ids this rank reported, until the step after their release."""
        if not isinstance(ids, (set, frozenset, list, tuple)):
            raise ProtocolError(
                f"{type(self.worker).__name__}.get_finished on rank {self.rank} must return "
                f"sets of request ids, got {type(ids).__name__}"
            )
        new = []
        for rid in ids:
            if rid in reported:
                continue
            if rid not in tracker:
                # A repeat of a transfer done on every rank (this one included) is ignored
                # as any repeat is, however late: among the tracker's last released ids.
                if tracker.was_released(rid):
                    continue
                raise ProtocolError(
                    f"{type(self.worker).__name__}.get_finished on rank {self.rank} reported "
                    f"{kind} of request {rid!r}, which it was never given as an async {kind}"
                    + (_NOT_HELD if kind == "save" else "")
                )
            reported.add(rid)
            new.append(rid)
        if reported:
            # Forget ids released everywhere, so the set does not grow without bound; a
            # repeat after that is known by the tracker's released ids, and ignored.
            reported.intersection_update(tracker.pending_ids())
        new.sort()
        return new

    def _check_blocks(self, failed: object) -> list[int]:
        """The failed block ids a worker returned (a collection of them, or one), sorted;
        each must be a block id (an int, or anything with `__index__`, such as a numpy
        integer or a one-element tensor)."""
        limit = self.num_blocks
        ids: list[int] = []
        bad: list[object] = []
        try:
            items = [failed] if isinstance(failed, (str, bytes)) else list(failed)  # type: ignore[call-overload]
        except TypeError:  # one id (an int, a numpy integer, a 0-d tensor)
            items = [failed]
        for b in items:
            try:
                v = operator.index(b)  # type: ignore[arg-type]
            except TypeError:
                bad.append(b)
                continue
            if isinstance(b, bool) or v < 0 or (limit is not None and v >= limit):
                bad.append(b)
            ids.append(v)
        if bad:
            where = f"[0, {limit})" if limit is not None else "the KV cache"
            raise ProtocolError(
                f"{type(self.worker).__name__}.get_block_ids_with_load_errors on rank "
                f"{self.rank} returned {bad[:5]!r}, not block ids of {where}"
            )
        return sorted(ids)

    def _exchange(self, report: Report) -> list[Report]:
        try:
            payload = encode_report(report)
            if report.worker_meta is not None:
                # Read back from the bytes, as the other ranks read it: rank 0's scheduler
                # then gets the same kinds of data from every rank, and data that encodes
                # but does not decode fails on this rank as it does on the others.
                report = decode_report(payload)
        except Exception as exc:  # still join the exchange, or the others wait for this rank
            hint = ""
            if report.worker_meta is not None:
                hint = (
                    f" ({type(self.worker).__name__}.build_worker_meta must return plain "
                    "msgpack data: None, bool, int, float, str, bytes, list, dict)"
                )
            report = Report(
                rank=self.rank, step=report.step,
                error=f"cannot encode this rank's report: {type(exc).__name__}: {exc}{hint}",
            )  # fmt: skip
            payload = encode_report(report)
        what = f"report exchange (step {report.step})"
        if report.error is not None:
            # Should the others not come (a rank that left its forward early leaves them
            # in its tensor-parallel collectives), the timeout still says why.
            what += f", carrying this rank's error: {report.error:.500}"
        payloads = self.comm.allgather_bytes(payload, timeout_s=self.timeout_s, what=what)
        # This rank's own report is taken as it is, not decoded back from its bytes.
        reports = [report if r == self.rank else decode_report(p) for r, p in enumerate(payloads)]
        for r, got in enumerate(reports):
            if got.rank != r:
                raise ProtocolError(f"the report from rank {r} says it comes from rank {got.rank}")
        failed = [r for r in reports if r.error is not None]
        if failed:
            self._end_step()
            first = failed[0]
            self._fail(report.step, f"rank {first.rank}: {first.error}")
            raise RemoteError(first.rank, first.step, first.error or "")
        steps = {r.step for r in reports}
        if len(steps) > 1:
            self._end_step()
            self._fail(report.step, "the ranks were out of step")
            raise ProtocolError(
                f"the report exchange of step {report.step} got reports of steps "
                f"{[r.step for r in reports]} (by rank): the ranks are out of step"
            )
        return reports

    def _check_usable(self, call: str) -> None:
        if self._failure is not None:
            raise ProtocolError(
                f"{call}: this coordinator stopped at {self._failure}; every rank raised "
                "then, and the ranks' request state may differ since: create a new one"
            )

    def _fail(self, step: int, why: str) -> None:
        self._open_step = None
        where = f"step {step}" if step >= 0 else f"the plan after step {self._last_step}"
        self._failure = f"{where} ({why})"

    def _end_step(self) -> None:
        if self._step_start is None:
            return
        before, t0 = self._step_start
        now = self.comm.stats
        st = self.stats
        st.steps += 1
        n = now.collectives - before.collectives
        st.collectives += n
        st.step_collectives.append(n)
        st.seconds += now.seconds - before.seconds
        st.step_seconds.append(now.seconds - before.seconds)
        st.bytes_sent += now.bytes_sent - before.bytes_sent
        st.step_bytes.append(now.bytes_sent - before.bytes_sent)
        self._step_start = None

    @property
    def last_plan_digest(self) -> int:
        """CRC-32 of the last plan's bytes (ranks compare it in tests); computed on demand,
        not on every step."""
        return zlib.crc32(self._last_plan)

    @property
    def pending_transfers(self) -> int:
        """Async saves and loads not yet reported by every rank."""
        return len(self.saves) + len(self.loads)

    def waiting_for(self, request_id: str, kind: str) -> list[int] | None:
        """The ranks that have not reported the async `kind` ("save" or "load") of
        `request_id` yet, or None when no such transfer is in flight (never started, or
        done on every rank). The same on every rank: the consensus applies every rank's
        reports everywhere."""
        if kind not in ("save", "load"):
            raise ValueError(f"kind must be 'save' or 'load', got {kind!r}")
        tracker = self.saves if kind == "save" else self.loads
        if request_id not in tracker:
            return None
        return sorted(set(range(self.world_size)) - tracker.reporters(request_id))
