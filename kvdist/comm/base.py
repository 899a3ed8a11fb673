"""The control-plane communicator interface.

Small on purpose: rank, size, broadcast of bytes, allgather of bytes, barrier, abort.
Every collective takes a deadline and a label; a rank that does not arrive in time makes
the waiting ranks raise `CollectiveTimeout` naming the label and the missing ranks.
Implementations: `kvdist.comm.mpi.MPICommunicator`, `kvdist.comm.torch_dist.TorchCommunicator`,
`kvdist.comm.local.LocalCommunicator`, and `kvdist.comm.shm.SharedMemoryCommunicator` over
either of the first two for ranks on one host.
"""

from __future__ import annotations

import numbers
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvdist.comm.launch_env import check_timeout

_DEADLINE_SETTINGS = (
    "the deadline is KVDIST_TIMEOUT_S, or an engine's timeout_s where one was passed"
)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete before its deadline."""

    one_line = True
    """Its message names the collective, the deadline and the ranks: reported without a
    traceback (`kvdist.comm.abort_on_error`), which would add only where it was waited."""

    def __init__(
        self,
        what: str,
        timeout_s: float,
        rank: int,
        missing: list[int] | None,
        message: str | None = None,
    ):
        self.what = what
        self.timeout_s = timeout_s
        self.rank = rank
        self.missing = missing
        who = (
            f"rank(s) {missing} did not arrive"
            if missing
            else "the ranks that did not arrive could not be determined"
        )
        super().__init__(
            message
            or f"rank {rank}: collective '{what}' timed out after {timeout_s:g}s: {who} "
            f"({_DEADLINE_SETTINGS})"
        )


class LateForCollective(CollectiveTimeout):
    """This rank reached a collective after other ranks had given up waiting for it there:
    what this rank did before the collective took longer than their deadline."""

    def __init__(self, what: str, timeout_s: float, rank: int, gave_up: dict[int, int]):
        self.gave_up = gave_up
        """Rank -> the collective (numbered from 1) at which it gave up."""
        where = ", ".join(f"rank {r} at collective #{s}" for r, s in sorted(gave_up.items()))
        super().__init__(
            what,
            timeout_s,
            rank,
            [rank],
            f"rank {rank}: reached collective '{what}' after the other ranks gave up waiting "
            f"for it ({where}, each after its deadline): this rank was late, what it ran "
            f"before this collective took too long ({_DEADLINE_SETTINGS})",
        )


class CollectiveMismatch(RuntimeError):
    """Ranks disagree on which collective comes next: one broadcasts where another gathers,
    or they name different roots. A program error in the caller (every rank must make the
    same collectives in the same order); the communicator is unusable afterwards. Raised
    by a rank that reads another's slot (shared memory only); ranks that each think they
    are a broadcast's root read none in it, and raise it at their next collective that
    reads one (each slot also names its writer's previous collective)."""


@dataclass
class CommStats:
    """Counters of control-plane traffic issued by one communicator."""

    collectives: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0

    def snapshot(self) -> CommStats:
        return CommStats(self.collectives, self.seconds, self.bytes_sent)


@dataclass
class Call:
    """One collective in progress: its label, deadline and sequence number."""

    what: str
    timeout_s: float
    seq: int
    start: float

    @property
    def deadline(self) -> float:
        return self.start + self.timeout_s


class Communicator(ABC):
    """Control-plane collectives over the ranks of one tensor-parallel group."""

    rank: int
    world_size: int
    name: str = "abstract"

    def __init__(self) -> None:
        self.stats = CommStats()
        self._seq = 0
        self._broken: str | None = None
        """Why the communicator may no longer be used (a collective failed), or None."""

    @property
    def broken(self) -> str | None:
        """Why this communicator may no longer be used (a collective failed or timed out:
        the ranks are out of step, some may wait in one for ever), or None."""
        return self._broken

    @abstractmethod
    def broadcast_bytes(
        self, data: bytes | None, *, root: int = 0, timeout_s: float, what: str
    ) -> bytes:
        """`root` passes the payload, the others None; every rank returns the payload."""

    @abstractmethod
    def allgather_bytes(self, data: bytes, *, timeout_s: float, what: str) -> list[bytes]:
        """Every rank's payload, indexed by rank, on every rank."""

    @abstractmethod
    def barrier(self, *, timeout_s: float, what: str) -> None:
        """Return once every rank has arrived."""

    @abstractmethod
    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (used after an unrecoverable error)."""

    def wait_for_abort(self, rank: int, timeout_s: float) -> None:
        """Return once `rank` began ending the job (its `abort`), or after `timeout_s`.
        This one cannot tell, and waits the whole time; where the ranks share memory,
        they see it at once."""
        time.sleep(timeout_s)

    def pid_of(self, rank: int) -> int | None:
        """The process id of `rank`, where this process can signal it (ranks that share
        memory, in one pid namespace), else None. This one cannot tell."""
        return None

    def close(self) -> None:  # noqa: B027
        """Release resources (no collective)."""

    # -- shared by the implementations --------------------------------------------------
    def _check_root(self, data: object, root: int, what: str) -> None:
        if type(root) is not int and (
            isinstance(root, bool) or not isinstance(root, numbers.Integral)
        ):
            # Else a float root passed over MPI, failed over shared memory in a struct
            # call, and a str failed comparing: none said what was wrong.
            raise TypeError(f"broadcast_bytes '{what}': root must be a rank (an int), got {root!r}")
        if not 0 <= root < self.world_size:
            raise ValueError(
                f"broadcast_bytes '{what}': root {root} is not a rank (world size {self.world_size})"
            )
        if self.rank == root and data is None:
            raise ValueError(
                f"broadcast_bytes '{what}': the root rank {root} must pass the payload"
            )

    def _payload(self, data: object, op: str, what: str) -> bytes | bytearray | memoryview:
        """`data` as a buffer of bytes, or a TypeError naming the collective. Called before
        the collective starts: a rank that raises here stays in step with the others."""
        if isinstance(data, (bytes, bytearray)):
            return data
        try:  # other buffers (arrays, numpy) are cast: their len() counts items, not bytes
            return memoryview(data).cast("B")  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{op} '{what}': the payload must be bytes (or a contiguous buffer), got "
                f"{type(data).__name__}"
            ) from None

    def _begin(self, what: str, timeout_s: float) -> Call:
        if self._broken is not None:
            raise RuntimeError(
                f"rank {self.rank}: {self.name} communicator is unusable after an earlier "
                f"failure ({self._broken}); cannot run '{what}'"
            )
        timeout_s = check_timeout(timeout_s, f"'{what}': timeout_s")
        self._seq += 1
        return Call(what, timeout_s, self._seq, time.monotonic())

    def _end(self, call: Call) -> None:
        self.stats.seconds += time.monotonic() - call.start
