"""Where records live in the cache directory, and which records make a block.

    ROOT/NSID/NAMESPACE                      the full namespace string (for humans; a
                                             save that makes an HH directory writes it
                                             again if it is gone)
    ROOT/NSID/DIRECTORY_ID                   random hex, by which ranks tell one directory
    ROOT/NSID/TRIMS                          trims made so far (`trims`)
    ROOT/NSID/LEDGERS/ENGINE                 an engine's bytes added and freed (`ledger`)
    ROOT/NSID/HH/HASH/hS-EofN.kvb            one record: KV heads [S, E) of N

NSID is a 16-hex-digit hash of the model namespace, so another model's cache is another
directory (zero hits, no errors). HASH is the block hash in hex, HH its first two digits
(to keep directories small). A block's records share a directory so one `listdir` finds
every shard, whatever tensor-parallel degree wrote it, and eviction removes them together.
A block is present when the head ranges of its records cover all N heads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from stat import S_ISREG

from kvdist.connectors.disk.record import SUFFIX

log = logging.getLogger(__name__)

_NAME = re.compile(r"^h(\d+)-(\d+)of(\d+)" + re.escape(SUFFIX) + "$")
_NSID = re.compile(r"^[0-9a-f]{16}$")
NAMESPACE_FILE = "NAMESPACE"
DIRECTORY_ID_FILE = "DIRECTORY_ID"


def namespace_id(model_namespace: str) -> str:
    return hashlib.blake2b(model_namespace.encode(), digest_size=8).hexdigest()


def is_namespace_id(name: str) -> bool:
    return bool(_NSID.match(name))


def block_dir(ns_dir: str, key: bytes) -> str:
    h = key.hex()
    return os.path.join(ns_dir, h[:2], h)


def record_name(head_start: int, head_end: int, num_kv_heads: int) -> str:
    return f"h{head_start}-{head_end}of{num_kv_heads}{SUFFIX}"


@dataclass(frozen=True)
class RecordRef:
    path: str
    head_start: int
    head_end: int
    num_kv_heads: int
    size: int
    mtime: float
    inode: int = 0
    """Which file it is: a record written again (a new file renamed over it) has another."""


ListError = Callable[[str, OSError], None]
"""Told of a directory that cannot be listed: its path and the error."""


def list_records(
    bdir: str, *, stat: bool = True, on_error: ListError | None = None
) -> list[RecordRef]:
    """The records in block directory `bdir` (empty if it does not exist).

    Files may vanish at any time (another engine evicting): those are skipped. Any other
    error listing or reading the directory (e.g. ESTALE on NFS, EACCES) makes it a miss,
    not a failure of the engine (logged once; `on_error`, when given, is told instead)."""
    return list_block(bdir, stat=stat, on_error=on_error)[0]


def list_block(
    bdir: str, *, stat: bool = True, on_error: ListError | None = None
) -> tuple[list[RecordRef], bool]:
    """`list_records`, and whether the directory holds temporary files (of writes in
    flight, or of writes that died), from one listing."""
    try:
        names = os.listdir(bdir)
    except (FileNotFoundError, NotADirectoryError):
        return [], False
    except OSError as exc:
        (on_error or _list_failed)(bdir, exc)
        return [], False
    out = []
    temps = False
    for name in names:
        temps = temps or name.endswith(".tmp")
        m = _NAME.match(name)
        if not m:
            continue
        path = os.path.join(bdir, name)
        size, mtime, inode = 0, 0.0, 0
        if stat:
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone, or unreadable: not a record to count on
            if not S_ISREG(st.st_mode):
                continue  # a FIFO or directory under a record's name: read, it fails
            size, mtime, inode = st.st_size, st.st_mtime, st.st_ino
        s, e, n = map(int, m.groups())
        out.append(RecordRef(path, s, e, n, size, mtime, inode))
    return out, temps


def cover(
    records: list[RecordRef], start: int, end: int, num_kv_heads: int
) -> list[RecordRef] | None:
    """Records whose head ranges together cover `[start, end)` (few and large first), or
    None if some head is missing."""
    usable = [
        r
        for r in records
        if r.num_kv_heads == num_kv_heads and r.head_start < r.head_end <= num_kv_heads
    ]
    chosen: list[RecordRef] = []
    pos = start
    while pos < end:
        cands = [r for r in usable if r.head_start <= pos < r.head_end]
        if not cands:
            return None
        # Prefer the record reaching furthest; among those the narrowest (least to read).
        best = max(cands, key=lambda r: (r.head_end, r.head_start))
        chosen.append(best)
        pos = best.head_end
    return chosen


def prepare_namespace_dir(root: str, model_namespace: str, *, read_only: bool = False) -> str:
    """Create (if needed) and check the namespace directory; ValueError if it cannot be
    used. A leading `~` in `root` is the user's home, as in a shell. `read_only`: nothing
    is created or written; the directory must exist (its namespace need not: every lookup
    then misses). A full filesystem is not an error: its blocks can still be loaded."""
    root = os.path.expanduser(root)
    ns_dir = os.path.join(root, namespace_id(model_namespace))
    for where in (root, ns_dir):
        if os.path.exists(where) and not os.path.isdir(where):
            raise ValueError(
                f"disk connector: cache directory {where!r} is a file, not a directory; "
                "pass the path of a directory (it is created if missing)"
            )
    if read_only:
        if not os.path.isdir(root):
            raise ValueError(
                f"disk connector: cache directory {root!r} does not exist (read_only: it "
                "is not created)"
            )
        if not os.path.isdir(ns_dir):
            log.warning("disk cache: %s holds no cache of this model (no %s): every lookup "
                        "misses", root, os.path.basename(ns_dir))  # fmt: skip
        return ns_dir
    try:
        os.makedirs(ns_dir, exist_ok=True)
        probe = os.path.join(ns_dir, f".probe-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
        write_namespace_label(ns_dir, model_namespace)
    except OSError as exc:
        if exc.errno in _FULL:
            log.warning("disk cache: %s is full (%s): its blocks are loaded, and saves fail "
                        "until there is room (the connector then evicts its least recently "
                        "used blocks to make some)", root, exc)  # fmt: skip
            return ns_dir
        hint = (
            "; pass read_only=true to load from it without writing"
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            else ""
        )
        raise ValueError(
            f"disk connector: cache directory {root!r} is not writable ({exc}); pass a "
            f"writable path= or fix its permissions{hint}"
        ) from None
    return ns_dir


def write_namespace_label(ns_dir: str, model_namespace: str) -> None:
    """Write `ns_dir/NAMESPACE`, the full namespace string that `kvdist cache ls` shows,
    unless it is there; whole or not at all (renamed into place). Raises OSError."""
    label = os.path.join(ns_dir, NAMESPACE_FILE)
    if os.path.exists(label):
        return
    tmp = f"{label}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(model_namespace + "\n")
        os.replace(tmp, label)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_FULL = (errno.ENOSPC, errno.EDQUOT)
"""What a write into a full filesystem (or past a quota) fails with."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write failing for want of room."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def directory_id(ns_dir: str, *, create: bool = True) -> str | None:
    """The namespace directory's id: random hex that the first process to ask wrote into
    it. Ranks that read the same id use the same directory; ranks on several nodes that
    read different ids each have their own (a path on each node's local disk). None when
    the id cannot be read or made (logged), or is not there and `create` is False."""
    path = os.path.join(ns_dir, DIRECTORY_ID_FILE)
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            return _read_id(path)
        if not create:
            log.warning("disk cache: %s has no id (%s), and it is read only: whether every "
                        "rank reads the same directory is not checked", ns_dir,
                        DIRECTORY_ID_FILE)  # fmt: skip
            return None
        with open(tmp, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before it has the name: a crash leaves no empty id
        # link() fails where the name exists, so of processes racing (on any node of a
        # shared filesystem) one id wins and every one reads it.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        return _read_id(path)
    except (OSError, ValueError) as exc:
        log.warning("disk cache: cannot read or make the id of %s (%s)", ns_dir, exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _read_id(path: str) -> str:
    with open(path) as f:
        text = f.read().strip()
    if len(text) != 32 or not all(c in "0123456789abcdef" for c in text):
        raise ValueError(f"{path} does not hold a directory id: {text[:40]!r}")
    return text


def discard_record(path: str, reason: object, *, keep: bool = False) -> None:
    """Delete a record that failed its checks (corrupt, truncated, another layout), so the
    block stops being found complete, misses, and is saved again. `keep`: only log it (a
    read-only cache); rank 0's index then counts the block a miss while the file is so."""
    if keep:
        log.warning("disk cache: unusable record %s (%s), kept: the cache is read only",
                    path, reason)  # fmt: skip
        return
    try:
        try:
            os.unlink(path)
        except IsADirectoryError:  # an empty one goes; one with files in it is reported
            os.rmdir(path)
    except OSError as exc:
        log.warning("disk cache: cannot remove unusable record %s (%s): %s", path, reason, exc)
    else:
        log.warning("disk cache: removed unusable record %s (%s)", path, reason)


def record_used(path: str, *, read_only: bool) -> None:
    """Set a record's file times to now: its last use, for LRU eviction after a restart
    (not in a read-only cache; a failure is no reason to fail the load)."""
    if not read_only:
        with contextlib.suppress(OSError):
            os.utime(path)


def record_io_failed(path: str, exc: Exception) -> None:
    """Log a record that is there but could not be read, and is kept (EACCES, EMFILE...)."""
    _log_first(_read_errors, "cannot read record %s (%s); the block is computed instead, "
               "and the file kept", path, exc)  # fmt: skip


def _list_failed(bdir: str, exc: OSError) -> None:
    """Log a block directory that cannot be listed."""
    _log_first(_list_errors, "cannot list %s (%s); such blocks count as missing", bdir, exc)


def _log_first(seen: list[int], msg: str, *args: object) -> None:
    """Log the first of a kind of problem at warning level, the rest at debug level."""
    first = not seen
    if first:
        seen.append(1)
    (log.warning if first else log.debug)(
        "disk cache: " + msg + "%s",
        *args,
        " (later ones are logged at debug level)" if first else "",
    )


_read_errors: list[int] = []  # non-empty once one was logged
_list_errors: list[int] = []


STALE_TEMP_S = 600.0
"""A record's temporary file untouched this long belongs to a write that died (a live one
writes it, then renames it, within seconds): rescans and `kvdist cache evict` remove it
(`kvdist cache evict --temp-age` takes another age)."""


def check_temp_age(seconds: object, name: str = "temp_age_s") -> float:
    """`seconds` as the age past which a temporary file is a dead write's: a number >= 0
    (0: every temporary file, those of writes in flight too); ValueError naming `name`."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise ValueError(f"{name} must be a number of seconds >= 0, got {seconds!r}")
    return float(seconds)


def remove_stale_temps(bdir: str, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the temporary files in `bdir` last modified more than `older_than_s` ago, and
    the directory if that leaves it empty; returns bytes freed."""
    freed = 0
    try:
        names = [n for n in os.listdir(bdir) if n.endswith(".tmp")]
    except OSError:
        return 0
    cutoff = time.time() - older_than_s
    for name in names:
        path = os.path.join(bdir, name)
        try:
            st = os.stat(path)
            if st.st_mtime < cutoff:
                os.unlink(path)
                freed += st.st_size
        except OSError:
            pass
    if freed:
        with contextlib.suppress(OSError):  # fails unless nothing else is in it
            os.rmdir(bdir)
    return freed


CHAIN_STAMP_STEP_NS = 1_000
"""Between the file times `stamp_chain` gives consecutive blocks of a chain: 1 µs, which a
float `st_mtime` keeps apart (~0.24 µs resolution today) as ext4 and xfs store it."""


def stamp_chain(paths: list[str]) -> int:
    """Set the file times of a chain's records, given first block first, so that the first
    is the newest and each later one a step older: ordered by file time, as after a
    restart or by `kvdist cache evict`, a prefix's last blocks then go before its first
    (without its first, the rest cannot be loaded). A missing record (its block written
    at another tensor-parallel degree, whose records hold other head ranges) stands for
    its block's records: those are stamped. Blocks gone (evicted) are skipped; returns how
    many files were stamped."""
    newest = time.time_ns()
    stamped = 0
    for i, path in enumerate(paths):
        t = newest - i * CHAIN_STAMP_STEP_NS
        try:
            os.utime(path, ns=(t, t))
            stamped += 1
        except FileNotFoundError:
            for rec in list_records(os.path.dirname(path), stat=False):
                with contextlib.suppress(OSError):
                    os.utime(rec.path, ns=(t, t))
                    stamped += 1
        except OSError:
            continue
    return stamped


def remove_block(
    bdir: str,
    errors: list[tuple[str, str]] | None = None,
    *,
    keep_writes: bool = False,
    temp_age_s: float = STALE_TEMP_S,
) -> int:
    """Delete every file of a block directory and the directory; returns bytes freed.

    Tolerates files vanishing or appearing meanwhile (another engine). `errors`, when
    given, gets `(path, reason)` for each file or directory that could not be removed
    (not for one already gone). `keep_writes`: leave the temporary files of writes that
    may still be in flight (younger than `temp_age_s`; another engine saving the block
    anew), and so the directory, rather than failing those saves."""
    freed = 0
    cutoff = time.time() - temp_age_s
    try:
        names = os.listdir(bdir)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        if errors is not None:
            errors.append((bdir, exc.strerror or str(exc)))
        return 0
    for name in names:
        path = os.path.join(bdir, name)
        try:
            st = os.stat(path)
            if keep_writes and name.endswith(".tmp") and st.st_mtime >= cutoff:
                continue
            os.unlink(path)
            freed += st.st_size
        except FileNotFoundError:
            pass
        except OSError as exc:
            if errors is not None:
                errors.append((path, exc.strerror or str(exc)))
    # Fails if a record landed meanwhile, or someone else removed the directory.
    with contextlib.suppress(OSError):
        os.rmdir(bdir)
    return freed


def iter_block_dirs(ns_dir: str, on_error: ListError | None = None):
    """Yield `(key, block dir)` for every block directory of a namespace. A directory that
    cannot be listed (ESTALE on NFS, EACCES) is skipped, logged once (`on_error`, when
    given, is told instead): its blocks count as missing, as in `list_records`."""
    failed = on_error or _list_failed
    try:
        fans = sorted(os.listdir(ns_dir))
    except FileNotFoundError:
        return
    except OSError as exc:
        failed(ns_dir, exc)
        return
    for fan in fans:
        fan_dir = os.path.join(ns_dir, fan)
        if len(fan) != 2 or not os.path.isdir(fan_dir):
            continue
        try:
            hashes = os.listdir(fan_dir)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed(fan_dir, exc)
            continue
        for h in hashes:
            try:
                key = bytes.fromhex(h)
            except ValueError:
                continue
            # Only a block's own place: a copy elsewhere (another fan-out directory, the
            # name in upper case) is no block of this cache, which could never delete it.
            if key.hex() == h and h[:2] == fan:
                yield key, os.path.join(fan_dir, h)
