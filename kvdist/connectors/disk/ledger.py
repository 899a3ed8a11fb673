"""What each engine added to and deleted from a namespace it shares, for the others to read
within a second rather than at their next re-read of the directory.

A re-read (`rescan`) walks every block directory: on a large cache, and on a network
filesystem, it is made once a minute (`rescan_s`). Between two, an engine did not know what
the others wrote, and the namespace grew past `capacity_bytes` by as much. So each writing
engine also keeps a ledger, one small file of its own, `LEDGERS/<engine id>` in the
namespace directory: the bytes its saves added and the bytes its deletions freed, in all.
Only that engine writes it (in place, fixed width, with a checksum: a reader sees the old
or the new record, or one it ignores); every engine with a capacity reads all of them
every `POLL_S`, on its re-read thread. What the others' ledgers grew by since the view
the index holds (the ledgers read just before the walk it came from) is what they did
that the view lacks: the index counts it against the capacity at once, and trims
(`kvdist.connectors.disk.trims`) when it is past.

The ledger counts an engine's own doing only: its saves when it plans them (its
reservation, taken back when the ranks report less stored, or records of the block there
already: another engine's save of it, at the same moment) and its deletions when they
free bytes (taken back when the block was gone). What it learns of the others' blocks is
not in it. The sums are approximate (saves count when planned, the directory holds them
when written); each re-read of the directory sets the view right again.

A ledger whose file disappeared (removed by hand, or as stale: not written for
`STALE_S`) is continued under a new id from zero, so no reader takes its past for new
writes; readers forget a ledger that vanished (its writes since their view wait for their
next walk).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import threading
import time

from kvdist.connectors.disk.trims import RECORD_SIZE, encode_counts, parse_counts

LEDGER_DIR = "LEDGERS"
POLL_S = 1.0
"""How often an engine writes its ledger and reads the others' (at most its `rescan_s`)."""
STALE_S = 24 * 3600.0
"""A ledger not written for this long is removed by the walks (its engine is gone, or
has been idle so long that it starts a new one when it writes again)."""
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class OwnLedger:
    """This engine's ledger: counts what its saves add and its deletions free (any
    thread), written out by `flush` (the re-read thread, and a trim before it records
    itself)."""

    def __init__(self, ns_dir: str) -> None:
        self.dir = os.path.join(ns_dir, LEDGER_DIR)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.engine_id = _new_id()
        self._added = 0
        self._removed = 0
        self._written: tuple[int, int] | None = None  # the record last written

    @classmethod
    def of_tool(cls, ns_dir: str, tool: str) -> OwnLedger:
        """The ledger of a tool run now and then on this host (`kvdist cache evict`, from
        cron say), continued from its counts: one file per tool and host, not one per
        run for every engine to read at each poll. The caller holds the namespace's trim
        lock, so no other run of it counts at once. A file that cannot be read is left
        alone: this run goes on under a new id."""
        ledger = cls(ns_dir)
        prefix = f"{tool}-{_host()}-"
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(ledger.dir)):
                if not name.startswith(prefix) or not _ID.match(name):
                    continue
                with open(os.path.join(ledger.dir, name), "rb") as f:
                    counts = parse_counts(f.read(RECORD_SIZE + 1))
                if counts is not None:
                    ledger.engine_id = name
                    ledger._added, ledger._removed = counts
                    ledger._written = counts
                    return ledger
        ledger.engine_id = prefix + secrets.token_hex(4)
        return ledger

    def add(self, nbytes: int) -> None:
        """Count `nbytes` added to the namespace by this engine (negative: freed)."""
        with self._lock:
            if nbytes > 0:
                self._added += nbytes
            else:
                self._removed -= nbytes

    def count_once(self, *, freed: int) -> bool:
        """Count `freed` bytes and write the ledger: a tool's run, not an engine's. False
        when it could not be written."""
        self.add(-freed)
        return self.flush()

    def take_back(self, *, added: int = 0, freed: int = 0) -> None:
        """Uncount bytes counted as added that the namespace did not gain (a save whose
        records were there already, or that stored less than reserved), and bytes counted
        as freed that were not (an eviction whose block was gone). Taken off the count
        they were in, not counted as the opposite: a reader matches what it learnt
        otherwise against each count apart (`DiskIndex._own_capacity`)."""
        with self._lock:
            # Never below zero: a count begun again from zero (the file was removed) may
            # be given back what it counted before.
            self._added = max(0, self._added - added)
            self._removed = max(0, self._removed - freed)

    def flush(self) -> bool:
        """Write the counts if they changed since the last write; False when the file
        cannot be written (a read-only or vanished directory: retried at the next). The
        re-read thread and a trim may flush at once: one at a time, or the older counts
        could land last."""
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> bool:
        with self._lock:
            counts = (self._added, self._removed)
        if counts == (self._written or (0, 0)):
            return True  # unchanged (an engine that never wrote leaves no ledger)
        path = os.path.join(self.dir, self.engine_id)
        try:
            if self._written is None:
                os.makedirs(self.dir, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            else:
                fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            # Removed under this engine (by hand, or as stale): go on under a new id, from
            # zero, so that no reader takes what this one counted before for new writes.
            with self._lock:
                self.engine_id = _new_id()
                self._added -= counts[0]
                self._removed -= counts[1]
            self._written = None
            return False
        except OSError:
            return False
        try:
            os.pwrite(fd, encode_counts(counts), 0)
        except OSError:
            return False
        finally:
            os.close(fd)
        self._written = counts
        return True


def read_ledgers(ns_dir: str, exclude: str | None = None) -> dict[str, tuple[int, int]]:
    """Each engine's `(bytes added, bytes freed)` by its ledger, but `exclude`'s. Ledgers
    that cannot be read or parsed are left out (as if that engine had none)."""
    ledger_dir = os.path.join(ns_dir, LEDGER_DIR)
    try:
        names = os.listdir(ledger_dir)
    except OSError:
        return {}
    ledgers = {}
    for name in names:
        if name == exclude or not _ID.match(name):
            continue
        with contextlib.suppress(OSError):
            with open(os.path.join(ledger_dir, name), "rb") as f:
                counts = parse_counts(f.read(RECORD_SIZE + 1))
            if counts is not None:
                ledgers[name] = counts
    return ledgers


def growth_since(
    view: dict[str, tuple[int, int]], now: dict[str, tuple[int, int]]
) -> tuple[int, int]:
    """Bytes the ledgers in `now` added and freed since `view` (both from `read_ledgers`):
    a ledger new since the view counts whole, one gone since counts nothing. A count that
    went down since (`OwnLedger.take_back` of what was counted before the view, which the
    directory read shows as it is) counts nothing, not less than nothing; a take-back of
    that kind beside new counts of the same ledger hides as much of them (a ledger holds
    sums, not when each was counted), until the next walk."""
    added = freed = 0
    for engine, (a, f) in now.items():
        a0, f0 = view.get(engine, (0, 0))
        added += max(a - a0, 0)
        freed += max(f - f0, 0)
    return added, freed


def remove_stale(ns_dir: str, stale_s: float = STALE_S) -> int:
    """Delete ledgers not written for `stale_s`; how many."""
    ledger_dir = os.path.join(ns_dir, LEDGER_DIR)
    try:
        names = os.listdir(ledger_dir)
    except OSError:
        return 0
    cutoff = time.time() - stale_s
    removed = 0
    for name in names:
        path = os.path.join(ledger_dir, name)
        with contextlib.suppress(OSError):
            if os.stat(path).st_mtime < cutoff:
                os.unlink(path)
                removed += 1
    return removed


def _new_id() -> str:
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
