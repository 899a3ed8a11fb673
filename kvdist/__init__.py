"""kvdist: KV-cache connectors coordinated across tensor-parallel ranks.

Connector side: `ConnectorScheduler` (rank 0) and `ConnectorWorker` (every rank) with their
plain data types (`RequestData` rows held in a `RequestBatch`), `register_connector`, and
`pack_ids` / `unpack_ids` / `kv_head_shard` for their metadata and shards, `parse_settings`
for their settings; engine side:
`LLM`, `SamplingParams`, `RequestOutput`; for an engine of your own: `init_distributed`
(a `Topology`), `start_connector` (or `create_connector` on one rank), `shutdown_connector`,
`connector_stats`,
`Coordinator`, `Plan`, `Consensus`, `WorkerHooks` (a step's worker hooks, a failing one
leaving the forward to run), `matched_tokens` (the lookup, checked), `block_hashes` and
`extend_block_hashes`, `call_hook` (a hook's exception as a `ConnectorError` naming the
connector and the hook);
errors raised on every rank together: `RemoteError`, `ProtocolError`, and `ForwardError`
(a rank's forward pass). See README.md and docs/DESIGN.md.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
    from kvdist.api.types import (
        ConnectorConfig,
        ConnectorContext,
        Request,
        RequestBatch,
        RequestData,
        SchedulerOutput,
    )
    from kvdist.comm.setup import Topology, init_distributed
    from kvdist.connectors.registry import create_connector, register_connector
    from kvdist.connectors.settings import parse_settings
    from kvdist.connectors.tracking import unpack_ids
    from kvdist.coordination.connector_start import (
        connector_stats,
        shutdown_connector,
        start_connector,
    )
    from kvdist.coordination.coordinator import Consensus, Coordinator
    from kvdist.coordination.errors import (
        ConnectorError,
        ProtocolError,
        RemoteError,
        call_hook,
        matched_tokens,
    )
    from kvdist.coordination.worker_hooks import WorkerHooks
    from kvdist.engine.llm import LLM, ForwardError
    from kvdist.engine.outputs import RequestOutput
    from kvdist.engine.sampling import SamplingParams
    from kvdist.kv.hashing import block_hashes, extend_block_hashes
    from kvdist.kv.layout import kv_head_shard
    from kvdist.wire.codec import Plan, pack_ids

__version__ = "0.1.0"

__all__ = [
    "ConnectorConfig",
    "ConnectorContext",
    "ConnectorError",
    "ConnectorScheduler",
    "ConnectorWorker",
    "Consensus",
    "Coordinator",
    "ForwardError",
    "LLM",
    "Plan",
    "ProtocolError",
    "RemoteError",
    "Request",
    "RequestBatch",
    "RequestData",
    "RequestOutput",
    "SamplingParams",
    "SchedulerOutput",
    "Topology",
    "WorkerHooks",
    "block_hashes",
    "call_hook",
    "connector_stats",
    "create_connector",
    "extend_block_hashes",
    "init_distributed",
    "kv_head_shard",
    "matched_tokens",
    "pack_ids",
    "parse_settings",
    "register_connector",
    "shutdown_connector",
    "start_connector",
    "unpack_ids",
    "__version__",
]

_LAZY = {
    "ConnectorScheduler": ("kvdist.api.connector", "ConnectorScheduler"),
    "ConnectorWorker": ("kvdist.api.connector", "ConnectorWorker"),
    "ConnectorConfig": ("kvdist.api.types", "ConnectorConfig"),
    "ConnectorContext": ("kvdist.api.types", "ConnectorContext"),
    "Request": ("kvdist.api.types", "Request"),
    "RequestBatch": ("kvdist.api.types", "RequestBatch"),
    "RequestData": ("kvdist.api.types", "RequestData"),
    "SchedulerOutput": ("kvdist.api.types", "SchedulerOutput"),
    "LLM": ("kvdist.engine.llm", "LLM"),
    "SamplingParams": ("kvdist.engine.sampling", "SamplingParams"),
    "RequestOutput": ("kvdist.engine.outputs", "RequestOutput"),
    "register_connector": ("kvdist.connectors.registry", "register_connector"),
    "create_connector": ("kvdist.connectors.registry", "create_connector"),
    "init_distributed": ("kvdist.comm.setup", "init_distributed"),
    "Coordinator": ("kvdist.coordination.coordinator", "Coordinator"),
    "start_connector": ("kvdist.coordination.connector_start", "start_connector"),
    "shutdown_connector": ("kvdist.coordination.connector_start", "shutdown_connector"),
    "connector_stats": ("kvdist.coordination.connector_start", "connector_stats"),
    "Consensus": ("kvdist.coordination.coordinator", "Consensus"),
    "Plan": ("kvdist.wire.codec", "Plan"),
    "ProtocolError": ("kvdist.coordination.errors", "ProtocolError"),
    "RemoteError": ("kvdist.coordination.errors", "RemoteError"),
    "ConnectorError": ("kvdist.coordination.errors", "ConnectorError"),
    "call_hook": ("kvdist.coordination.errors", "call_hook"),
    "matched_tokens": ("kvdist.coordination.errors", "matched_tokens"),
    "WorkerHooks": ("kvdist.coordination.worker_hooks", "WorkerHooks"),
    "ForwardError": ("kvdist.engine.llm", "ForwardError"),
    "Topology": ("kvdist.comm.setup", "Topology"),
    "block_hashes": ("kvdist.kv.hashing", "block_hashes"),
    "extend_block_hashes": ("kvdist.kv.hashing", "extend_block_hashes"),
    # For connector metadata: ids as packed int32 bytes, and another rank's KV heads.
    "pack_ids": ("kvdist.wire.codec", "pack_ids"),
    "unpack_ids": ("kvdist.connectors.tracking", "unpack_ids"),
    "kv_head_shard": ("kvdist.kv.layout", "kv_head_shard"),
    # For a connector's settings: a dataclass from ctx.kwargs, unknown and missing named.
    "parse_settings": ("kvdist.connectors.settings", "parse_settings"),
}


def __getattr__(name: str) -> Any:
    # Every name is imported on first use: connector authors need not pay for the engine's
    # model code, and a process that imports one torch-free module of kvdist (the disk
    # connector's writer process) does not import torch at all.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvdist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
