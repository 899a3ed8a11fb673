"""Settings of the `disk` connector (its `ConnectorConfig.kwargs`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvdist.comm.launch_env import check_timeout
from kvdist.connectors.placement import check_helper_cpus
from kvdist.connectors.settings import int_setting


@dataclass(frozen=True, kw_only=True)
class DiskSettings:
    path: str
    """Cache directory (created if missing); each model namespace gets a subdirectory. A
    leading `~` is the user's home; a relative path is relative to each rank's working
    directory."""
    capacity_bytes: int | None = None
    """Bytes the namespace's records may take, all ranks' shards together and every
    engine's writes (other engines' are learnt within a second from their ledgers, and
    their blocks by the rescans); least recently used blocks are evicted beyond it. None: unbounded. Either way, once a save finds the filesystem
    full, the cache keeps 1 % of it (64 MiB to 1 GiB) free from then on, evicting to do so
    (`disk_full_reports` in the scheduler's stats)."""
    fsync: bool = False
    """fsync every record and its directory before the save counts as done (survives a
    power loss; costs write bandwidth)."""
    io_threads: int = 8
    """Threads per rank that read, write and checksum records."""
    writer_process: bool = True
    """Write and read records from a child process of each rank (its own interpreter, so
    its IO threads never hold the GIL the engine's thread needs; the staging buffers are
    shared memory). False: from threads of the engine's process."""
    io_cpus: str = "auto"
    """Where the IO threads, the writer process and the index's background threads run:
    "auto" (the online CPUs the rank is not bound to, when a launcher bound it to some: a
    helper sharing the rank's core takes its turns from the engine's thread), "inherit"
    (where the rank runs) or a CPU list such as "8-15"."""
    staging_bytes: int = 256 << 20
    """Host staging memory of each rank, per direction. Loads read through four buffers
    of a quarter of it each (at least one block): a load larger than a buffer goes through
    in turns, and loads beyond the four wait for one, so loads never take more host memory
    than this. Saves go through one buffer of this size; a step saving more (or saves
    still being written when the next step's come) allocates more, kept for reuse. On a
    GPU all of it is pinned when the KV cache is registered (0.2-0.3 s per 512 MB on the
    H200 host, which would otherwise fall in a step); on the CPU it is allocated on first
    use, each load buffer as large as the loads so far needed (up to a quarter). 0:
    nothing reserved, and loads go through buffers of one block."""
    max_save_backlog_bytes: int | None = 2 << 30
    """Host memory each rank's saves may hold while waiting to be written: a step whose
    saves would take the backlog past it skips them (the requests complete without those
    blocks on disk), so a disk slower than the engine
    bounds memory rather than growing it. A step larger than the bound is still saved
    when nothing is waiting. None: no bound. Rank 0 decides for every rank, from the
    backlogs the ranks report each step, so the ranks skip the same saves (counted in
    `saves_skipped_all_ranks`); a rank still checks the bound itself, as a backstop: a
    block some ranks skipped is incomplete on disk, a miss (never a wrong hit), and
    saved again later."""
    rescan_s: float | None = 60.0
    """Seconds between background re-reads of the namespace directory, which account the
    blocks other engines wrote or evicted (and evict if that puts the namespace over
    capacity). Between them, every second (or `rescan_s`, if less), the same thread writes
    this engine's ledger and reads the others' (`kvdist.connectors.disk.ledger`): what
    they added and freed counts against the capacity at once. None: the directory is read
    once, at start, and no ledger is written or read."""
    read_only: bool = False
    """Load from the directory and never write to it: no saves, evictions or file times
    (a cache prepared elsewhere, on a read-only mount or owned by another user). The
    directory must exist; `capacity_bytes` does not apply."""
    pending_timeout_s: float = 60.0
    """How long rank 0 treats a block it asked to save as in flight (neither saved again
    nor evicted) when the engine does not pass the ranks' reports on. With the reports, a
    block is in flight until every writing rank reported it (then complete if all stored
    it, else saveable again), however long its writes wait; a report lost to a bug is
    given up on after ten times this."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ValueError(f"disk connector: path must be a directory path, got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))
        for name, minimum, allow_none in (
            ("capacity_bytes", 1, True),
            ("io_threads", 1, False),
            ("max_save_backlog_bytes", 1, True),
            ("staging_bytes", 0, False),
        ):
            value = int_setting(
                "disk", name, getattr(self, name), minimum=minimum, allow_none=allow_none
            )
            object.__setattr__(self, name, value)
        for name in ("fsync", "writer_process", "read_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"disk connector: {name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.read_only and self.capacity_bytes is not None:
            raise ValueError(
                "disk connector: capacity_bytes needs writes (evictions); leave it unset "
                "with read_only"
            )
        check_helper_cpus("disk connector", self.io_cpus)
        # Stored as the float the check read (a numpy number is no msgpack data).
        if self.rescan_s is not None:
            rescan = check_timeout(self.rescan_s, "disk connector: rescan_s (or None)")
            object.__setattr__(self, "rescan_s", rescan)
        pending = check_timeout(self.pending_timeout_s, "disk connector: pending_timeout_s")
        object.__setattr__(self, "pending_timeout_s", pending)
