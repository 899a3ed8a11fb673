"""Starting a connector's halves on every rank together, and shutting them down.

A connector that fails to start on one rank (its `__init__`, or `register_kv_caches`)
fails every rank at once: without the exchange here, the others would wait for it in the
first collective and blame it only by its absence.
"""

from __future__ import annotations

import logging

import torch

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import ConnectorConfig, ConnectorContext
from kvdist.comm.base import Communicator
from kvdist.coordination.errors import ConnectorError, call_hook

log = logging.getLogger("kvdist")

Halves = tuple[ConnectorScheduler | None, ConnectorWorker]
"""The scheduler half (rank 0 only, else None) and this rank's worker half."""


def start_connector(
    cfg: ConnectorConfig,
    ctx: ConnectorContext,
    kv_cache: torch.Tensor,
    comm: Communicator,
    timeout_s: float,
) -> Halves:
    """Create the connector's halves and register the KV cache with the worker, on every
    rank; raise on every rank when it failed on any (after shutting down what started)."""
    from kvdist.connectors.registry import create_connector

    stage, error = "creating it", None
    scheduler: ConnectorScheduler | None = None
    worker: ConnectorWorker | None = None
    try:
        scheduler, worker = create_connector(cfg, ctx)
        stage = f"{type(worker).__name__}.register_kv_caches"
        worker.register_kv_caches(kv_cache)
    except Exception as exc:
        error = exc
    failed: dict[int, str] = {}
    try:
        if comm.world_size > 1:
            mine = f"{stage}: {type(error).__name__}: {error}" if error is not None else ""
            got = comm.allgather_bytes(mine.encode(), timeout_s=timeout_s, what="connector start")
            failed = {r: m.decode() for r, m in enumerate(got) if m}
    except BaseException:
        _abandon(scheduler, worker)  # a rank stuck starting (or gone): stop what started
        raise
    if error is None and not failed:
        assert worker is not None
        return scheduler, worker
    _abandon(scheduler, worker)
    if error is not None:
        raise error
    rank, why = next(iter(failed.items()))
    name = cfg.name or f"{cfg.module}:{cfg.scheduler_class}:{cfg.worker_class}"
    raise RuntimeError(
        f"the connector {name!r} did not start on rank(s) {sorted(failed)}; on rank {rank}, {why}"
    )


def shutdown_connector(
    scheduler: ConnectorScheduler | None, worker: ConnectorWorker | None
) -> list[ConnectorError]:
    """Shut down each half, whatever the other raises; their errors."""
    errors = []
    for part in (worker, scheduler):
        if part is not None:
            try:
                call_hook(part, "shutdown")
            except ConnectorError as exc:
                errors.append(exc)
    return errors


def _abandon(scheduler: ConnectorScheduler | None, worker: ConnectorWorker | None) -> None:
    """After a failed start: shut down the halves that started, their errors logged, not
    raised (the start's own error is the one to report)."""
    for exc in shutdown_connector(scheduler, worker):
        log.error("%s", exc)
