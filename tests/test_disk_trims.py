"""Trims of a namespace several engines share (`kvdist.connectors.disk.trims`): one engine
at a time, on a view as of the latest trim. Two `DiskIndex`es on one directory stand for
two engines; block files are stand-ins (a record's name and size are all a read looks at).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import pytest

from kvdist.connectors.disk import index as index_mod
from kvdist.connectors.disk import maintenance
from kvdist.connectors.disk import trims as trims_mod
from kvdist.connectors.disk.index import DiskIndex
from kvdist.connectors.disk.store import block_dir, record_name, remove_block
from kvdist.connectors.disk.trims import NO_TRIMS, TRIMS_FILE, TrimView, read_trims, trim_lock

HEADS = 1
SIZE = 100


def put(ns: str, key: bytes) -> None:
    bdir = block_dir(ns, key)
    os.makedirs(bdir, exist_ok=True)
    with open(os.path.join(bdir, record_name(0, HEADS, HEADS)), "wb") as f:
        f.write(b"x" * SIZE)


def on_disk(ns: str, keys: list[bytes]) -> list[bytes]:
    return [k for k in keys if os.path.isdir(block_dir(ns, k))]


def engine(ns: str, capacity: int) -> DiskIndex:
    index = DiskIndex(ns, HEADS, capacity)
    index.scan()
    return index


def settle(*indexes: DiskIndex) -> None:
    """Wait until each index's queued deletions (and trims) are done."""
    for index in indexes:
        index._trimmer.submit(lambda: None).result()
        index._deleter.submit(lambda: None).result()


def never(key: bytes) -> bool:
    return False


def two_views_of_ten_blocks(
    ns: str, blocks_a: int, blocks_b: int
) -> tuple[DiskIndex, DiskIndex, list[bytes]]:
    """Two engines of those capacities (in blocks) that re-read, to the same view, a
    namespace another engine filled with 10 blocks; neither applied its re-read yet."""
    a, b = engine(ns, blocks_a * SIZE), engine(ns, blocks_b * SIZE)
    keys = [bytes([i]) * 16 for i in range(10)]
    for key in keys:
        put(ns, key)
    a.rescan_now()
    b.rescan_now()
    return a, b, keys


def test_the_record_counts_trims_and_their_bytes(tmp_path) -> None:
    ns = str(tmp_path)
    assert read_trims(ns) == NO_TRIMS  # no file yet
    for expected in (NO_TRIMS, TrimView(1, 300)):
        with trim_lock(ns) as ticket:
            assert ticket.view == expected
            assert ticket.trimmed_since(NO_TRIMS) == expected.trimmed_bytes
            ticket.done(300)
    assert read_trims(ns) == TrimView(2, 600)
    path = os.path.join(ns, TRIMS_FILE)
    with open(path, "r+b") as f:  # a torn write: the new count, the old bytes
        f.write(b"00000000000000000003")
    assert read_trims(ns) is None  # its checksum fails: it matches no view...
    with trim_lock(ns) as ticket:
        assert ticket.trimmed_since(NO_TRIMS) is None and ticket.trimmed_since(None) == 0
        assert ticket.done(100) == TrimView(1, 100)  # ...and a trim on it repairs it
    assert read_trims(ns) == TrimView(1, 100)


def test_a_trim_waits_for_the_lock_only_so_long(tmp_path) -> None:
    """Another process holding the lock (a stopped engine, `kvdist cache evict`) defers a
    trim after `wait_s`, rather than holding up the engine's deletions and shutdown."""
    ns = str(tmp_path)
    with open(os.path.join(ns, TRIMS_FILE), "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError), trim_lock(ns, wait_s=0.05):
            pass
        index = engine(ns, 2 * SIZE)
        keys = [bytes([i]) * 16 for i in range(4)]
        for key in keys:
            put(ns, key)
        index.rescan_now()
        index.apply_rescan(never)
        own = b"o" * 16
        assert index.reserve(own, SIZE, never)  # its room: evicted while the trim waits
        index._deleter.submit(lambda: None).result()
        assert index.trims_deferred == 0 and len(on_disk(ns, keys)) == 3
    settle(index)  # released: the trim gave up or went ahead, and the engine closes
    index.close()


def test_engines_that_find_the_same_excess_trim_it_once(tmp_path) -> None:
    """Two engines re-read a namespace holding 10 blocks against a capacity of 6 (another
    engine's writes) and each chooses 4 victims, different ones (b is still using a's).
    Whichever takes the lock first evicts its 4; the other finds that trim took the excess
    and keeps its victims, which its next re-read accounts again. Before, both evicted theirs: 2
    blocks were left of a capacity of 6."""
    ns = str(tmp_path)
    a, b, keys = two_views_of_ten_blocks(ns, 6, 6)
    assert a.apply_rescan(never)
    a_victims = {k for k in keys if k not in a}
    assert len(a_victims) == 4
    assert b.apply_rescan(lambda key: key in a_victims)  # b's are 4 others
    assert not a_victims & {k for k in keys if k not in b}
    settle(a, b)
    assert len(on_disk(ns, keys)) == 6
    assert read_trims(ns) == TrimView(1, 4 * SIZE)
    first, second = (a, b) if b.trims_deferred else (b, a)
    assert (first.trims_deferred, second.trims_deferred) == (0, 1)
    assert [i.evictions - i.evictions_taken_back for i in (first, second)] == [4, 0]
    # The second's next re-read shows what the first left: nothing more to evict.
    second.rescan_now()
    second.apply_rescan(never)
    settle(second)
    assert second.total_bytes == 6 * SIZE and len(on_disk(ns, keys)) == 6
    # Its view is now as of that trim: its own next trim goes ahead.
    put(ns, b"n" * 16)
    second.rescan_now()
    second.apply_rescan(never)
    settle(second)
    assert len(on_disk(ns, [*keys, b"n" * 16])) == 6 and read_trims(ns) == TrimView(2, 5 * SIZE)
    a.close()
    b.close()


def test_a_trim_takes_what_the_trims_since_its_view_left(tmp_path) -> None:
    """Engines with different capacities on one namespace (8 and 6 blocks) find 10: a
    trims 2; b, on the same view, found 4 too many, and deletes the 2 that a's trim left
    (its least recently used victims), keeping 2. The directory ends at b's capacity."""
    ns = str(tmp_path)
    a, b, keys = two_views_of_ten_blocks(ns, 8, 6)
    assert a.apply_rescan(never)
    settle(a)
    a_victims = {k for k in keys if k not in a}
    assert len(a_victims) == 2 and read_trims(ns) == TrimView(1, 2 * SIZE)
    assert b.apply_rescan(lambda key: key in a_victims)  # 4 victims, none of a's
    settle(b)
    assert len(on_disk(ns, keys)) == 6 and read_trims(ns) == TrimView(2, 4 * SIZE)
    assert (b.trims_deferred, b.evictions - b.evictions_taken_back) == (1, 2)
    b.rescan_now()  # (made at once: the two kept are accounted again)
    b.apply_rescan(never)
    settle(b)
    assert b.total_bytes == 6 * SIZE and len(on_disk(ns, keys)) == 6
    a.close()
    b.close()


def test_a_save_past_the_limit_only_replaces_what_it_evicts(tmp_path) -> None:
    """An engine whose view is past its capacity (here: a restart onto a fuller directory,
    before its first step trims it; as well others' writes not trimmed yet) makes room
    for a save by evicting as much as it adds, not the whole excess."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(9)]
    for key in keys:
        put(ns, key)
    index = engine(ns, 6 * SIZE)
    assert index.total_bytes == 9 * SIZE
    assert index.reserve(b"s" * 16, SIZE, never)
    settle(index)
    assert index.total_bytes == 9 * SIZE and len(on_disk(ns, keys)) == 8
    index.close()


def test_an_engine_that_does_not_reread_trims_regardless_of_the_count(tmp_path) -> None:
    """Without re-reads (rescan_s None) a view never catches up with others' trims: its
    trims (a restart with a smaller capacity) go ahead whatever the count."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(5)]
    for key in keys:
        put(ns, key)
    index = engine(ns, 2 * SIZE)
    with trim_lock(ns) as ticket:
        ticket.done(3 * SIZE)  # another engine trimmed after this one read the directory
    index.keep_within_limit(never)
    settle(index)
    assert len(on_disk(ns, keys)) == 2 and read_trims(ns) == TrimView(2, 6 * SIZE)
    index.close()


def test_cache_evict_counts_as_a_trim(tmp_path) -> None:
    """`kvdist cache evict` moves the count of each namespace it removes blocks from, so
    an engine whose view is older does not trim again what it took."""
    ns = maintenance_namespace(tmp_path)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys:
        put(ns, key)
    report = maintenance.evict_cache(str(tmp_path), to_bytes=2 * SIZE)
    assert report.removed == 2 and read_trims(ns) == TrimView(1, 2 * SIZE)


def maintenance_namespace(root) -> str:
    from kvdist.connectors.disk.store import prepare_namespace_dir

    return prepare_namespace_dir(str(root), "trims-test-namespace")


def test_blocks_another_engine_wrote_since_the_last_read_count_as_just_used(tmp_path) -> None:
    """A re-read that finds blocks another engine wrote since the read before puts them at
    the most recently used end (its fresh prefixes are not the first to go); blocks found
    older go to the least recently used end. Before, all went to the LRU end."""
    ns = str(tmp_path)
    index = engine(ns, 3 * SIZE)
    own = [b"o" * 15 + bytes([i]) for i in range(2)]
    for key in own:  # this engine's saves, used before the other engine wrote
        assert index.reserve(key, SIZE, never)
        put(ns, key)
        index.settle(key, True)
    old, fresh = b"d" * 16, [b"f" * 15 + bytes([i]) for i in range(2)]
    put(ns, old)
    hour_ago = os.path.getmtime(block_dir(ns, old)) - 3600
    for name in os.listdir(block_dir(ns, old)):
        os.utime(os.path.join(block_dir(ns, old), name), (hour_ago, hour_ago))
    for key in fresh:
        put(ns, key)
    index.rescan_now()
    index.apply_rescan(never)  # 5 blocks, room for 3: a trim of 2
    settle(index)
    assert on_disk(ns, [old, *own, *fresh]) == [own[1], *fresh]
    index.close()


def test_room_another_engine_took_first_is_made_again(tmp_path) -> None:
    """This engine evicts a block to make room for a save, but another engine had deleted
    it already, for a save of its own this engine has not seen yet: the eviction freed
    nothing, and the directory is a block past the capacity. The next step evicts one
    more; the re-read after finds the namespace at capacity, with nothing to trim."""
    ns = str(tmp_path)
    index = engine(ns, 3 * SIZE)
    own = [b"o" * 15 + bytes([i]) for i in range(3)]
    for key in own:
        assert index.reserve(key, SIZE, never)
        put(ns, key)
        index.settle(key, True)
    theirs = b"y" * 16
    remove_block(block_dir(ns, own[0]))  # the other engine's eviction...
    put(ns, theirs)  # ...and its save
    assert index.reserve(b"s" * 16, SIZE, never)  # evicts own[0]: nothing freed
    put(ns, b"s" * 16)
    index.settle(b"s" * 16, True)
    settle(index)
    assert len(on_disk(ns, [*own, theirs, b"s" * 16])) == 4
    index.keep_within_limit(never)  # every step
    settle(index)
    assert on_disk(ns, [*own, theirs, b"s" * 16]) == [own[2], theirs, b"s" * 16]
    index.rescan_now()
    index.apply_rescan(never)
    settle(index)
    assert index.total_bytes == 3 * SIZE and read_trims(ns) == NO_TRIMS
    index.close()


def test_an_engines_own_trims_since_its_view_are_not_taken_for_others(tmp_path) -> None:
    """Two trims of one engine on the same view (the second queued while the first waits;
    or a re-read under way while it trims): the first's bytes are its own, so the second
    still deletes its whole excess. Before, it kept its victims (8 blocks of 6 left)."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(6)]
    for key in keys:
        put(ns, key)
    index = engine(ns, 6 * SIZE)
    index.rescan_now()
    index.apply_rescan(never)
    gate = threading.Event()
    index._trimmer.submit(gate.wait)  # the trimmer busy (a slow unlink, the lock held)
    for batch in (b"f", b"m"):
        more = [batch * 15 + bytes([i]) for i in range(2)]
        for key in more:
            put(ns, key)
        keys += more
        index.rescan_now()
        index.apply_rescan(never)  # a trim of 2, on a view as of no trims
    gate.set()
    settle(index)
    assert len(on_disk(ns, keys)) == 6 and index.trims_deferred == 0
    assert read_trims(ns) == TrimView(2, 4 * SIZE)
    index.close()


def test_without_flock_trims_still_read_and_write_the_record(tmp_path, monkeypatch) -> None:
    """A filesystem without `flock` (ENOSYS, ENOLCK...): trims go ahead without the lock,
    still recorded, so engines that found the same excess still trim it once."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(trims_mod.fcntl, "flock", no_flock)
    ns = str(tmp_path)
    a, b, keys = two_views_of_ten_blocks(ns, 6, 6)
    a.apply_rescan(never)
    settle(a)
    a_victims = {k for k in keys if k not in a}
    b.apply_rescan(lambda key: key in a_victims)
    settle(b)
    assert len(on_disk(ns, keys)) == 6 and read_trims(ns) == TrimView(1, 4 * SIZE)
    a.close()
    b.close()


def test_a_block_that_could_not_be_deleted_is_not_counted_gone(tmp_path, monkeypatch) -> None:
    """An eviction whose files could not all be deleted (another user's) is no sign that
    another engine took the room first: nothing is evicted again for it."""
    ns = str(tmp_path)
    index = engine(ns, 1 * SIZE)
    assert index.reserve(b"a" * 16, SIZE, never)
    put(ns, b"a" * 16)
    index.settle(b"a" * 16, True)

    def refused(
        bdir: str, errors: list[tuple[str, str]] | None = None, keep_writes: bool = False
    ) -> int:
        assert errors is not None
        errors.append((bdir, "Permission denied"))
        return 0

    monkeypatch.setattr(index_mod, "remove_block", refused)
    assert index.reserve(b"b" * 16, SIZE, never)  # evicts a: its files stay
    settle(index)
    assert index.evictions_already_gone == 0
    index.close()


def test_an_eviction_leaves_another_engines_write_in_flight(tmp_path) -> None:
    """An engine evicting a block that another engine is saving anew deletes its records
    but not the other's temporary file (its write in flight), so that write's rename still
    lands, rather than failing the other's save. A temporary file of a write that died
    long ago goes."""
    ns = str(tmp_path)
    index = engine(ns, 1 * SIZE)
    key = b"a" * 16
    assert index.reserve(key, SIZE, never)
    put(ns, key)
    index.settle(key, True)
    bdir = block_dir(ns, key)
    writing = os.path.join(bdir, ".h0-1of1.kvb.other-1.tmp")
    dead = os.path.join(bdir, ".h0-1of1.kvb.dead-2.tmp")
    for path in (writing, dead):
        with open(path, "wb") as f:
            f.write(b"x" * SIZE)
    hour_ago = os.path.getmtime(dead) - 3600
    os.utime(dead, (hour_ago, hour_ago))
    assert index.reserve(b"b" * 16, SIZE, never)  # evicts a
    settle(index)
    assert sorted(os.listdir(bdir)) == [os.path.basename(writing)]
    os.replace(writing, os.path.join(bdir, record_name(0, HEADS, HEADS)))  # it lands
    assert on_disk(ns, [key]) == [key]
    index.close()
