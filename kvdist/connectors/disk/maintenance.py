"""Offline maintenance of a disk cache directory: list, verify, evict.

Safe to run beside engines using the directory: it only reads, or deletes whole blocks
(which an engine sees as a miss or, mid-load, as a load failure, never as wrong data).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvdist.connectors.disk.ledger import OwnLedger
from kvdist.connectors.disk.record import CorruptRecord, RecordError, read_record
from kvdist.connectors.disk.store import (
    NAMESPACE_FILE,
    STALE_TEMP_S,
    ListError,
    RecordRef,
    check_temp_age,
    cover,
    is_namespace_id,
    iter_block_dirs,
    list_records,
    namespace_id,
    remove_block,
    remove_stale_temps,
)
from kvdist.connectors.disk.trims import TrimTicket, trim_lock


@dataclass
class NamespaceSummary:
    namespace_id: str
    namespace: str | None
    """The full namespace string, when its label file is there."""
    blocks: int = 0
    complete_blocks: int = 0
    """Blocks whose records cover every KV head (the others cannot be loaded)."""
    records: int = 0
    bytes: int = 0
    temp_files: int = 0
    """Leftovers of writes in flight or interrupted."""


@dataclass
class VerifyReport:
    records: int = 0
    """Records read and judged (the corrupt ones included)."""
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every record that fails verification."""
    unchecked: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of records that could not be checked, without being corrupt:
    another format version (a newer kvdist sharing the directory), or an I/O error; and of
    directories that could not be listed (their records unseen)."""
    vanished: int = 0
    """Records removed while the check ran (an engine evicting)."""
    corrupt_files: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Each corrupt record's file identity (inode, size, mtime in ns), taken before it
    was read: `remove_corrupt` deletes it only if it is still that file."""


@dataclass
class EvictReport:
    removed: int = 0
    """Blocks deleted (whole: every record)."""
    freed: int = 0
    """Bytes of the files deleted, temporary files of writes that died included."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of files or directories that could not be deleted; their blocks are
    not counted as removed."""


def _check_root(root: str) -> None:
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"cache directory {root!r} is not a directory")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"cache directory {root!r} does not exist")


def namespaces(root: str, namespace: str | None = None) -> list[str]:
    """Namespace ids under `root`; `namespace` (an id or a full namespace string) picks one."""
    _check_root(root)
    found = sorted(n for n in os.listdir(root) if is_namespace_id(n))
    if namespace is None:
        return found
    want = namespace if is_namespace_id(namespace) else namespace_id(namespace)
    if want not in found:
        raise ValueError(f"namespace {namespace!r} is not in {root!r}; present: {found}")
    return [want]


def _label(ns_dir: str) -> str | None:
    try:
        with open(os.path.join(ns_dir, NAMESPACE_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _blocks(root: str, nsid: str, on_error: ListError | None = None) -> Iterator[tuple[bytes, str]]:
    return iter_block_dirs(os.path.join(root, nsid), on_error)


def list_cache(root: str) -> list[NamespaceSummary]:
    out = []
    for nsid in namespaces(root):
        ns_dir = os.path.join(root, nsid)
        s = NamespaceSummary(nsid, _label(ns_dir))
        for _, bdir in _blocks(root, nsid):
            recs = list_records(bdir)
            with contextlib.suppress(OSError):
                s.temp_files += sum(1 for n in os.listdir(bdir) if n.endswith(".tmp"))
            if not recs:
                continue
            s.blocks += 1
            s.records += len(recs)
            s.bytes += sum(r.size for r in recs)
            s.complete_blocks += complete_at_some_count(recs)
        out.append(s)
    return out


def complete_at_some_count(recs: list[RecordRef]) -> bool:
    """Whether `recs` cover every head at some head count they were written for (a stray
    record of another count must not decide it, whichever is listed first)."""
    totals = {r.num_kv_heads for r in recs if r.num_kv_heads > 0}
    return any(cover(recs, 0, total, total) is not None for total in totals)


def verify_cache(root: str, namespace: str | None = None) -> VerifyReport:
    """Re-read every record: header and payload checksums, sizes, and that the header
    matches where the record lives (block hash, namespace, head range). Safe beside a
    running engine: a record it evicts meanwhile is counted in `vanished`, not corrupt."""
    report = VerifyReport()

    def unlisted(path: str, exc: OSError) -> None:
        report.unchecked.append((path, f"cannot list the directory: {exc.strerror or exc}"))

    for nsid in namespaces(root, namespace):
        ns = bytes.fromhex(nsid)
        for key, bdir in _blocks(root, nsid, unlisted):
            for rec in list_records(bdir, stat=False, on_error=unlisted):
                try:
                    ident = _identity(rec.path)
                    h, _ = read_record(rec.path)
                except FileNotFoundError:
                    if os.path.lexists(rec.path):  # a link to nothing: no record, every time
                        report.unchecked.append((rec.path, "a symbolic link to nothing"))
                    else:
                        report.vanished += 1
                    continue
                except CorruptRecord as exc:
                    report.records += 1
                    report.corrupt.append((rec.path, str(exc)))
                    report.corrupt_files[rec.path] = ident
                    continue
                except RecordError as exc:
                    if os.path.lexists(rec.path):
                        report.unchecked.append((rec.path, str(exc)))
                    else:
                        report.vanished += 1
                    continue
                except OSError as exc:  # the stat
                    report.unchecked.append((rec.path, f"cannot stat: {exc.strerror or exc}"))
                    continue
                report.records += 1
                where = (key, ns, rec.head_start, rec.head_end, rec.num_kv_heads)
                got = (h.key, h.ns, h.head_start, h.head_end, h.num_kv_heads)
                if got != where:
                    reason = "header does not match the record's place (block, namespace, heads)"
                    report.corrupt.append((rec.path, reason))
                    report.corrupt_files[rec.path] = ident
    return report


def _identity(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def remove_corrupt(report: VerifyReport) -> tuple[int, list[tuple[str, str]]]:
    """Delete the records `verify_cache` found corrupt, each only if it is still the file
    that was read (records are renamed into place whole: one replaced meanwhile by a new
    write is kept). Their blocks then miss and are saved again, as when an engine finds
    one. Returns how many were removed, and (path, reason) of those that could not be."""
    removed, failed = 0, []
    for path, _ in report.corrupt:
        try:
            if _identity(path) != report.corrupt_files[path]:
                continue  # another file took its place
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)  # an empty directory in a record's place, as the engine does
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append((path, exc.strerror or str(exc)))
        else:
            removed += 1
    return removed, failed


def evict_cache(
    root: str,
    *,
    namespace: str | None = None,
    to_bytes: int | None = None,
    temp_age_s: float = STALE_TEMP_S,
) -> EvictReport:
    """Delete least-recently-used blocks (by record mtime, which engines stamp so that a
    prefix's last blocks are older than its first: `store.stamp_chain`) until the selected
    namespaces hold at most `to_bytes` (None: delete all). Temporary files of writes that
    died (untouched for `temp_age_s`; with `to_bytes` None, all of them) go too, counted in
    the bytes. A block whose files could not all be deleted is reported in `failed`, not
    counted as removed, and still counts against `to_bytes`; a directory that cannot be
    listed too. The bytes removed go into a ledger (`ledger`) and the trim record
    (`trims`) of their namespace, for the engines using it."""
    if to_bytes is not None and to_bytes < 0:
        raise ValueError(f"to_bytes must be >= 0, got {to_bytes}")
    temp_age_s = check_temp_age(temp_age_s)
    report = EvictReport()
    with contextlib.ExitStack() as locks:
        # Engines on these namespaces trim only what this eviction left of their excess.
        tickets = {
            nsid: _trim_ticket(locks, os.path.join(root, nsid))
            for nsid in namespaces(root, namespace)
        }
        freed = _evict_blocks(root, namespace, to_bytes, temp_age_s, report)
        for nsid, ticket in tickets.items():
            if not freed.get(nsid):
                continue
            # In a ledger, before the trim record, as an engine's trim: the engines learn
            # of the room at their next poll, not at their next walk. Without the lock
            # another run may count at once: a ledger of this run's own then.
            ns_dir = os.path.join(root, nsid)
            if ticket is None:
                OwnLedger(ns_dir).count_once(freed=freed[nsid])
                continue
            if not OwnLedger.of_tool(ns_dir, "evict").count_once(freed=freed[nsid]):
                OwnLedger(ns_dir).count_once(freed=freed[nsid])  # another user's, say
            ticket.done(freed[nsid])
    return report


def _trim_ticket(locks: contextlib.ExitStack, ns_dir: str) -> TrimTicket | None:
    """The namespace's trim lock, held until `locks` closes; None where it cannot be had
    (a directory this user cannot write: its blocks cannot be removed either; an engine
    holding it past a minute)."""
    try:
        return locks.enter_context(trim_lock(ns_dir, wait_s=60.0))
    except OSError:
        return None


def _evict_blocks(
    root: str, namespace: str | None, to_bytes: int | None, temp_age_s: float, report: EvictReport
) -> dict[str, int]:
    """Evict as `evict_cache` says; returns the bytes of blocks removed per namespace."""

    def unlisted(path: str, exc: OSError) -> None:
        report.failed.append((path, f"cannot list the directory: {exc.strerror or exc}"))

    blocks = []
    total = 0
    for nsid in namespaces(root, namespace):
        for _, bdir in _blocks(root, nsid, unlisted):
            recs = list_records(bdir, on_error=unlisted)
            if not recs:  # no block: at most the temporary file of a write
                # --all takes every file; otherwise only those of writes that died.
                if to_bytes is None:
                    report.freed += remove_block(bdir)
                else:
                    report.freed += remove_stale_temps(bdir, temp_age_s)
                continue
            if to_bytes is not None:  # the block may stay: its dead writes' files go
                report.freed += remove_stale_temps(bdir, temp_age_s)
            size = sum(r.size for r in recs)
            blocks.append((max(r.mtime for r in recs), bdir, size, nsid))
            total += size
    freed: dict[str, int] = {}
    for _, bdir, size, nsid in sorted(blocks):
        if to_bytes is not None and total <= to_bytes:
            break
        errors: list[tuple[str, str]] = []
        report.freed += remove_block(
            bdir, errors, keep_writes=to_bytes is not None, temp_age_s=temp_age_s
        )
        if errors:
            report.failed += errors
            continue
        total -= size
        report.removed += 1
        freed[nsid] = freed.get(nsid, 0) + size
    return freed
