"""Built-in KV connectors (`disk`, `cpu`, `tiered`) and the connector registry.

Connector modules are imported only when a connector is resolved (see `registry`).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvdist.connectors.registry import (
        DEFAULT_REGISTRY,
        ConnectorRegistry,
        create_connector,
        register_connector,
        resolve_connector,
    )
    from kvdist.connectors.settings import STAT_KEYS

__all__ = [
    "DEFAULT_REGISTRY",
    "STAT_KEYS",
    "ConnectorRegistry",
    "create_connector",
    "register_connector",
    "resolve_connector",
]


def __getattr__(name: str):
    # Imported on first use, so that torch-free modules below stay importable without torch.
    if name in __all__:
        import importlib

        module = (
            "kvdist.connectors.settings" if name == "STAT_KEYS" else "kvdist.connectors.registry"
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'kvdist.connectors' has no attribute {name!r}")
