"""Built-in KV connectors (`disk`, `cpu`, `tiered`) and the connector registry.

Connector modules are imported only when a connector is resolved (see `registry`).
"""

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
