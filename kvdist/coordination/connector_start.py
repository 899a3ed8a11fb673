"""Starting a connector's halves on every rank together, and shutting them down.

A connector that fails to start on one rank (its `__init__`, or `register_kv_caches`)
fails every rank at once: without the exchange here, the others would wait for it in the
first collective and blame it only by its absence. The same exchange carries each rank's
`ConnectorWorker.agreed_settings()`: settings that differ between ranks (a pool sized
from each rank's free memory, tiers in another order) fail every rank here, naming the
setting, rather than a step hours later with an error about block rows. It carries, too,
each rank's `ConnectorWorker.shared_storage()` and host name: ranks that find another
store under one name (a cache path on each node's own disk) fail every rank here, rather
than missing every lookup for as long as the job runs.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import msgpack
import torch

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.numbers import as_int
from kvdist.api.types import ConnectorConfig, ConnectorContext
from kvdist.comm.base import Communicator
from kvdist.coordination.errors import ConnectorError, call_hook
from kvdist.wire.codec import utf8_text

log = logging.getLogger("kvdist")

Halves = tuple[ConnectorScheduler | None, ConnectorWorker]
"""The scheduler half (rank 0 only, else None) and this rank's worker half."""


def start_connector(
    config: ConnectorConfig | dict[str, Any] | str,
    ctx: ConnectorContext,
    kv_cache: torch.Tensor,
    comm: Communicator,
    timeout_s: float,
) -> Halves:
    """Create the connector's halves and register the KV cache with the worker, on every
    rank together (a collective: every rank calls it); raise on every rank when it failed
    on any, or when the ranks' agreed settings or shared storage differ, after shutting
    down what started. `config` as `create_connector` takes it."""
    from kvdist.connectors.registry import create_connector

    stage, error = "reading its config", None
    cfg: ConnectorConfig | None = None
    scheduler: ConnectorScheduler | None = None
    worker: ConnectorWorker | None = None
    agreed = b""
    storage: dict[str, str] = {}
    try:
        cfg = ConnectorConfig.from_any(config)
        stage = "creating it"
        scheduler, worker = create_connector(cfg, ctx)
        stage = f"{type(worker).__name__}.register_kv_caches"
        worker.register_kv_caches(kv_cache)
        stage = f"{type(worker).__name__}.agreed_settings"
        agreed = msgpack.packb(worker.agreed_settings(), use_bin_type=True, default=_kind_of)
        stage = f"{type(worker).__name__}.shared_storage"
        storage = _checked_storage(worker.shared_storage())
    except Exception as exc:
        error = exc
    failed: dict[int, str] = {}
    settings: list[Any] = []
    storages: list[tuple[str, dict[str, str]]] = []
    try:
        if comm.world_size > 1:
            mine = f"{stage}: {type(error).__name__}: {error}" if error is not None else ""
            texts = {utf8_text(k): utf8_text(v) for k, v in storage.items()}
            got = comm.allgather_bytes(
                msgpack.packb(
                    [utf8_text(mine), agreed, texts, socket.gethostname()], use_bin_type=True
                ),
                timeout_s=timeout_s,
                what="connector start",
            )
            for r, (why, theirs, store, host) in enumerate(
                msgpack.unpackb(g, strict_map_key=False) for g in got
            ):
                if why:
                    failed[r] = why
                settings.append(theirs)
                storages.append((host, store))
    except BaseException:
        _abandon(scheduler, worker)  # a rank stuck starting (or gone): stop what started
        raise
    if cfg is None:
        name = repr(config)
    else:
        name = cfg.name or f"{cfg.module}:{cfg.scheduler_class}:{cfg.worker_class}"
    if error is None and not failed:
        assert worker is not None
        try:
            mismatch = _settings_mismatch(settings, name) or _storage_mismatch(storages, name)
            if mismatch is not None:
                raise ValueError(mismatch)
        except BaseException:
            _abandon(scheduler, worker)
            raise
        return scheduler, worker
    _abandon(scheduler, worker)
    if error is not None:
        raise error
    rank, why = next(iter(failed.items()))
    raise RuntimeError(
        f"the connector {name!r} did not start on rank(s) {sorted(failed)}; on rank {rank}, {why}"
    )


_UNSET = "(not set)"


def _kind_of(value: object) -> Any:
    """What a setting that is not plain data is compared by: a path's text, an integer's
    value (a numpy one in a connector's own kwargs), else its type (a live object's repr
    names its address, which differs between ranks)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    number = as_int(value)
    if number is not None:
        return number
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _settings_mismatch(packed: list[bytes], name: str) -> str | None:
    """Why the ranks' `agreed_settings` differ (the first rank and setting that differ
    from rank 0's), or None when they are all equal."""
    # The same bytes are the same settings (NaN included); otherwise the decoded values
    # decide (the same dict in another key order is equal). Decoded with tuples, so that
    # any map key decodes.
    values = [msgpack.unpackb(p, strict_map_key=False, use_list=False) for p in packed]
    for rank, theirs in enumerate(values[1:], start=1):
        if packed[rank] != packed[0] and theirs != values[0]:
            where, ours, other = _difference(values[0], theirs, "")
            return (
                f"the connector {name!r} has other settings on rank {rank} than on rank 0: "
                f"{where} is {other!r} there and {ours!r} on rank 0; every rank must pass "
                "the same settings (but those its ConnectorWorker.agreed_settings leaves out)"
            )
    return None


def _checked_storage(storage: Any) -> dict[str, str]:
    if not isinstance(storage, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in storage.items()
    ):
        raise TypeError(f"shared_storage() must return a dict of str to str, got {storage!r:.200}")
    return storage


def _storage_mismatch(storages: list[tuple[str, dict[str, str]]], name: str) -> str | None:
    """Why the ranks do not share the storage their workers name (the first rank that
    finds another identity than the first rank naming it), or None when they all do."""
    first: dict[str, tuple[int, str, str]] = {}  # storage -> (rank, host, identity)
    for rank, (host, storage) in enumerate(storages):
        for what, ident in sorted(storage.items()):
            r0, host0, ident0 = first.setdefault(what, (rank, host, ident))
            if ident == ident0:
                continue
            if host != host0:
                where = f"rank {rank} (on {host}) finds another one than rank {r0} (on {host0})"
                fix = (
                    "on several nodes it must be on a filesystem that every node mounts (NFS, "
                    "Lustre, ...): a path on each node's own disk is another store on each"
                )
            else:
                where = f"rank {rank} finds another one than rank {r0} (both on {host})"
                fix = (
                    "the path must lead every rank to the same place (a relative path from "
                    "another working directory, or each rank's own container, leads elsewhere)"
                )
            return (
                f"the connector {name!r} needs every rank to use one and the same {what}, "
                f"but {where}; {fix}, since rank 0 plans from what it alone sees"
            )
    return None


def _difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    """The first place where `a` and `b` (decoded msgpack data, not equal) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys(), key=repr):
            x, y = a.get(k, _UNSET), b.get(k, _UNSET)
            if x != y:
                return _difference(x, y, f"{path}.{k}" if path else str(k))
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _difference(x, y, f"{path}[{i}]")
    return path or "the settings", a, b


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


def connector_stats(
    scheduler: ConnectorScheduler | None, worker: ConnectorWorker | None
) -> dict[str, float]:
    """This rank's connector counters: the numbers of each half's `stats` dict (a
    convention of the built-in connectors: a half without one adds nothing), summed where
    both halves name one, under the names the halves give them. Per rank: rank 0's holds
    the scheduler's too."""
    out: dict[str, float] = {}
    for part in (scheduler, worker):
        stats = getattr(part, "stats", None)
        if isinstance(stats, dict):
            for k, v in stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
    return out


def _abandon(scheduler: ConnectorScheduler | None, worker: ConnectorWorker | None) -> None:
    """After a failed start: shut down the halves that started, their errors logged, not
    raised (the start's own error is the one to report)."""
    for exc in shutdown_connector(scheduler, worker):
        log.error("%s", exc)
