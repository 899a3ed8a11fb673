"""Trimming a namespace that several engines share: one at a time, each on a fresh view.

An engine learns what the others wrote by re-reading the directory (`rescan`). When such
a read finds the namespace over capacity, every engine that made the same read finds the
same excess; if each evicted it, the namespace would lose it several times over (three
engines on 1 MiB went down to 0.09x their capacity). So a trim (an eviction that brings the
namespace back within its limit, rather than one that makes room for the engine's own
save) is made under a lock and counted:

- the namespace directory holds a file, `TRIMS`, with the number of trims made so far;
- an engine reads the count before each read of the directory: its view of the namespace
  is as of that count;
- to trim, it takes an exclusive `flock` on the file, reads the count again and deletes its
  victims only if the count is still the one its view was taken at, then adds one. If
  another engine trimmed since, its view is out of date: it deletes nothing, and re-reads
  the directory at once (not at its next interval) to see what is left.

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
from collections.abc import Iterator

log = logging.getLogger(__name__)

TRIMS_FILE = "TRIMS"
_WIDTH = 20
"""Digits of the count, written in place at a fixed width: a reader without the lock sees
the old count or the new one, or a torn mix that matches no view (that trim waits)."""


def read_trims(ns_dir: str) -> int | None:
    """The namespace's trim count (0 before the first), or None if it cannot be read."""
    try:
        with open(os.path.join(ns_dir, TRIMS_FILE), "rb") as f:
            return _parse(f.read(_WIDTH + 1))
    except FileNotFoundError:
        return 0
    except OSError:
        return None


@contextlib.contextmanager
def trim_lock(ns_dir: str) -> Iterator[TrimTicket]:
    """Hold the namespace's trim lock; the ticket has the count and takes the increment.
    Raises OSError when the file cannot be opened or created (a read-only directory)."""
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
    """The count read under the lock; `done()` adds one."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.count = _parse(os.pread(fd, _WIDTH + 1, 0))

    def done(self) -> None:
        count = (self.count or 0) + 1
        os.pwrite(self._fd, f"{count:0{_WIDTH}d}\n".encode(), 0)


def _parse(raw: bytes) -> int | None:
    if not raw:
        return 0
    text = raw.strip()
    return int(text) if text.isdigit() and len(text) <= _WIDTH else None


_warned: set[str] = set()


def _unlocked_once(ns_dir: str, exc: OSError) -> None:
    if ns_dir not in _warned:
        _warned.add(ns_dir)
        log.warning(
            "disk cache: cannot lock %s (%s): engines sharing this directory may trim it "
            "together, below its capacity",
            os.path.join(ns_dir, TRIMS_FILE), exc.strerror or exc,
        )  # fmt: skip
