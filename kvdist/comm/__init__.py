"""Communication: launch detection, control-plane communicators, `init_distributed`.

`MPICommunicator` and `TorchCommunicator` load on first use, so importing `kvdist.comm`
never initialises MPI (under torchrun that would start a singleton MPI job); nor does it
import torch, which `init_distributed`, `Topology` and `abort_on_error` load. When every
rank is on one host, `init_distributed` wraps either in a `SharedMemoryCommunicator`
(`kvdist.comm.shm`; `KVDIST_SHM=0` turns that off).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvdist.comm.base import (
    CollectiveMismatch,
    CollectiveTimeout,
    CommStats,
    Communicator,
    LateForCollective,
)
from kvdist.comm.launch_env import LaunchEnv, default_comm_kind, read_launch_env
from kvdist.comm.local import LocalCommunicator
from kvdist.comm.shm import SharedMemoryCommunicator

if TYPE_CHECKING:
    from kvdist.comm.mpi import MPICommunicator
    from kvdist.comm.setup import Topology, abort_on_error, init_distributed
    from kvdist.comm.torch_dist import TorchCommunicator

__all__ = [
    "CollectiveMismatch",
    "CollectiveTimeout",
    "LateForCollective",
    "CommStats",
    "Communicator",
    "LaunchEnv",
    "LocalCommunicator",
    "MPICommunicator",
    "SharedMemoryCommunicator",
    "Topology",
    "TorchCommunicator",
    "abort_on_error",
    "default_comm_kind",
    "init_distributed",
    "read_launch_env",
]


def __getattr__(name: str) -> Any:
    if name in ("Topology", "abort_on_error", "init_distributed"):
        # `setup` imports torch (for the model's process group): commands that need no
        # ranks, such as `kvdist cache`, start in a fraction of the time without it.
        from kvdist.comm import setup

        return getattr(setup, name)
    if name == "MPICommunicator":
        from kvdist.comm.mpi import MPICommunicator

        return MPICommunicator
    if name == "TorchCommunicator":
        from kvdist.comm.torch_dist import TorchCommunicator

        return TorchCommunicator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
