"""The `disk` connector: a persistent KV cache of one record per block shard per rank."""

from kvdist.connectors.disk.scheduler import DiskConnectorScheduler
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.disk.worker import DiskConnectorWorker

__all__ = ["DiskConnectorScheduler", "DiskConnectorWorker", "DiskSettings"]
