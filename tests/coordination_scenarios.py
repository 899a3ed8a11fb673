"""Coordinator scenarios that run unchanged on any communicator and any world size.

Each scenario runs on every rank and returns a JSON-able observation of that rank; the
caller gathers the observations of all ranks and checks them with `check(name, results)`,
so every rank's view is asserted together. Used by tests/test_coordinator.py (ranks as
threads) and tests/mp/coordinator_worker.py (ranks under mpiexec / torchrun).
"""

from __future__ import annotations

from typing import Any

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import ConnectorContext, RequestData, SchedulerOutput
from kvdist.comm.base import Communicator
from kvdist.coordination.coordinator import Coordinator
from kvdist.coordination.errors import RemoteError
from kvdist.wire.codec import Plan


class ScriptedWorker(ConnectorWorker):
    """Reports what a script says, per step; records every id it was handed."""

    def __init__(
        self,
        rank: int,
        saves: dict[int, set[str]] | None = None,
        loads: dict[int, set[str]] | None = None,
        failed: dict[int, set[int]] | None = None,
        refuse_bind: bool = False,
        worker_meta: dict[int, Any] | None = None,
        finished_returns: Any = "scripted",
    ):
        self.rank = rank
        self._finished_returns = finished_returns
        self._worker_meta = worker_meta or {}
        self._refuse_bind = refuse_bind
        self._saves = saves or {}
        self._loads = loads or {}
        self._failed = failed or {}
        self.step = 0
        self.given_finished: list[list[str]] = []
        self.given_loading: list[list[str]] = []

    def bind_connector_meta(self, meta) -> None:
        if self._refuse_bind:
            raise ValueError(f"rank {self.rank} refuses this metadata")
        super().bind_connector_meta(meta)

    def start_load_kv(self, stream) -> None:
        self.step += 1

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        self.given_finished.append(sorted(finished_gen_req_ids))
        self.given_loading.append(sorted(started_loading_req_ids))
        if self._finished_returns != "scripted":
            return self._finished_returns
        return set(self._saves.get(self.step, ())), set(self._loads.get(self.step, ()))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self._failed.get(self.step, ()))

    def build_worker_meta(self) -> Any:
        return self._worker_meta.get(self.step)


def _ctx(comm: Communicator) -> ConnectorContext:
    import torch

    return ConnectorContext(
        rank=comm.rank,
        world_size=comm.world_size,
        num_layers=1,
        block_size=4,
        num_kv_heads=4,
        kv_head_start=0,
        kv_head_end=4,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
        model_namespace="t",
    )


def _run(
    comm: Communicator, worker: ScriptedWorker, plans: list[Plan], num_blocks: int | None = None
) -> dict[str, Any]:
    coord = Coordinator(comm, worker, timeout_s=30, num_blocks=num_blocks)
    steps = []
    for plan in plans:
        got = coord.publish_plan(plan if comm.rank == 0 else None)
        if got.stop:  # the loop ends here; the next plans start another
            steps.append({"stop": got.step, "pending": coord.pending_transfers})
            continue
        worker.start_load_kv(None)
        c = coord.exchange_reports(got)
        steps.append(
            {
                "saves": c.saves_done,
                "loads": c.loads_done,
                "failed": sorted(c.failed_blocks),
                "worker_metas": repr(c.worker_metas),  # bytes in it: JSON has none
                "digest": coord.last_plan_digest,
                "waiting": [coord.waiting_for(r, k) for r, k in (("a", "save"), ("L", "load"))],
            }
        )
    return {
        "rank": comm.rank,
        "steps": steps,
        "given_finished": worker.given_finished,
        "given_loading": worker.given_loading,
        "max_collectives": max(coord.stats.step_collectives, default=0),
        "pending": coord.pending_transfers,
    }


def _plan(step: int, finished=(), saving=(), loading=(), meta=None) -> Plan:
    return Plan(
        step=step,
        scheduler_output=SchedulerOutput(step=step, finished_req_ids=list(finished)),
        saving_req_ids=list(saving),
        loading_req_ids=list(loading),
        connector_meta=meta,
    )


def _error_of(fn) -> dict[str, Any]:
    try:
        fn()
    except RemoteError as exc:
        return {"error": str(exc), "type": "RemoteError"}
    except Exception as exc:  # anything else is a failure the checker reports
        return {"error": str(exc), "type": type(exc).__name__}
    return {"error": None}


# -- scenarios ---------------------------------------------------------------------------
def save_gating(comm: Communicator) -> dict[str, Any]:
    """Rank r reports save 'a' in step 1 + r (ranks in different steps); rank 0 repeats it."""
    n = comm.world_size
    saves = {1 + comm.rank: {"a"}}
    if comm.rank == 0:
        saves[2] = {"a"}  # a duplicate from rank 0 must not count twice
    worker = ScriptedWorker(comm.rank, saves=saves)
    plans = [_plan(1, finished=["a", "b"], saving=["a"])] + [_plan(s) for s in range(2, n + 3)]
    return _run(comm, worker, plans)


def load_gating(comm: Communicator) -> dict[str, Any]:
    """Async load 'L' started in step 1; rank r reports it in step 1 + (world - 1 - r)."""
    n = comm.world_size
    worker = ScriptedWorker(comm.rank, loads={1 + (n - 1 - comm.rank): {"L"}})
    plans = [_plan(1, loading=["L"])] + [_plan(s) for s in range(2, n + 2)]
    return _run(comm, worker, plans)


def failed_block(comm: Communicator) -> dict[str, Any]:
    """The last rank alone reports block 7 failed in step 1."""
    failed = {1: {7}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, failed=failed)
    return _run(comm, worker, [_plan(1, loading=["L"]), _plan(2)])


def unknown_id(comm: Communicator) -> dict[str, Any]:
    """The last rank reports a save of 'zzz', which no rank was ever given."""
    saves = {1: {"zzz"}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, saves=saves)
    return _error_of(lambda: _run(comm, worker, [_plan(1, finished=["a"]), _plan(2)]))


def late_repeat(comm: Communicator) -> dict[str, Any]:
    """Every rank reports save 'a' in step 1, which releases it; the last rank reports it
    again in step 2 and, once the coordinator no longer holds its report, in step 4: both
    repeats are ignored, as a repeat while it was pending is ('a' completes once)."""
    saves = {1: {"a"}}
    if comm.rank == comm.world_size - 1:
        saves[2] = saves[4] = {"a"}
    worker = ScriptedWorker(comm.rank, saves=saves)
    plans = [_plan(1, finished=["a"], saving=["a"]), _plan(2), _plan(3), _plan(4)]
    return _run(comm, worker, plans)


def _with_new(plan: Plan, *ids: str) -> Plan:
    for rid in ids:
        plan.scheduler_output.new_requests.append(RequestData(rid, [1, 2], [0], 0, 2))
    return plan


def _with_cached(plan: Plan, *ids: str) -> Plan:
    for rid in ids:
        plan.scheduler_output.cached_requests.append(RequestData(rid, [3], [], 2, 1))
    return plan


# Plans an engine might get wrong in its request ids, each run on a coordinator of its own:
# a name, and the plans (the last one is refused).
BAD_REQUEST_IDS = {
    "new twice in one plan": [_with_new(_plan(1), "x", "x")],
    "new while live": [_with_new(_plan(1), "x"), _with_new(_plan(2), "x")],
    "finished and new at once": [
        _with_new(_plan(1), "x"),
        _with_new(_plan(2, finished=["x"]), "x"),
    ],
    "new while loading": [_plan(1, loading=["L"]), _with_new(_plan(2), "L")],
    "new and loading at once": [_with_new(_plan(1, loading=["L"]), "L")],
    "cached while loading": [
        _with_new(_plan(1), "L"),
        _plan(2, loading=["L"]),
        _with_cached(_plan(3), "L"),
    ],
    "cached and loading at once": [
        _with_new(_plan(1), "L"),
        _with_cached(_plan(2, loading=["L"]), "L"),
    ],
    "held but not finished": [_with_new(_plan(1), "a"), _plan(2, saving=["a"])],
    "new while its save runs": [_plan(1, finished=["x"], saving=["x"]), _with_new(_plan(2), "x")],
    "new while its save starts": [
        _with_new(_plan(1), "x"),
        _plan(2, finished=["x"]),
        _with_new(_plan(3, saving=["x"]), "x"),
    ],
    "held after reuse, unfinished": [
        _with_new(_plan(1), "a"),
        _plan(2, finished=["a"]),
        _with_new(_plan(3), "a"),
        _plan(4, saving=["a"]),
    ],
    "held twice for one finish": [  # its first save is reported done at step 2
        _with_new(_plan(1), "a"),
        _plan(2, finished=["a"], saving=["a"]),
        _plan(3, saving=["a"]),
    ],
    "cached, never sent": [_with_new(_plan(1), "x"), _with_cached(_plan(2), "x", "y")],
    "cached twice in one plan": [_with_new(_plan(1), "x"), _with_cached(_plan(2), "x", "x")],
    "cached after its finish": [
        _with_new(_plan(1), "x"),
        _plan(2, finished=["x"]),
        _with_cached(_plan(3), "x"),
    ],
    "step repeated": [_with_new(_plan(1), "x"), _with_cached(_plan(1), "x")],
    "step going back": [_plan(5), _plan(4)],
}


_SAVES_DONE = {"held twice for one finish": {2: {"a"}}}
"""The saves each rank reports done, by step, in the BAD_REQUEST_IDS cases that need any."""


def bad_request_ids(comm: Communicator) -> dict[str, Any]:
    """Each plan list of BAD_REQUEST_IDS: every rank raises at its last plan, naming the
    problem; the plans before it pass. Then the fine cases: an id reused a plan after its
    finish, a request scheduled once its load is done, a save held a plan after its finish,
    requests scheduled as cached after being sent as new, step numbers that skip."""
    out: dict[str, Any] = {}
    for name, plans in BAD_REQUEST_IDS.items():
        worker = ScriptedWorker(comm.rank, saves=_SAVES_DONE.get(name))
        out[name] = _error_of(lambda w=worker, p=plans: _run(comm, w, p))
    fine = [
        _with_new(_plan(1, loading=["L"]), "x"),
        _with_new(_plan(2, finished=["x"]), "y"),
        _with_cached(_plan(3, saving=["x"]), "y"),
        _with_new(_plan(4), "L"),
        _with_new(_with_cached(_plan(5), "y", "L"), "x"),
        _with_cached(_plan(7), "x"),  # steps may skip numbers
    ]
    worker = ScriptedWorker(comm.rank, loads={1: {"L"}}, saves={3: {"x"}})
    out["fine"] = _error_of(lambda: _run(comm, worker, fine))
    return out


def _stop(plan: Plan) -> Plan:
    plan.stop = True
    return plan


# Stop plans that carry work no rank would do (a stop plan runs no step), each run on a
# coordinator of its own: a name, and the plans (the last one, a stop, is refused).
BAD_STOP_PLANS = {
    "stop starting a save": [
        _with_new(_plan(1), "a"),
        _plan(2, finished=["a"]),
        _stop(_plan(3, saving=["a"])),
    ],
    "stop starting a load": [_stop(_plan(1, loading=["L"]))],
    "stop finishing a request": [_with_new(_plan(1), "x"), _stop(_plan(2, finished=["x"]))],
    "stop scheduling a request": [_stop(_with_new(_plan(1), "x"))],
    "stop with connector metadata": [_stop(_plan(1, meta={"saves": [1]}))],
}


def bad_stop_plans(comm: Communicator) -> dict[str, Any]:
    """Each plan list of BAD_STOP_PLANS: every rank raises at the stop plan, naming what it
    carries, rather than taking it: no worker would hear of that work, and a transfer it
    started would be waited for, never reported. Then the fine case: a stop plan while a
    save is in flight ends a loop (as each `generate` call does), and the save is
    reported and released in the next loop's steps."""
    out: dict[str, Any] = {}
    for name, plans in BAD_STOP_PLANS.items():
        worker = ScriptedWorker(comm.rank)
        out[name] = _error_of(lambda w=worker, p=plans: _run(comm, w, p))
    fine = [_plan(1, finished=["a"], saving=["a"]), _stop(_plan(1)), _plan(2), _stop(_plan(2))]
    worker = ScriptedWorker(comm.rank, saves={2: {"a"}})
    out["fine"] = _error_of(lambda: out.update(fine_steps=_run(comm, worker, fine)["steps"]))
    return out


def unheld_save(comm: Communicator) -> dict[str, Any]:
    """The last rank reports the save of 'a', a finished request it was handed but whose
    blocks were not held (request_finished returned False): the error says which ids have
    a save to report."""
    saves = {1: {"a"}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, saves=saves)
    return _error_of(lambda: _run(comm, worker, [_plan(1, finished=["a"]), _plan(2)]))


def finished_not_a_pair(comm: Communicator) -> dict[str, Any]:
    """The last rank's get_finished returns None (a forgotten return): every rank raises,
    naming the hook, instead of a bare unpacking TypeError."""
    bad = None if comm.rank == comm.world_size - 1 else "scripted"
    worker = ScriptedWorker(comm.rank, finished_returns=bad)
    return _error_of(lambda: _run(comm, worker, [_plan(1), _plan(2)]))


def bad_meta(comm: Communicator) -> dict[str, Any]:
    """Rank 0's connector metadata is not msgpack-encodable."""
    worker = ScriptedWorker(comm.rank)
    return _error_of(lambda: _run(comm, worker, [_plan(1, meta={"x": object()})]))


def undecodable_meta(comm: Communicator) -> dict[str, Any]:
    """Rank 0's connector metadata encodes but does not decode (a tuple key arrives as a
    list, which cannot key a dict): every rank raises, naming build_connector_meta's
    result, in step 1 (not "step -1")."""
    worker = ScriptedWorker(comm.rank)
    return _error_of(lambda: _run(comm, worker, [_plan(1, meta={(1, 2): "x"})]))


def bad_block(comm: Communicator) -> dict[str, Any]:
    """The last rank reports block -8 failed: not a block id (a negative index would clear
    another block's prefix-cache entry on rank 0)."""
    failed = {1: {-8}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, failed=failed)
    return _error_of(lambda: _run(comm, worker, [_plan(1, loading=["L"]), _plan(2)]))


def blocks_outside_cache(comm: Communicator) -> dict[str, Any]:
    """With `num_blocks=8`, a plan giving a request block 8 (cached), -1 (new) or 9 (after
    99 good ones) is refused on rank 0 before the broadcast, and every rank raises naming
    the request and the block; blocks 0-7 pass, few or many."""
    out: dict[str, Any] = {}
    first = _with_new(_plan(1), "x")
    later = _plan(2)
    later.scheduler_output.cached_requests.append(RequestData("x", [3], [7, 8], 2, 1))
    out["cached past the end"] = _error_of(
        lambda: _run(comm, ScriptedWorker(comm.rank), [first, later], num_blocks=8)
    )
    negative = _plan(1)
    negative.scheduler_output.new_requests.append(RequestData("y", [1, 2], [0, -1], 0, 2))
    out["new negative"] = _error_of(
        lambda: _run(comm, ScriptedWorker(comm.rank), [negative], num_blocks=8)
    )
    many = _plan(1)  # past 64 ids the check takes another path
    many.scheduler_output.new_requests.append(RequestData("w", [1, 2], [0] * 99 + [9], 0, 2))
    out["many, the last past the end"] = _error_of(
        lambda: _run(comm, ScriptedWorker(comm.rank), [many], num_blocks=8)
    )
    fine = _plan(1)
    fine.scheduler_output.new_requests.append(RequestData("z", [1, 2], [0, 7], 0, 2))
    fine.scheduler_output.new_requests.append(RequestData("v", [1, 2], [7] * 100, 0, 2))
    out["fine"] = _error_of(lambda: _run(comm, ScriptedWorker(comm.rank), [fine], num_blocks=8))
    return out


def unencodable_report(comm: Communicator) -> dict[str, Any]:
    """The last rank reports a failed block past int32: its report cannot be encoded, and
    it must still join the exchange (as an error) rather than leave the others waiting."""
    failed = {1: {2**40}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, failed=failed)
    return _error_of(lambda: _run(comm, worker, [_plan(1, loading=["L"]), _plan(2)]))


def bind_refused(comm: Communicator) -> dict[str, Any]:
    """The last rank's worker raises in bind_connector_meta: publish_plan returns on every
    rank (so each can still run its forward), and the report exchange raises on all."""
    worker = ScriptedWorker(comm.rank, refuse_bind=comm.rank == comm.world_size - 1)
    return _error_of(lambda: _run(comm, worker, [_plan(1, meta={"x": 1})]))


def worker_metas(comm: Communicator) -> dict[str, Any]:
    """Rank r says something to the scheduler in step 1 + r (bytes, as connectors pack
    keys); nobody says anything in the last step."""
    say = {1 + comm.rank: {"rank": comm.rank, "keys": bytes([comm.rank]) * 16}}
    worker = ScriptedWorker(comm.rank, worker_meta=say)
    return _run(comm, worker, [_plan(s) for s in range(1, comm.world_size + 2)])


def unencodable_worker_meta(comm: Communicator) -> dict[str, Any]:
    """The last rank's build_worker_meta returns a set: every rank raises, naming it."""
    say = {1: {1, 2}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, worker_meta=say)
    return _error_of(lambda: _run(comm, worker, [_plan(1), _plan(2)]))


def undecodable_worker_meta(comm: Communicator) -> dict[str, Any]:
    """The last rank's build_worker_meta returns a map with a tuple key: msgpack encodes
    it, but cannot decode it (the key comes back a list). Every rank must raise together,
    the sender included, rather than the sender going on while the others fail."""
    say = {1: {(1, 2): "x"}} if comm.rank == comm.world_size - 1 else {}
    worker = ScriptedWorker(comm.rank, worker_meta=say)
    return _error_of(lambda: _run(comm, worker, [_plan(1), _plan(2)]))


def plan_on_every_rank(comm: Communicator) -> dict[str, Any]:
    """Every rank passes a plan of its own to publish_plan (only rank 0 may): with more
    than one rank, every rank must raise together, naming the misuse, rather than the
    others silently running their own request batches beside rank 0's header."""
    coord = Coordinator(comm, ScriptedWorker(comm.rank), timeout_s=30)

    def step() -> None:
        so = SchedulerOutput(step=1)
        so.new_requests.add(f"from-rank{comm.rank}", [1, 2], [0], 0, 2)
        plan = coord.publish_plan(Plan(step=1, scheduler_output=so))
        # The forward's collectives come between: every rank must reach them.
        comm.allgather_bytes(b"forward", timeout_s=30, what="stand-in for the forward")
        coord.exchange_reports(plan)

    return _error_of(step)


def no_plan_on_rank_0(comm: Communicator) -> dict[str, Any]:
    """Rank 0 passes None to publish_plan too: it still broadcasts (an error plan), so
    every rank raises together, rather than rank 0 alone while the others wait for a
    plan until the deadline."""
    coord = Coordinator(comm, ScriptedWorker(comm.rank), timeout_s=30)
    return _error_of(lambda: coord.exchange_reports(coord.publish_plan(None)))


SCENARIOS = {
    f.__name__: f
    for f in (
        plan_on_every_rank,
        no_plan_on_rank_0,
        save_gating,
        load_gating,
        failed_block,
        unknown_id,
        late_repeat,
        bad_request_ids,
        bad_stop_plans,
        unheld_save,
        finished_not_a_pair,
        bad_meta,
        undecodable_meta,
        bind_refused,
        bad_block,
        blocks_outside_cache,
        unencodable_report,
        worker_metas,
        unencodable_worker_meta,
        undecodable_worker_meta,
    )
}


def _check_refusals(results: list[dict[str, Any]], said: dict[str, str]) -> None:
    """Every rank raised `RemoteError` saying `said[case]` in each case, and not in the
    fine one."""
    for r in results:
        for case, text in said.items():
            got = r[case]
            assert got.get("type") == "RemoteError" and text in got["error"], (case, got)
        assert r["fine"]["error"] is None, r["fine"]


def check(name: str, results: list[dict[str, Any]]) -> None:
    """Assert the gathered observations of every rank for scenario `name`."""
    n = len(results)
    assert [r.get("rank", i) for i, r in enumerate(results)] == list(range(n))
    if name == "save_gating":
        for r in results:
            done_steps = [i + 1 for i, s in enumerate(r["steps"]) if s["saves"]]
            # Released once, and only in the step the last rank reported it (step n).
            assert done_steps == [n], (r["rank"], done_steps)
            assert r["steps"][n - 1]["saves"] == ["a"]
            # Each id is handed to get_finished exactly once.
            handed = [ids for ids in r["given_finished"] if ids]
            assert handed == [["a", "b"]], handed
            assert r["pending"] == 0
            assert r["max_collectives"] <= 2
            # After step s, ranks s.. have not reported 'a' (rank r reports in step 1 + r).
            waiting = [s["waiting"][0] for s in r["steps"]]
            assert waiting == [list(range(s, n)) for s in range(1, n)] + [None] * 3, waiting
        digests = {tuple(s["digest"] for s in r["steps"]) for r in results}
        assert len(digests) == 1, "ranks bound different plan bytes"
    elif name == "load_gating":
        for r in results:
            done = [(i + 1, s["loads"]) for i, s in enumerate(r["steps"]) if s["loads"]]
            assert done == [(n, ["L"])], done
            assert [ids for ids in r["given_loading"] if ids] == [["L"]]
            # Rank r reports 'L' in step 1 + (n - 1 - r): after step s, ranks 0..n-1-s wait.
            waiting = [s["waiting"][1] for s in r["steps"]]
            assert waiting == [list(range(n - s)) for s in range(1, n)] + [None] * 2, waiting
    elif name == "failed_block":
        for r in results:
            assert r["steps"][0]["failed"] == [7], r
            assert r["steps"][1]["failed"] == []
    elif name == "unknown_id":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert "zzz" in r["error"] and "never given" in r["error"], r["error"]
            assert f"rank {n - 1}" in r["error"]
    elif name == "late_repeat":
        for r in results:
            assert [s["saves"] for s in r["steps"]] == [["a"], [], [], []], r
    elif name == "bad_request_ids":
        said = {
            "new twice in one plan": "the plan of step 1 schedules request(s) ['x'] twice as new",
            "new while live": "the plan of step 2 sends request(s) ['x'] as new while a live",
            "finished and new at once": "lists request(s) ['x'] both as finished and as new",
            "new while loading": "the plan of step 2 schedules request(s) ['L'] while their "
            "async load is in flight",
            "new and loading at once": "the plan of step 1 schedules request(s) ['L'] while",
            "cached while loading": "the plan of step 3 schedules request(s) ['L'] "
            "(cached_requests) while their async load is in flight",
            "cached and loading at once": "the plan of step 2 schedules request(s) ['L'] "
            "(cached_requests) while their async load is in flight",
            "held but not finished": "holds request(s) ['a'] for a save (saving_req_ids) that "
            "no plan listed in finished_req_ids",
            "new while its save runs": "the plan of step 2 sends request(s) ['x'] as new while "
            "the save of an earlier request with that id is in flight",
            "held after reuse, unfinished": "the plan of step 4 holds request(s) ['a'] for a save",
            "held twice for one finish": "the plan of step 3 holds request(s) ['a'] for a save "
            "(saving_req_ids) that no plan listed in finished_req_ids since its last save",
            "new while its save starts": "the plan of step 3 sends request(s) ['x'] as new while "
            "the save of an earlier request with that id is in flight",
            "cached, never sent": "the plan of step 2 schedules request(s) ['y'] as cached",
            "cached twice in one plan": "the plan of step 2 schedules request(s) ['x'] more "
            "than once in cached_requests",
            "cached after its finish": "the plan of step 3 schedules request(s) ['x'] as cached",
            "step repeated": "the plan of step 1 comes after the plan of step 1",
            "step going back": "the plan of step 4 comes after the plan of step 5",
        }
        _check_refusals(results, said)
    elif name == "blocks_outside_cache":
        said = {
            "cached past the end": "the plan of step 2 gives request 'x' (cached_requests) "
            "block id(s) [8] outside the KV cache's 8 blocks [0, 8)",
            "new negative": "the plan of step 1 gives request 'y' (new_requests) block id(s) "
            "[-1] outside the KV cache's 8 blocks",
            "many, the last past the end": "gives request 'w' (new_requests) block id(s) [9]",
        }
        _check_refusals(results, said)
    elif name == "bad_stop_plans":
        said = {
            "stop starting a save": "the stop plan of step 3 carries saving_req_ids ['a']",
            "stop starting a load": "the stop plan of step 1 carries loading_req_ids ['L']",
            "stop finishing a request": "the stop plan of step 2 carries finished_req_ids ['x']",
            "stop scheduling a request": "the stop plan of step 1 carries new_requests ['x']",
            "stop with connector metadata": "the stop plan of step 1 carries connector metadata",
        }
        _check_refusals(results, said)
        for r in results:
            steps = r["fine_steps"]
            assert steps[1] == {"stop": 1, "pending": 1}, steps  # the save outlives the stop
            assert steps[2]["saves"] == ["a"] and steps[3] == {"stop": 2, "pending": 0}, steps
    elif name == "unheld_save":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert "save of request 'a'" in r["error"], r["error"]
            assert "request_finished returned True" in r["error"], r["error"]
            assert f"rank {n - 1}" in r["error"]
    elif name == "finished_not_a_pair":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert "get_finished on rank" in r["error"], r["error"]
            assert "must return (saved ids, loaded ids), got None" in r["error"], r["error"]
    elif name == "bad_meta":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert "connector metadata" in r["error"] and "msgpack" in r["error"], r["error"]
    elif name == "undecodable_meta":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert "failed in step 1: cannot decode plan" in r["error"], r["error"]
            assert "(build_connector_meta's result) does not decode" in r["error"], r["error"]
    elif name in ("bad_block", "unencodable_report"):
        for r in results:
            assert r["type"] == "RemoteError", r
            assert f"rank {n - 1} failed in step 1" in r["error"], r["error"]
            want = "not block ids" if name == "bad_block" else "cannot encode this rank's report"
            assert want in r["error"], r["error"]
    elif name == "worker_metas":
        for r in results:
            got = [s["worker_metas"] for s in r["steps"]]
            for step, metas in enumerate(got[:n], start=1):
                # Only the rank whose turn it is says something; the others are None.
                want = [None] * n
                want[step - 1] = {"rank": step - 1, "keys": bytes([step - 1]) * 16}
                assert metas == repr(want), (r["rank"], step, metas)
            assert got[n] == "[]", "a step where no rank said anything carries nothing"
    elif name in ("unencodable_worker_meta", "undecodable_worker_meta"):
        for r in results:
            assert r["type"] == "RemoteError", r
            assert f"rank {n - 1} failed in step 1" in r["error"], r["error"]
            assert "ScriptedWorker.build_worker_meta must return plain msgpack" in r["error"]
    elif name == "plan_on_every_rank":
        for r in results:
            if n == 1:
                assert r["error"] is None, r
                continue
            assert r["type"] == "RemoteError", r
            assert "only rank 0 passes one" in r["error"], r["error"]
    elif name == "no_plan_on_rank_0":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert "rank 0 failed in step 1: ValueError: rank 0 passed no plan" in r["error"]
    elif name == "bind_refused":
        for r in results:
            assert r["type"] == "RemoteError", r
            assert f"rank {n - 1} failed in step 1" in r["error"], r["error"]
            assert "refuses this metadata" in r["error"], r["error"]
    else:
        raise KeyError(name)
