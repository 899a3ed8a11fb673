"""Connector registry: name → (module path, scheduler class, worker class), imported lazily.

Lazy so that naming a connector costs nothing until it is used, and a broken optional
connector cannot break `import kvdist`. A user connector is either registered under a name
or given by dotted path (`ConnectorConfig(module=..., scheduler_class=..., worker_class=...)`).
`DEFAULT_REGISTRY` holds the built-ins; tests and embedders may pass their own registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import ConnectorConfig, ConnectorContext, import_attr


@dataclass(frozen=True)
class ConnectorEntry:
    module: str
    scheduler_class: str
    worker_class: str


class ConnectorRegistry:
    def __init__(self, entries: dict[str, ConnectorEntry] | None = None) -> None:
        self._entries: dict[str, ConnectorEntry] = dict(entries or {})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def register(self, name: str, module: str, scheduler_class: str, worker_class: str) -> None:
        for what, value in (
            ("name", name),
            ("module", module),
            ("scheduler_class", scheduler_class),
            ("worker_class", worker_class),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"register_connector: {what} must be a non-empty string")
        entry = ConnectorEntry(module, scheduler_class, worker_class)
        e = self._entries.get(name)
        if e is not None and e != entry:  # the same again (a module imported twice) is fine
            raise ValueError(
                f"connector {name!r} is already registered ({e.module}:{e.scheduler_class}/"
                f"{e.worker_class}); pick another name"
            )
        self._entries[name] = entry

    def entry(self, config: ConnectorConfig) -> ConnectorEntry:
        if config.name is None:
            assert config.module and config.scheduler_class and config.worker_class
            return ConnectorEntry(config.module, config.scheduler_class, config.worker_class)
        if config.name not in self._entries:
            raise ValueError(
                f"unknown connector {config.name!r}; registered connectors: {self.names()} "
                "(or give module=, scheduler_class=, worker_class= for your own)"
            )
        return self._entries[config.name]

    def resolve(
        self, config: ConnectorConfig
    ) -> tuple[type[ConnectorScheduler], type[ConnectorWorker]]:
        e = self.entry(config)
        sched = _load(e.module, e.scheduler_class, ConnectorScheduler)
        worker = _load(e.module, e.worker_class, ConnectorWorker)
        return sched, worker


def _load(module: str, name: str, base: type) -> Any:
    cls = import_attr(module, name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(
            f"{module}.{name} must be a subclass of kvdist.{base.__name__}, got {cls!r}"
        )
    return cls


DEFAULT_REGISTRY = ConnectorRegistry(
    {
        "disk": ConnectorEntry(
            "kvdist.connectors.disk", "DiskConnectorScheduler", "DiskConnectorWorker"
        ),
        "cpu": ConnectorEntry(
            "kvdist.connectors.cpu", "CpuConnectorScheduler", "CpuConnectorWorker"
        ),
        "tiered": ConnectorEntry(
            "kvdist.connectors.tiered", "TieredConnectorScheduler", "TieredConnectorWorker"
        ),
    }
)


def register_connector(
    name: str,
    module: str,
    scheduler_class: str,
    worker_class: str,
    *,
    registry: ConnectorRegistry | None = None,
) -> None:
    """Register a connector under `name` (imported only when first used).

    Raises ValueError if `name` is taken."""
    (registry or DEFAULT_REGISTRY).register(name, module, scheduler_class, worker_class)


def resolve_connector(
    config: ConnectorConfig | str | dict[str, Any], *, registry: ConnectorRegistry | None = None
) -> tuple[type[ConnectorScheduler], type[ConnectorWorker]]:
    """The (scheduler class, worker class) of a connector config.

    ValueError: unknown name, module that does not import, missing class.
    TypeError: a class that does not implement the connector ABC."""
    return (registry or DEFAULT_REGISTRY).resolve(ConnectorConfig.from_any(config))


def create_connector(
    config: ConnectorConfig | str | dict[str, Any],
    ctx: ConnectorContext,
    *,
    registry: ConnectorRegistry | None = None,
) -> tuple[ConnectorScheduler | None, ConnectorWorker]:
    """Build this rank's halves of a connector: the scheduler on rank 0 only, the worker on
    every rank. `ctx.kwargs` is replaced by the config's kwargs."""
    config = ConnectorConfig.from_any(config)
    sched_cls, worker_cls = resolve_connector(config, registry=registry)
    ctx = ctx.with_kwargs(config.kwargs)
    scheduler = sched_cls(ctx) if ctx.rank == 0 else None
    try:
        return scheduler, worker_cls(ctx)
    except BaseException:
        if scheduler is not None:  # its threads (a disk index's rescans) must not outlive it
            scheduler.shutdown()
        raise
