"""Trimming a namespace that several engines share: one at a time, each on a fresh view.

An engine learns what the others wrote by re-reading the directory (`rescan`). When such
a read finds the namespace over capacity, every engine that made the same read finds the
same excess; if each evicted it, the namespace would lose it several times over (three
engines on 1 MiB went down to 0.09x their capacity). So a trim (an eviction that brings the
namespace back within its limit, rather than one that makes room for the engine's own
save) is made under a lock and counted:

- the namespace directory holds a file, `TRIMS`, with the number of trims made so far and
  the bytes they deleted (`TrimView`);
- an engine reads it before each read of the directory: its view of the namespace is as
  of those trims;
- to trim, it takes an exclusive `flock` on the file and reads it again. If no trim was
  made since its view, it deletes its victims. If others trimmed since, they took part of
  the excess it found (all of it, where their views were alike): it deletes only what
  they left of it, its least recently used victims first, keeps the others, and re-reads
  the directory at once (not at its next interval) to see what is left. Then it records
  its trim.

Own saves still make room for themselves without the lock (an eviction that a save of the
same size follows leaves the namespace's size as it was). `kvdist cache evict` counts as a
trim. A filesystem without `flock` (some network filesystems) trims as if it were alone,
as before: the count is read and written without the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

TRIMS_FILE = "TRIMS"
_RECORD = re.compile(rb"^(\d{20}) (\d{20})\n$")
"""Two fixed-width numbers written in place: a reader without the lock sees the old
record, the new one, or a torn mix that does not parse (a view that no trim matches)."""


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
            return _parse(f.read(64))
    except FileNotFoundError:
        return NO_TRIMS
    except OSError:
        return None


@contextlib.contextmanager
def trim_lock(ns_dir: str) -> Iterator[TrimTicket]:
    """Hold the namespace's trim lock; the ticket has the trims so far and records one
    more. Raises OSError when the file cannot be opened or created (a read-only
    directory)."""
    fd = os.open(os.path.join(ns_dir, TRIMS_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _unlocked_once(ns_dir, exc)
        yield TrimTicket(fd)
    finally:
        os.close(fd)  # releases the lock


class TrimTicket:
    """The trims so far, read under the lock (None: unreadable, which `done` repairs)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.view = _parse(os.pread(fd, 64, 0))

    def left_of(self, excess: int, seen: TrimView | None) -> int:
        """Of an `excess` found on a view as of `seen`, the bytes the trims made since
        left: all of it if there were none, none if either record is unreadable."""
        if self.view == seen:
            return excess
        if self.view is None or seen is None:
            return 0
        return max(0, excess - (self.view.trimmed_bytes - seen.trimmed_bytes))

    def done(self, freed_bytes: int) -> TrimView:
        """Record a trim that deleted `freed_bytes`; returns the new record."""
        trims, trimmed = self.view or NO_TRIMS
        after = TrimView(trims + 1, trimmed + freed_bytes)
        os.pwrite(self._fd, b"%020d %020d\n" % after, 0)
        return after


def _parse(raw: bytes) -> TrimView | None:
    if not raw:
        return NO_TRIMS
    m = _RECORD.match(raw)
    return TrimView(int(m[1]), int(m[2])) if m else None


_warned: set[str] = set()


def _unlocked_once(ns_dir: str, exc: OSError) -> None:
    if ns_dir not in _warned:
        _warned.add(ns_dir)
        log.warning(
            "disk cache: cannot lock %s (%s): engines sharing this directory may trim it "
            "together, below its capacity",
            os.path.join(ns_dir, TRIMS_FILE), exc.strerror or exc,
        )  # fmt: skip
