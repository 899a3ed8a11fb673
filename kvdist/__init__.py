"""kvdist: KV-cache connectors coordinated across tensor-parallel ranks.

Connector side: `ConnectorScheduler` (rank 0) and `ConnectorWorker` (every rank) with their
plain data types; engine side: `LLM`, `SamplingParams`, `RequestOutput`; for an engine of
your own: `init_distributed`, `create_connector`, `Coordinator`, `Plan`, `Consensus`.
See DESIGN.md.
"""

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import (
    ConnectorConfig,
    ConnectorContext,
    Request,
    RequestBatch,
    RequestData,
    SchedulerOutput,
)

__version__ = "0.1.0"

__all__ = [
    "ConnectorConfig",
    "ConnectorContext",
    "ConnectorScheduler",
    "ConnectorWorker",
    "Consensus",
    "Coordinator",
    "LLM",
    "Plan",
    "Request",
    "RequestBatch",
    "RequestData",
    "RequestOutput",
    "SamplingParams",
    "SchedulerOutput",
    "create_connector",
    "init_distributed",
    "register_connector",
    "__version__",
]

_LAZY = {
    "LLM": ("kvdist.engine.llm", "LLM"),
    "SamplingParams": ("kvdist.engine.sampling", "SamplingParams"),
    "RequestOutput": ("kvdist.engine.outputs", "RequestOutput"),
    "register_connector": ("kvdist.connectors.registry", "register_connector"),
    "create_connector": ("kvdist.connectors.registry", "create_connector"),
    "init_distributed": ("kvdist.comm.setup", "init_distributed"),
    "Coordinator": ("kvdist.coordination.coordinator", "Coordinator"),
    "Consensus": ("kvdist.coordination.coordinator", "Consensus"),
    "Plan": ("kvdist.wire.codec", "Plan"),
}


def __getattr__(name: str):
    # The engine pulls in the model code; connector authors importing kvdist need not pay it.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvdist' has no attribute {name!r}")
