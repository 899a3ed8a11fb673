"""Trimming a namespace that several engines share: one at a time, each on a fresh view.

An engine learns what the others wrote by re-reading the directory (`rescan`). When such
a read finds the namespace over capacity, every engine that made the same read finds the
same excess; if each evicted it (their victims differ: each orders blocks by its own use),
the namespace would lose it several times over. So a trim (an eviction that brings the
namespace back within its limit, rather than one that makes room for the engine's own
save) is made under a lock and counted, on a thread of its own (`DiskIndex`'s trimmer):

- the namespace directory holds a file, `TRIMS`, with the number of trims made so far and
  the bytes they deleted (`TrimView`);
- an engine reads it before each read of the directory: its view of the namespace is as
  of those trims;
- to trim, it takes an exclusive `flock` on the file and reads it again. If no trim was
  made since its view, it deletes its victims. If others trimmed since, they took part of
  the excess it found (all of it, where their views were alike): it deletes only what
  they left of it, its least recently used victims first, keeps the others, and re-reads
  the directory at once (not at its next interval) to see what is left. Then it records
  its trim. Its own trims since its view are not counted as others' (they were made on
  an older view, or while a re-read was under way).

Own saves still make room for themselves without the lock (an eviction that a save of the
same size follows leaves the namespace's size as it was). `kvdist cache evict` counts as a
trim. A filesystem without `flock` (some network filesystems) trims without the lock: the
record is still read and written, so trims seldom overlap. A trim that waits for the lock
past `LOCK_WAIT_S` is deferred.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
import zlib
from collections.abc import Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

TRIMS_FILE = "TRIMS"
_RECORD = re.compile(rb"^(\d{20}) (\d{20}) ([0-9a-f]{8})\n$")
"""Two fixed-width numbers and the crc32 of them, written in place: a reader without the
lock sees the old record, the new one, or a torn mix whose checksum fails (a view that no
trim matches)."""
RECORD_SIZE = 51
LOCK_WAIT_S = 5.0
"""How long a trim waits for the lock (another engine's trim, `kvdist cache evict`, a
stopped process): then it is deferred, as if another engine had trimmed."""


class TrimView(NamedTuple):
    """What the `TRIMS` file said: trims made, and the bytes they deleted in all."""

    trims: int
    trimmed_bytes: int


NO_TRIMS = TrimView(0, 0)


def read_trims(ns_dir: str) -> TrimView | None:
    """The namespace's trims so far (`NO_TRIMS` before the first), or None if the file
    cannot be read or parsed."""
    try:
        with open(os.path.join(ns_dir, TRIMS_FILE), "rb") as f:
            return _parse(f.read(RECORD_SIZE + 1))
    except FileNotFoundError:
        return NO_TRIMS
    except OSError:
        return None


@contextlib.contextmanager
def trim_lock(ns_dir: str, wait_s: float = LOCK_WAIT_S) -> Iterator[TrimTicket]:
    """Hold the namespace's trim lock; the ticket has the trims so far and records one
    more. Raises OSError when the file cannot be opened or created (a read-only
    directory), TimeoutError when another holds the lock past `wait_s`. Where the
    filesystem has no `flock` the ticket is given without the lock (warned once)."""
    fd = os.open(os.path.join(ns_dir, TRIMS_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, ns_dir, wait_s)
        yield TrimTicket(fd)
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, ns_dir: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{os.path.join(ns_dir, TRIMS_FILE)} locked") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ENOSYS...: no locks there
            _unlocked_once(ns_dir, exc)
            return


class TrimTicket:
    """The trims so far, read under the lock (None: unreadable, which `done` repairs)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.view = _parse(os.pread(fd, RECORD_SIZE + 1, 0))

    def trimmed_since(self, seen: TrimView | None) -> int | None:
        """Bytes the trims made since `seen` deleted; None if either record is unreadable
        (and they differ)."""
        if self.view == seen:
            return 0
        if self.view is None or seen is None:
            return None
        return self.view.trimmed_bytes - seen.trimmed_bytes

    def done(self, freed_bytes: int) -> TrimView:
        """Record a trim that deleted `freed_bytes`; returns the new record."""
        trims, trimmed = self.view or NO_TRIMS
        after = TrimView(trims + 1, trimmed + freed_bytes)
        os.pwrite(self._fd, encode_counts(after), 0)
        return after


def encode_counts(counts: tuple[int, int]) -> bytes:
    """Two counts as the fixed-width record `TRIMS` and the ledgers hold (`RECORD_SIZE`)."""
    head = b"%020d %020d" % counts
    return head + b" %08x\n" % zlib.crc32(head)


def parse_counts(raw: bytes) -> tuple[int, int] | None:
    """The two counts of a record, or None when it is not one (torn, corrupt, empty)."""
    m = _RECORD.match(raw)
    if m is None or int(m[3], 16) != zlib.crc32(raw[:41]):
        return None
    return int(m[1]), int(m[2])


def _parse(raw: bytes) -> TrimView | None:
    if not raw:
        return NO_TRIMS
    counts = parse_counts(raw)
    return TrimView(*counts) if counts is not None else None


_warned: set[str] = set()


def _unlocked_once(ns_dir: str, exc: OSError) -> None:
    if ns_dir not in _warned:
        _warned.add(ns_dir)
        log.warning(
            "disk cache: cannot lock %s (%s): engines sharing this directory may trim it "
            "together, below its capacity",
            os.path.join(ns_dir, TRIMS_FILE), exc.strerror or exc,
        )  # fmt: skip
