"""Rank 0's view of one namespace of the cache directory: block sizes, LRU order, eviction.

The directory is the truth (other engines may add or delete blocks); this index accounts
sizes against `capacity_bytes` and orders blocks by last use. Lookups re-check the
directory (`probe`), so a block another engine evicted is a miss, not a failed load. Blocks
this engine asked the workers to save are "pending" until every writing rank reported its
save (`settle`: complete if all stored it; else it may be saved again, or evicted), or a
probe sees it complete; a pending block is not saved again, and eviction passes over it
while its records are not all there, and, once the ranks report, until every writing rank
reported it (evicted and saved again before, it would take the late reports of its first
save for the second's). An incomplete block is accounted at what is on disk once settled. Should the reports not come, a block stops being
pending after `pending_timeout_s`, unless the scheduler knows it still in flight
(`in_flight`). Files
are deleted by a background thread so that eviction never stalls planning; a block being
deleted is not saved again until the deletion is done.

Other engines sharing the directory: with `start_rescans`, a background thread re-reads
the namespace (`rescan.Rescanner`); the scheduler applies what changed between steps
(`apply_rescan`): blocks that appeared are accounted (those written or used since the read
before as just used, the others as least recently used; by file time, the oldest first),
blocks that vanished are forgotten, and if the namespace is now over capacity the
least recently used blocks are evicted, whoever wrote them. Between re-reads, the other
engines' ledgers (`kvdist.connectors.disk.ledger`, read every second on the same thread)
say how much they added and freed since the view: the index counts that against the
capacity at once (`others_growth`), and evicts its own least recently used blocks when it
is past. Such an eviction back to the limit is a trim: made under the namespace's trim
lock, less what other engines trimmed since this engine's view was read
(`kvdist.connectors.disk.trims`), so that engines that found the same excess do not all
evict it. A save makes room for itself without the lock,
and only room for itself: past the limit (others' writes not trimmed yet) it replaces what
it evicts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvdist.connectors.disk.ledger import OwnLedger, growth_since, read_ledgers
from kvdist.connectors.disk.rescan import DirChanges, Poll, Rescanner, read_blocks
from kvdist.connectors.disk.store import RecordRef, block_dir, cover, list_records, remove_block
from kvdist.connectors.disk.trims import TrimTicket, TrimView, read_trims, trim_lock
from kvdist.connectors.placement import move_this_thread

log = logging.getLogger(__name__)

_MIN_KEEP_FREE, _MAX_KEEP_FREE = 64 << 20, 1 << 30
"""The free space kept on a filesystem found full is within these (`DiskIndex.found_full`)."""
_UNUSABLE_S = 60.0
"""How long a block whose load failed on records still there is a miss (`DiskIndex.lost`):
a record kept for good (another user's, another format's) fails once a minute at most,
one failed for a passing reason (EMFILE) is tried again after that."""


@dataclass
class _Entry:
    size: int
    complete: bool
    pending_since: float | None = None
    counted: int = 0
    """Bytes the ledger counted as added for this engine's saves of it not yet settled."""
    counted_over: int = 0
    """The bytes of it the index held before those saves (an incomplete block's)."""


class DiskIndex:
    def __init__(
        self,
        ns_dir: str,
        num_kv_heads: int,
        capacity_bytes: int | None,
        *,
        pending_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        cpus: Iterable[int] | None = None,
        read_only: bool = False,
    ) -> None:
        """`cpus`: where the background threads (deletions, rescans) run
        (`kvdist.connectors.placement`); None: where the creating thread may. `read_only`:
        the directory is only read (no temporary files of dead writes are deleted; there
        is no capacity to evict to)."""
        self.ns_dir = ns_dir
        self.read_only = read_only
        self.num_kv_heads = num_kv_heads
        self.capacity_bytes = capacity_bytes
        self.pending_timeout_s = pending_timeout_s
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest use first
        self.total_bytes = 0
        self.evictions = 0
        """Blocks chosen for eviction (those of deferred trims included)."""
        self.trims_deferred = 0
        """Trims cut short (in part or whole): other engines trimmed since this one's view
        was read, taking the excess it found."""
        self.evictions_taken_back = 0
        """The blocks those trims kept on disk."""
        self.evictions_already_gone = 0
        """Evicted blocks another engine had deleted first (`_deleted`)."""
        self._trims_seen: TrimView | None = None
        """The namespace's trims this index's view is as of (`trims.read_trims`)."""
        self._ledger = OwnLedger(ns_dir) if not read_only else None
        """What this engine added and freed, for the others (`ledger`)."""
        self._ledgers_seen: dict[str, tuple[int, int]] = {}
        """The other engines' ledgers as of the directory read this view comes from."""
        self._counted_early: dict[bytes, int] = {}
        """Evictions the ledger counted as freed when chosen (`evict_to`), by their size."""
        self._poll_applied: Poll | None = None
        self._others = (0, 0)
        """Bytes the other engines' ledgers added and freed since this view's directory
        read: counted against the capacity until the next read accounts their blocks."""
        self._probed = (0, 0)
        """Bytes this view learnt were added to and gone from the directory since that
        read, by other ways than the ledgers (`_learnt`): mostly the same changes as the
        ledgers', not to be counted twice."""
        self._deleting: dict[bytes, int] = {}  # evicted, not yet deleted: key -> bytes
        self._deleted_at: dict[bytes, float] = {}  # by the deleter, since the last rescan
        self._saved_at: dict[bytes, float] = {}
        """This engine's saves, by when they were last reserved or settled, since the last
        re-read."""
        self._gone: list[tuple[float, int]] = []
        """(when, bytes) of evicted blocks found already deleted, since the last re-read."""
        self._track_deletions = False  # from the first re-read on
        self._lock = threading.Lock()
        self._cpus = frozenset(cpus) if cpus else None
        self._deleter = ThreadPoolExecutor(
            1,
            thread_name_prefix="kvdist-disk-evict",
            initializer=move_this_thread,
            initargs=(self._cpus,),
        )
        # Trims wait for the namespace's lock: on their own thread, so that the deletions
        # that make room for saves do not wait behind them.
        self._trimmer = ThreadPoolExecutor(
            1,
            thread_name_prefix="kvdist-disk-trim",
            initializer=move_this_thread,
            initargs=(self._cpus,),
        )
        self._own_trims: list[tuple[int, int]] = []
        """(bytes the record said trimmed before, bytes freed) of this index's recent trims
        (trimmer thread): those made since a view are not others'."""
        self.in_flight: Callable[[bytes], bool] = lambda key: False
        """Whether the ranks are known to be still writing block `key`: pending past
        `pending_timeout_s` then (the scheduler sets it, from the ranks' reports)."""
        self._unusable: dict[bytes, tuple[frozenset[tuple[str, int, int]], float]] = {}
        """Blocks some rank could not load, with the records they had then (path, inode,
        size) and when. While those same files are there (not removable: another user's, a
        read-only directory; or another format's), for `_UNUSABLE_S`, the block is no hit:
        loading it would fail again. Any record written, added or removed clears it."""
        self._unwritten: dict[bytes, int] = {}
        """Bytes reserved for saves of a block not settled yet (maybe not on disk yet)."""
        self.unwritten_bytes = 0
        self.keep_free_bytes: int | None = None
        """Set once a save found the filesystem full: the free space the namespace leaves
        on it from then on (`limit_bytes`)."""
        self.limit_bytes = capacity_bytes
        """What the namespace may take: `capacity_bytes`, and, once the filesystem was
        found full, what it holds on disk plus the free space less `keep_free_bytes`
        (re-read each step by `keep_within_limit`)."""
        self._fs_room: int | None = None
        """Once the filesystem was found full: what this view may account with new saves,
        by its free space (measured: the others' writes are in it), saves in flight
        counted as not landed yet; `_fs_landed`: the same, counted as landed."""
        self._fs_landed: int | None = None
        self._rescanner: Rescanner | None = None  # from scan() on
        self.rescans = 0
        self.blocks_learnt = 0
        """Blocks other engines wrote, first seen by a rescan."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def scan(self) -> None:
        """Learn the blocks already in the directory (a restart keeps its cache). More than
        the capacity (a restart with a smaller one) is evicted at the first step, once the
        ranks agreed on the settings (`keep_within_limit`)."""
        tidy = not self.read_only
        self._trims_seen = read_trims(self.ns_dir)
        own = self._ledger.engine_id if self._ledger is not None else None
        if self.capacity_bytes is not None:
            self._ledgers_seen = read_ledgers(self.ns_dir, exclude=own)
        started_at = time.time()
        found = read_blocks(self.ns_dir, self.num_kv_heads, tidy=tidy)
        assert found is not None  # no stop event: the walk is never cut short
        for key in sorted(found, key=lambda k: found[k][0]):
            _, size, complete = found[key]
            self._set(key, _Entry(size, complete))
        self._rescanner = Rescanner(
            self.ns_dir,
            self.num_kv_heads,
            found,
            seen_at=started_at,
            clock=self._clock,
            tidy=tidy,
            ledger=self._ledger,
            read_others=self.capacity_bytes is not None,
        )

    # -- other engines' writes and evictions --------------------------------------------
    def start_rescans(self, interval_s: float) -> None:
        """Re-read the directory every `interval_s` in a background thread (after `scan`);
        `apply_rescan` then accounts what changed."""
        if self._rescanner is None:
            raise RuntimeError("scan() the directory before starting rescans")
        self._track_deletions = True
        self._rescanner.start(interval_s, self._cpus)

    def rescan_now(self) -> None:
        """One re-read of the directory, in this thread (after `scan`)."""
        if self._rescanner is None:
            raise RuntimeError("scan() the directory before rescanning it")
        self._track_deletions = True
        self._rescanner.read_now()

    def apply_rescan(self, pinned: Callable[[bytes], bool]) -> bool:
        """Account what the last re-read found and what the other engines' ledgers say
        they did since (scheduler thread); then evict down to capacity. False when no
        re-read was new to apply."""
        changes = self._rescanner.take() if self._rescanner is not None else None
        if changes is not None:
            self._apply_changes(changes)
        if self._apply_poll() or changes is not None:
            target = self._trim_target()
            if target is not None and self.total_bytes > target:
                self.trim_to(target, pinned)
        return changes is not None

    def _apply_changes(self, changes: DirChanges) -> None:
        with self._lock:
            # Blocks this engine deleted while the re-read ran may still be in it.
            recently_deleted = {k for k, t in self._deleted_at.items() if t >= changes.started}
            recently_deleted |= self._deleting.keys()
            self._deleted_at = {k: t for k, t in self._deleted_at.items() if t >= changes.started}
            # This engine's saves the walk may have seen land: those reserved or settled
            # since it started, and those still in flight (reserved before it).
            recently_saved = {k for k, t in self._saved_at.items() if t >= changes.started}
            recently_saved |= {k for k, e in self._entries.items() if e.pending_since is not None}
            self._saved_at = {k: t for k, t in self._saved_at.items() if t >= changes.started}
            if changes.before is not None:
                self._trims_seen = changes.before.trims
                self._ledgers_seen = changes.before.ledgers
                self._others = (0, 0)
                # The ledgers are as of the walk's start: the others' blocks written
                # during it are in the walk and in the ledgers' growth since.
                self._probed = (self._written_during(changes, recently_saved), 0)
                # A poll made during the walk may be applied already, on the old view:
                # taken again on this one.
                self._poll_applied = None
            # The room others took before this read began is in it (their saves).
            self._gone = [(t, n) for t, n in self._gone if t >= changes.started]
        self.rescans += 1
        for key in changes.vanished:
            entry = self._entries.get(key)
            if entry is not None and not self._pending(key, entry):
                self._drop(key)
        learnt = []
        skipped = set()
        for key, (mtime, size, complete) in changes.changed.items():
            if key in recently_deleted:
                skipped.add(key)  # if it is there (rewritten since), the next read says so
                continue
            if key in self._entries:
                self._observe(key, size, complete)
            else:
                learnt.append((mtime, key, size, complete))
        # Blocks first seen here: those written or used since the read before count as just
        # used (another engine's fresh prefixes are not the first to go), the others as the
        # least recently used; in each group the oldest file first.
        for mtime, key, size, complete in sorted(learnt, reverse=True):
            if mtime < changes.since:
                self._set(key, _Entry(size, complete))
                self._entries.move_to_end(key, last=False)
        for mtime, key, size, complete in sorted(learnt):
            if mtime >= changes.since:
                self._set(key, _Entry(size, complete))
        self.blocks_learnt += len(learnt)
        if skipped:
            assert self._rescanner is not None
            self._rescanner.report_again(skipped)

    def _written_during(self, changes: DirChanges, own: set[bytes]) -> int:
        """Bytes of the blocks the last walk found new or resized whose newest record is
        younger than the walk, but for this engine's (not in the others' ledgers). A
        block only used during the walk (a finished request's stamps) counts too: what
        it takes off is at most the ledgers' growth since (`_own_capacity`)."""
        began = changes.began_at
        if began is None:
            return 0
        return sum(
            size
            for key, (mtime, size, _) in changes.changed.items()
            if mtime >= began and key not in own
        )

    def _apply_poll(self) -> bool:
        """The other engines' growth since this view, by their ledgers' latest poll; False
        when there was no new poll."""
        poll = self._rescanner.latest_poll() if self._rescanner is not None else None
        if poll is None or poll is self._poll_applied:
            return False
        self._poll_applied = poll
        self._others = growth_since(self._ledgers_seen, poll.ledgers)
        with self._lock:  # the others' trims until then are in their ledgers
            self._trims_seen = poll.trims
        return True

    def _save_limit(self) -> int | None:
        """What this engine's view may account with a new save: the capacity less the
        other engines' growth since the view, and, once the filesystem was found full,
        the room its free space leaves for saves (`_fs_room`)."""
        return _least(self._own_capacity(), self._fs_room)

    def _trim_target(self) -> int | None:
        """What this engine's view is evicted down to: as `_save_limit`, but with saves
        not written yet counted as landed on the filesystem (`_fs_landed`)."""
        return _least(self._own_capacity(), self._fs_landed)

    @property
    def others_growth(self) -> int:
        """Bytes the other engines' ledgers added less freed since this view's read."""
        return self._others[0] - self._others[1]

    def _own_capacity(self) -> int | None:
        """The capacity less what the others' ledgers added since the view and plus what
        they freed, each less what this engine's lookups accounted of it already (as far
        as it goes: blocks of an engine without a ledger are in the view only)."""
        cap = self.capacity_bytes
        if cap is None:
            return None
        with self._lock:
            (added, freed), (found, gone) = self._others, self._probed
        return cap - (added - min(found, added)) + (freed - min(gone, freed))

    def probe(self, key: bytes) -> bool:
        """Whether the directory holds every head of block `key`; updates the entry."""
        before = self.total_bytes
        complete = self._reread(key, writes_done=False)
        change = self.total_bytes - before
        if change:
            self._learnt(max(change, 0), max(-change, 0))
        return complete

    def _learnt(self, found: int, gone: int) -> None:
        """Count bytes this view learnt were added to (`found`) and removed from (`gone`)
        the directory since its read by other ways than the ledgers, which most likely
        count them too (`_own_capacity`); a negative `found` for blocks this view dropped
        that are still there, to be found again. Any thread."""
        with self._lock:
            f, g = self._probed
            self._probed = (f + found, g + gone)

    def _reread(self, key: bytes, *, writes_done: bool) -> bool:
        """Account what the directory holds of block `key`; whether it is complete.
        `writes_done`: none of this engine's writes of it is left, so its size is what is
        on disk (else a reservation larger than that stands while writes may land)."""
        with self._lock:
            if key in self._deleting:
                return False
        recs = list_records(block_dir(self.ns_dir, key))
        entry = self._entries.get(key)
        if not recs:
            if entry is not None and not self._pending(key, entry):
                self._drop(key)
            return False
        complete = cover(recs, 0, self.num_kv_heads, self.num_kv_heads) is not None
        mark = self._unusable.get(key)
        if mark is not None:
            if mark[0] == _files(recs) and self._clock() - mark[1] < _UNUSABLE_S:
                complete = False  # the files a load failed on, lately
            else:
                del self._unusable[key]
        size = sum(r.size for r in recs)
        if entry is None:
            self._set(key, _Entry(size, complete))
            self._entries.move_to_end(key, last=False)  # not used by us yet
        else:
            self._observe(key, size, complete, writes_done=writes_done)
        return complete

    def touch(self, key: bytes) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def touch_chain(self, keys: list[bytes]) -> None:
        """Mark consecutive blocks of one request used, the first most recently, so the
        tail is evicted first (as `kvdist.connectors.cpu.slots.SlotMap.touch_chain`)."""
        for key in reversed(keys):
            self.touch(key)

    def wants_save(self, key: bytes, *, computed: bool = True) -> bool:
        """Whether block `key` should be saved: not on disk, in flight or being deleted.
        `computed`: the engine computed it rather than finding it (on the device or in
        this cache); one the index holds complete is then looked for in the directory,
        since it was mostly computed because it was not there (another engine or `kvdist
        cache evict` removed it, a load found it corrupt and deleted it). One the index
        does not hold is looked for too: another engine may have saved it since this one
        looked it up, and saving it again would rewrite it for nothing (and count in
        this engine's ledger as bytes added where none were)."""
        with self._lock:
            if key in self._deleting:
                return False
        entry = self._entries.get(key)
        if entry is None:
            return not self.probe(key)
        if self._pending(key, entry):
            return False
        return not (entry.complete and (not computed or self.probe(key)))

    def lost(self, key: bytes) -> None:
        """A rank could not load block `key` (its record unusable, and removed when
        corrupt): the block is no longer complete, so `wants_save` offers it again, to
        the request that recomputes it first. A block whose writes may still land is left
        as it is: they settle it."""
        recs = list_records(block_dir(self.ns_dir, key))
        if recs:  # some were kept (or another rank's record failed): no hit while so
            self._unusable[key] = (_files(recs), self._clock())
        entry = self._entries.get(key)
        if entry is not None and not self._pending(key, entry):
            entry.complete = False

    def reserve(self, key: bytes, nbytes: int, pinned: Callable[[bytes], bool]) -> bool:
        """Account a save of `nbytes` for `key`, evicting least-recently-used unpinned blocks
        to stay within capacity; False (nothing changed) if it cannot fit."""
        entry = self._entries.get(key)
        grow = max(0, nbytes - (entry.size if entry else 0))
        limit = self._save_limit()
        if limit is not None:
            # Past the limit (others' writes, a trim not made yet) a save only replaces
            # what it evicts: the excess is for one trim to take, not every engine's saves.
            bound = max(limit, self.total_bytes)
            if self.total_bytes + grow > bound:
                self.evict_to(bound - grow, pinned, keep=key)
                if self.total_bytes + grow > bound:
                    return False
        if entry is None:
            entry = self._set(key, _Entry(0, False))
        self.total_bytes += grow
        entry.size += grow
        self._unwritten[key] = self._unwritten.get(key, 0) + grow
        self.unwritten_bytes += grow
        if self._ledger is not None:
            self._ledger.add(grow)
            if not entry.counted:
                entry.counted_over = entry.size - grow
            entry.counted += grow
        entry.pending_since = self._clock()
        if self._track_deletions:
            with self._lock:
                self._saved_at[key] = entry.pending_since
        self._entries.move_to_end(key)
        return True

    def found_full(self, pinned: Callable[[bytes], bool]) -> None:
        """A save found the filesystem full: from now on keep 1 % of it (64 MiB to 1 GiB)
        free, evicting the least recently used blocks to get there and whenever the free
        space falls below it again (`keep_within_limit`)."""
        if self.keep_free_bytes is None:
            st = _statvfs(self.ns_dir)
            one_percent = st.f_blocks * st.f_frsize // 100 if st is not None else 0
            self.keep_free_bytes = min(max(one_percent, _MIN_KEEP_FREE), _MAX_KEEP_FREE)
        self.keep_within_limit(pinned)

    def keep_within_limit(self, pinned: Callable[[bytes], bool]) -> None:
        """Each step: evict down to the capacity (a restart with a smaller one). Once the
        filesystem was found full, first re-read its free space: the namespace may take
        what it has on disk (its blocks, and evicted ones not deleted yet) plus the free
        space, less `keep_free_bytes`; more once others freed space, less once they took
        some. Saves reserved but not reported written may or may not have taken their
        space yet: new saves (`limit_bytes`) count them as not yet landed, so what they
        add never passes the bound; eviction here counts them as landed, so a save landing
        before its report does not evict another block."""
        self._replace_gone(pinned)
        st = _statvfs(self.ns_dir) if self.keep_free_bytes is not None else None
        if st is not None and self.keep_free_bytes is not None:
            with self._lock:
                deleting = sum(self._deleting.values())
            landed = self.total_bytes + deleting + st.f_bavail * st.f_frsize
            landed -= self.keep_free_bytes
            self._fs_landed = max(landed, 0)
            self._fs_room = max(landed - self.unwritten_bytes, 0)
            self.limit_bytes = _least(self.capacity_bytes, self._fs_room)
        target = self._trim_target()
        if target is not None and self.total_bytes > target:
            self.trim_to(target, pinned)

    def _replace_gone(self, pinned: Callable[[bytes], bool]) -> None:
        """Blocks this engine evicted that another engine had deleted already freed nothing
        here: that engine's saves took their room, unseen until the next re-read. Evict as
        much again, so that what this engine saved in their place stays within the limit.
        (Before, such saves took the namespace past its capacity until a re-read, and
        every engine then evicted the whole excess.) Not where the others keep ledgers
        that this engine reads: those count the saves already (`others_growth`), and
        evicting for them here too took the namespace below its capacity."""
        with self._lock:
            gone = sum(n for _, n in self._gone)
            self._gone = []
        if self._poll_applied is not None and self._poll_applied.ledgers:
            return
        limit = self._save_limit()
        if gone and limit is not None:
            target = limit - gone
            if self.total_bytes > target:
                self.evict_to(target, pinned)

    def settle(self, key: bytes, complete: bool, found_there: float = 0.0) -> None:
        """Every writing rank reported its save of block `key`: all stored it (`complete`),
        or some did not (the block is incomplete, and may be saved again or evicted; it is
        accounted at what the directory holds of it, its reservation released).
        `found_there`: the share of the block's records that were there already when the
        ranks stored theirs: another engine's (saving the block at the same moment), whose
        ledger counts them, or, for an incomplete block saved again, this engine's own
        from before. This save added none of those bytes."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.pending_since = None
        if self._track_deletions:
            with self._lock:
                self._saved_at[key] = self._clock()  # it may have landed during a walk
        # Of the bytes found there, those this engine's view held before its save (an
        # incomplete block saved again: the ranks that had stored it find their own
        # records) were not counted as added; the rest were, and the other's ledger has them.
        known, counted = entry.counted_over, entry.counted
        there = min(counted, max(0, round((known + counted) * found_there) - known))
        entry.counted = 0
        self._written(key)
        change = -there
        if complete:
            entry.complete = True
        else:
            before = entry.size
            self._reread(key, writes_done=True)
            after = self._entries[key].size if key in self._entries else 0
            change += after - before  # less landed than reserved
        if self._ledger is not None:
            if change < 0:
                # At most what this save counted. The rest were bytes of the block it
                # never counted (another engine's records, deleted since, which that
                # engine's ledger counts as freed): learnt here, as a lookup learns.
                back = min(-change, counted)
                self._ledger.take_back(added=back)
                self._learnt(0, -change - back)
            else:
                self._ledger.add(change)
        if there:
            self._learnt(there, 0)  # in this view, and in the other writer's ledger

    def evict_to(
        self, target_bytes: int, pinned: Callable[[bytes], bool], keep: bytes | None = None
    ) -> int:
        """Evict least-recently-used blocks until at most `target_bytes` are accounted (to
        make room for a save of this engine's)."""
        victims = self._take_victims(target_bytes, pinned, keep)
        if victims and self._ledger is not None:
            # In the ledger now, with the save it makes room for (reserved at once), not
            # when the deleter gets to it: the others would otherwise see the save's bytes
            # without the room made for them, and trim for it.
            with self._lock:
                sizes = {key: self._deleting.get(key, 0) for key in victims}
                self._counted_early.update(sizes)
            self._ledger.add(-sum(sizes.values()))
        for key in victims:
            self._deleter.submit(self._delete, key)
        return len(victims)

    def trim_to(self, target_bytes: int, pinned: Callable[[bytes], bool]) -> int:
        """Evict least-recently-used blocks until at most `target_bytes` are accounted, as a
        trim (the module docstring): their files are deleted, but for the part of the
        excess other engines trimmed since this view was read; those it keeps, and a
        re-read made at once accounts them again."""
        victims = self._take_victims(target_bytes, pinned, None)
        if victims:
            with self._lock:
                seen = self._trims_seen
            # Without re-reads this view cannot learn of others' trims: trim it whole.
            self._trimmer.submit(self._trim, victims, seen, self._track_deletions)
        return len(victims)

    def _take_victims(
        self, target_bytes: int, pinned: Callable[[bytes], bool], keep: bytes | None
    ) -> list[bytes]:
        """Choose least-recently-used blocks until at most `target_bytes` are accounted;
        forget them and mark them being deleted."""
        victims = []
        running = self.total_bytes
        for key, entry in list(self._entries.items()):
            if running <= target_bytes:
                break
            if key == keep or pinned(key) or self.in_flight(key):
                continue  # in use, saved now, or its writers have not all reported yet
            # A save asked for long ago has most likely landed: look before skipping it.
            if self._pending(key, entry) and not self.probe(key):
                continue
            if key not in self._entries:
                continue
            victims.append(key)
            running -= self._entries[key].size
        for key in victims:
            size = self._entries[key].size
            self._drop(key)
            self.evictions += 1
            with self._lock:
                self._deleting[key] = size
        return victims

    def close(self) -> None:
        if self._rescanner is not None:
            self._rescanner.close()
        self._trimmer.shutdown(wait=True)
        self._deleter.shutdown(wait=True)
        if self._ledger is not None and self._rescanner is not None and self._track_deletions:
            self._ledger.flush()  # its last saves and deletions, for the others' polls

    def _observe(self, key: bytes, size: int, complete: bool, *, writes_done: bool = False) -> None:
        """The directory holds `size` bytes of block `key` (known to the index)."""
        entry = self._entries[key]
        # While writes are in flight the reservation may exceed what is on disk yet.
        new_size = size if complete or writes_done else max(size, entry.size)
        self.total_bytes += new_size - entry.size
        entry.size = new_size
        entry.complete = complete
        if complete or writes_done:
            self._written(key)  # its size is what the directory holds
        if complete:
            entry.pending_since = None

    def _written(self, key: bytes) -> None:
        """Block `key`'s reserved bytes are no longer waiting to be written."""
        self.unwritten_bytes -= self._unwritten.pop(key, 0)

    def _delete(self, key: bytes) -> None:
        freed: int | None = None
        try:
            freed = _remove(self.ns_dir, key)
        finally:
            self._deleted({key: freed})

    def _deleted(self, freed: dict[bytes, int | None], *, in_ledger: Iterable[bytes] = ()) -> None:
        """Blocks deleted, with the bytes each freed (None: not all could be deleted). One
        that freed nothing was gone already: another engine deleted it to make room for
        its own saves, so the room this engine counted on is taken (its ledger says so,
        or, from an engine without one, `_replace_gone` evicts as much again).
        `in_ledger`: those the ledger counted already."""
        if self._ledger is not None:
            counted = set(in_ledger)
            change = not_freed = 0
            with self._lock:
                for key, n in freed.items():
                    early = self._counted_early.pop(key, None)
                    if early is not None:  # counted as freed when chosen: what it was not
                        diff = early - (n if n is not None else early)
                        not_freed += max(diff, 0)
                        change += min(diff, 0)
                    elif key not in counted:
                        change -= n or 0
            self._ledger.add(change)
            self._ledger.take_back(freed=not_freed)
        now = self._clock()
        gone = 0
        with self._lock:
            for key, nbytes in freed.items():
                size = self._deleting.pop(key, 0)
                if nbytes == 0 and size:
                    self._gone.append((now, size))
                    self.evictions_already_gone += 1
                    gone += size
                if self._track_deletions:
                    self._deleted_at[key] = now
        # Another engine deleted those, whose ledger says so: this view dropped them
        # already (the evictions), so their freeing must not count again.
        self._learnt(0, gone)

    def _trim(self, victims: list[bytes], seen: TrimView | None, shared: bool) -> None:
        """Delete a trim's victims under the trim lock: those the other engines' trims
        since this view (`seen`) left to delete, least recently used first; all of them
        when not `shared` (an index that does not re-read the directory cannot catch up
        with others' trims). Trimmer thread."""
        with self._lock:
            sizes = [self._deleting.get(key, 0) for key in victims]
        freed: dict[bytes, int | None] = {}
        in_ledger: list[bytes] = []
        try:
            with trim_lock(self.ns_dir) as ticket:
                left = sum(sizes)
                if shared:
                    left -= self._others_trimmed(ticket, seen)
                for key, size in zip(victims, sizes, strict=True):
                    if left <= 0:
                        break
                    freed[key] = _remove(self.ns_dir, key)
                    left -= size
                if freed:
                    total = sum(n or 0 for n in freed.values())
                    if self._ledger is not None:
                        # In the ledger before the trim record: an engine that reads the
                        # record, then the ledgers, finds the trim in both.
                        self._ledger.add(-total)
                        in_ledger = list(freed)
                        if shared:
                            self._ledger.flush()
                    self._record(ticket, total)
        except TimeoutError:  # another holds the lock: as if it trimmed
            log.debug("disk cache: trim of %s deferred: its lock is held", self.ns_dir)
        except OSError as exc:  # no lock file (the directory removed under the engine)
            log.debug("disk cache: trim of %s without its lock: %s", self.ns_dir, exc)
            for key in victims[len(freed) :]:
                freed[key] = _remove(self.ns_dir, key)
        finally:
            self._deleted(freed, in_ledger=in_ledger)
            kept = victims[len(freed) :]
            if kept:
                with self._lock:
                    kept_bytes = sum(self._deleting.pop(key, 0) for key in kept)
                    self.evictions_taken_back += len(kept)
                    self.trims_deferred += 1
                # Still on disk, out of this view until found again: then not taken for
                # another engine's addition.
                self._learnt(-kept_bytes, 0)
                if self._rescanner is not None:
                    self._rescanner.report_again(set(kept))  # accounted again when read
                    self._rescanner.read_soon()  # a view as of the others' trims, now

    def _others_trimmed(self, ticket: TrimTicket, seen: TrimView | None) -> int:
        """Bytes other engines' trims deleted since the view `seen` (all of the excess
        when unknown: an unreadable record)."""
        since = ticket.trimmed_since(seen)
        if since is None:
            return 1 << 62
        if seen is None:  # the same unreadable record as the view's: none since
            return since
        own = sum(n for before, n in self._own_trims if before >= seen.trimmed_bytes)
        return max(0, since - own)

    def _record(self, ticket: TrimTicket, freed: int) -> None:
        before = ticket.view.trimmed_bytes if ticket.view is not None else 0
        after = ticket.done(freed)
        self._own_trims = [*self._own_trims[-63:], (before, freed)]
        with self._lock:
            if self._trims_seen == ticket.view:  # this view includes the trim
                self._trims_seen = after

    def _pending(self, key: bytes, entry: _Entry) -> bool:
        """Whether writes of block `key` may still land: some writing rank has not reported
        it yet (whatever is on disk), or, without reports, it was planned less than
        `pending_timeout_s` ago and not yet seen complete."""
        if self.in_flight(key):
            return True
        return (
            entry.pending_since is not None
            and self._clock() - entry.pending_since < self.pending_timeout_s
        )

    def _set(self, key: bytes, entry: _Entry) -> _Entry:
        self._drop(key)
        self._entries[key] = entry
        self.total_bytes += entry.size
        return entry

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.total_bytes -= entry.size
        self._written(key)


def _remove(ns_dir: str, key: bytes) -> int | None:
    """Delete block `key`'s directory: the bytes freed (0: it was gone already), or None
    when some file could not be deleted (another user's, say)."""
    errors: list[tuple[str, str]] = []
    freed = remove_block(block_dir(ns_dir, key), errors, keep_writes=True)
    return None if errors else freed


def _least(a: int | None, b: int | None) -> int | None:
    """The smaller of two limits, either of which may be None (no limit)."""
    if a is None or b is None:
        return b if a is None else a
    return min(a, b)


def _files(recs: list[RecordRef]) -> frozenset[tuple[str, int, int]]:
    """Which files a block's records are: a new write of one (a file renamed over it) or
    a record added or removed changes it; new file times (stamps) do not."""
    return frozenset((r.path, r.inode, r.size) for r in recs)


def _statvfs(path: str) -> os.statvfs_result | None:
    """The filesystem `path` is on, or its nearest existing parent's (a namespace
    directory a full disk kept from being made); None if none can be read."""
    while True:
        try:
            return os.statvfs(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        except OSError:
            return None
