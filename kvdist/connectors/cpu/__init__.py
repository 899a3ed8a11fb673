"""The `cpu` connector: an LRU pool of KV blocks in (pinned) host memory on every rank."""

from kvdist.connectors.cpu.scheduler import CpuConnectorScheduler
from kvdist.connectors.cpu.settings import CpuSettings
from kvdist.connectors.cpu.worker import CpuConnectorWorker

__all__ = ["CpuConnectorScheduler", "CpuConnectorWorker", "CpuSettings"]
