"""The `disk` connector: a persistent KV cache of one record per block shard per rank."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvdist.connectors.disk.scheduler import DiskConnectorScheduler
    from kvdist.connectors.disk.settings import DiskSettings
    from kvdist.connectors.disk.worker import DiskConnectorWorker

__all__ = ["DiskConnectorScheduler", "DiskConnectorWorker", "DiskSettings"]

_MODULES = {
    "DiskConnectorScheduler": "scheduler",
    "DiskConnectorWorker": "worker",
    "DiskSettings": "settings",
}


def __getattr__(name: str):
    # Imported on first use: the writer process imports the torch-free modules of this
    # package (record, store, io_pool, writer_process) without torch.
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
