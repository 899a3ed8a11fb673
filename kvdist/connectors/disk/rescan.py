"""Re-reading a namespace directory that other engines write to and evict from.

`read_blocks` walks the directory once. A `Rescanner` does it every `interval_s` in a
background thread and keeps only what changed since its previous read (`DirChanges`), so
the scheduler thread, which owns the index, applies a few dict operations per changed block
between steps instead of walking the directory itself. The walk spends its time in
`listdir`/`stat`, which release the GIL: the engine's threads keep running.

Between walks, every `ledger.POLL_S` (at most `interval_s`), the same thread writes this
engine's ledger and reads the others' (`kvdist.connectors.disk.ledger`): a `Poll`. Each
walk starts with one, which says what the ledgers held as of the walk's view; what was
written during the walk is in both (`DirChanges.began_at` tells it apart).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvdist.connectors.disk.ledger import POLL_S, OwnLedger, read_ledgers, remove_stale
from kvdist.connectors.disk.store import cover, iter_block_dirs, list_block, remove_stale_temps
from kvdist.connectors.disk.trims import TrimView, read_trims
from kvdist.connectors.placement import helper_thread

log = logging.getLogger(__name__)

BlockInfo = tuple[float, int, bool]
"""(newest record mtime, bytes of all its records, whether they cover every KV head)."""


def read_blocks(
    ns_dir: str,
    num_kv_heads: int,
    stop: threading.Event | None = None,
    *,
    tidy: bool = True,
    between: Callable[[], object] | None = None,
) -> dict[bytes, BlockInfo] | None:
    """Every block in the namespace directory; None if `stop` was set during the walk.
    `tidy`: delete the temporary files of writes that died long ago on the way;
    `between`: called every `POLL_S` during the walk (the ledgers' polls, which a long
    walk of a large or remote directory must not hold up)."""
    found = {}
    next_call = time.monotonic() + POLL_S
    for key, bdir in iter_block_dirs(ns_dir):
        if stop is not None and stop.is_set():
            return None
        if between is not None and time.monotonic() >= next_call:
            between()
            next_call = time.monotonic() + POLL_S
        recs, temps = list_block(bdir)
        complete = bool(recs) and cover(recs, 0, num_kv_heads, num_kv_heads) is not None
        if temps and tidy:  # of writes in flight, or that died (even if another's landed)
            remove_stale_temps(bdir)
        if recs:
            found[key] = (max(r.mtime for r in recs), sum(r.size for r in recs), complete)
    return found


@dataclass(frozen=True)
class Poll:
    """The namespace's trims, then the other engines' ledgers (`ledger.read_ledgers`), read
    in that order: every trim the first shows is in its engine's ledger already, which
    writes it before it records the trim."""

    trims: TrimView | None
    ledgers: dict[str, tuple[int, int]]


@dataclass
class DirChanges:
    """What the reads since the last `Rescanner.take` found changed."""

    started: float
    """When the first of those reads began (the rescanner's clock)."""
    since: float
    """When the read before the first of them began (wall time, as file times): a block
    whose newest record is younger was written or used since."""
    changed: dict[bytes, BlockInfo]
    """Blocks new, resized or completed since the read before."""
    vanished: set[bytes]
    """Blocks the read before saw and a later one did not."""
    before: Poll | None = None
    """The trims and ledgers read just before the last of those reads began: what the
    reads show is as of those."""
    began_at: float | None = None
    """When the last of those reads began (wall time, as file times): a block whose
    newest record is younger was written (or used) during its walk, after `before`."""

    def merge(self, later: DirChanges) -> None:
        self.before = later.before
        self.began_at = later.began_at
        for key in later.changed:
            self.vanished.discard(key)
        for key in later.vanished:
            self.changed.pop(key, None)
        self.changed.update(later.changed)
        self.vanished |= later.vanished


class Rescanner:
    """Background re-reads of one namespace directory (see the module docstring)."""

    def __init__(
        self,
        ns_dir: str,
        num_kv_heads: int,
        seen: dict[bytes, BlockInfo],
        *,
        seen_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        tidy: bool = True,
        ledger: OwnLedger | None = None,
        read_others: bool = True,
    ):
        """`seen`: the blocks of the read that came before (the index's start-up scan),
        begun at wall time `seen_at` (default: now); `tidy`: as for `read_blocks`, and
        remove stale ledgers; `ledger`: this engine's, written at each poll;
        `read_others`: read the other engines' ledgers at each poll."""
        self.ns_dir = ns_dir
        self.ledger = ledger
        self.read_others = read_others
        self._poll: Poll | None = None  # the latest
        self.tidy = tidy
        self.num_kv_heads = num_kv_heads
        self._clock = clock
        self._seen = {key: info[1:] for key, info in seen.items()}  # (bytes, complete)
        self._seen_at = time.time() if seen_at is None else seen_at
        self._lock = threading.Lock()
        self._changes: DirChanges | None = None  # not yet taken
        self._forget: set[bytes] = set()  # to report again, if there, on the next read
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop, or read before the interval is up
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float, cpus: Iterable[int] | None = None) -> None:
        """Re-read every `interval_s` on a background thread (run on `cpus` when given)."""
        if self._thread is not None:
            raise RuntimeError("rescans already started")
        self._thread = helper_thread(self._loop, "kvdist-disk-rescan", cpus, interval_s)
        self._thread.start()

    def poll_now(self) -> Poll:
        """Write this engine's ledger, then read the trims and the others' ledgers, in the
        calling thread (what the background thread runs between walks)."""
        if self.ledger is not None:
            self.ledger.flush()
        trims = read_trims(self.ns_dir)
        own = self.ledger.engine_id if self.ledger is not None else None
        poll = Poll(trims, read_ledgers(self.ns_dir, exclude=own) if self.read_others else {})
        with self._lock:
            self._poll = poll
        return poll

    def latest_poll(self) -> Poll | None:
        """The last poll made (a walk makes one first), or None before the first."""
        with self._lock:
            return self._poll

    def read_now(self) -> None:
        """One re-read, in the calling thread (what the background thread runs)."""
        started, started_at = self._clock(), time.time()
        with self._lock:
            forget, self._forget = self._forget, set()
        for key in forget:
            self._seen.pop(key, None)
        before = self.poll_now()
        if self.tidy:
            remove_stale(self.ns_dir)
        found = read_blocks(
            self.ns_dir, self.num_kv_heads, self._stop, tidy=self.tidy, between=self.poll_now
        )
        if found is None:  # closing
            return
        changed = {key: info for key, info in found.items() if self._seen.get(key) != info[1:]}
        vanished = set(self._seen.keys() - found.keys())
        self._seen = {key: info[1:] for key, info in found.items()}
        since, self._seen_at = self._seen_at, started_at
        with self._lock:
            now = DirChanges(started, since, changed, vanished, before, started_at)
            if self._changes is None:
                self._changes = now
            else:
                self._changes.merge(now)

    def take(self) -> DirChanges | None:
        """What changed since the last call, or None when no read finished since."""
        with self._lock:
            changes, self._changes = self._changes, None
        return changes

    def report_again(self, keys: set[bytes]) -> None:
        """Report `keys` as changed on the next read that finds them, even if unchanged."""
        with self._lock:
            self._forget |= keys

    def read_soon(self) -> None:
        """Have the background thread read again now rather than at its next interval."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self, interval_s: float) -> None:
        poll_s = min(interval_s, POLL_S)
        walk_at = time.monotonic() + interval_s
        while True:
            woken = self._wake.wait(poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if woken or time.monotonic() >= walk_at:
                    walk_at = time.monotonic() + interval_s
                    self.read_now()
                else:
                    self.poll_now()
            except Exception as exc:
                # The directory is shared and may be remote: an error in one walk must not
                # end the rescans (or the engine); the next one retries.
                log.warning("disk cache rescan of %s failed: %s", self.ns_dir, exc)
