"""Engines' ledgers on a shared namespace (`kvdist.connectors.disk.ledger`): each counts
what it added and freed; the others count that against the capacity between their re-reads
of the directory. `DiskIndex`es on one directory stand for engines; block files are
stand-ins, as in `test_disk_trims`."""

from __future__ import annotations

import os
import time

import pytest
from test_disk_trims import SIZE, never, on_disk, put, settle

from kvdist.connectors.disk import ledger as ledger_mod
from kvdist.connectors.disk.index import DiskIndex
from kvdist.connectors.disk.ledger import (
    LEDGER_DIR,
    OwnLedger,
    growth_since,
    read_ledgers,
    remove_stale,
)
from kvdist.connectors.disk.store import block_dir, record_name
from kvdist.connectors.disk.trims import TrimView, read_trims


def engine(ns: str, capacity: int | None) -> DiskIndex:
    """An engine that re-reads the directory (so it shares trims), on a fresh view."""
    index = DiskIndex(ns, 1, capacity)
    index.scan()
    index.rescan_now()
    index.apply_rescan(never)
    return index


def save(index: DiskIndex, ns: str, key: bytes) -> None:
    """A save of this engine's, as the scheduler makes one: reserved, written, settled."""
    assert index.reserve(key, SIZE, never)
    put(ns, key)
    index.settle(key, True)


def poll(*indexes: DiskIndex) -> None:
    """What each engine's re-read thread does every second: write its ledger, read the
    others'."""
    for index in indexes:
        assert index._rescanner is not None
        index._rescanner.poll_now()


def test_a_ledger_counts_what_its_engine_added_and_freed(tmp_path) -> None:
    ns = str(tmp_path)
    mine, theirs = OwnLedger(ns), OwnLedger(ns)
    assert mine.flush() and not os.path.exists(os.path.join(ns, LEDGER_DIR))  # nothing yet
    mine.add(500)
    mine.add(-200)
    theirs.add(50)
    assert mine.flush() and theirs.flush()
    assert read_ledgers(ns) == {mine.engine_id: (500, 200), theirs.engine_id: (50, 0)}
    assert read_ledgers(ns, exclude=mine.engine_id) == {theirs.engine_id: (50, 0)}
    with open(os.path.join(ns, LEDGER_DIR, theirs.engine_id), "r+b") as f:
        f.write(b"00000000000000000099")  # torn: its checksum fails
    with open(os.path.join(ns, LEDGER_DIR, "not a ledger"), "wb") as f:
        f.write(b"x")
    assert read_ledgers(ns) == {mine.engine_id: (500, 200)}  # as if that one had none


def test_growth_counts_new_ledgers_whole_and_vanished_ones_not_at_all() -> None:
    view = {"a": (100, 0), "b": (40, 20)}
    assert growth_since(view, {"a": (130, 0), "b": (40, 20)}) == (30, 0)
    assert growth_since(view, {"a": (100, 0), "b": (40, 50), "c": (70, 5)}) == (70, 35)
    assert growth_since(view, {"b": (40, 20)}) == (0, 0)  # a's since: at the next walk


def test_a_removed_ledger_goes_on_under_a_new_id_from_zero(tmp_path) -> None:
    """Removed under its engine (as stale, by hand), a ledger is not re-created with all
    it counted (a reader would take that past for new writes): it goes on from zero."""
    ns = str(tmp_path)
    ledger = OwnLedger(ns)
    ledger.add(1000)
    assert ledger.flush()
    old = ledger.engine_id
    os.unlink(os.path.join(ns, LEDGER_DIR, old))
    ledger.add(7)
    assert not ledger.flush() and ledger.engine_id != old
    ledger.add(5)
    assert ledger.flush()
    assert read_ledgers(ns) == {ledger.engine_id: (5, 0)}


def test_stale_ledgers_are_removed(tmp_path) -> None:
    ns = str(tmp_path)
    old, fresh = OwnLedger(ns), OwnLedger(ns)
    for ledger in (old, fresh):
        ledger.add(1)
        ledger.flush()
    day_ago = time.time() - 2 * ledger_mod.STALE_S
    os.utime(os.path.join(ns, LEDGER_DIR, old.engine_id), (day_ago, day_ago))
    assert remove_stale(ns) == 1
    assert set(read_ledgers(ns)) == {fresh.engine_id}


def test_others_saves_count_against_the_capacity_before_the_next_read(tmp_path) -> None:
    """Engine a (capacity 6 blocks) holds 4; engine b (no capacity of its own) saves 4
    more. Before, a learnt of them at its next re-read of the directory (a minute by
    default) and the namespace held 8 until then; by b's ledger it trims its 2 least
    recently used blocks at once."""
    ns = str(tmp_path)
    a, b = engine(ns, 6 * SIZE), engine(ns, None)
    own = [b"a" * 15 + bytes([i]) for i in range(4)]
    for key in own:
        save(a, ns, key)
    theirs = [b"b" * 15 + bytes([i]) for i in range(4)]
    for key in theirs:
        save(b, ns, key)
    poll(b, a)
    a.apply_rescan(never)
    settle(a)
    assert a.others_growth == 4 * SIZE
    assert on_disk(ns, own) == own[2:] and on_disk(ns, theirs) == theirs
    assert read_trims(ns) == TrimView(1, 2 * SIZE)
    # Its next read of the directory accounts b's blocks itself: the growth is back to 0.
    a.rescan_now()
    a.apply_rescan(never)
    settle(a)
    assert a.others_growth == 0 and a.total_bytes == 6 * SIZE
    assert len(on_disk(ns, own + theirs)) == 6
    a.close()
    b.close()


def test_a_save_that_replaces_what_it_evicts_is_no_growth(tmp_path) -> None:
    """b saves 2 blocks in a full namespace, evicting 2 of its view to make room: its
    ledger nets 0, and a, whose view still holds the 2 evicted, trims nothing."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys:
        put(ns, key)
    a, b = engine(ns, 4 * SIZE), engine(ns, 4 * SIZE)
    for key in (b"n" * 16, b"m" * 16):
        save(b, ns, key)
    settle(b)
    poll(b, a)
    a.apply_rescan(never)
    a.keep_within_limit(never)
    settle(a)
    assert a.others_growth == 0 and a.evictions == 0
    assert len(on_disk(ns, [*keys, b"n" * 16, b"m" * 16])) == 4
    a.close()
    b.close()


def three_engines_and_two_new_blocks(ns: str):
    """Engines a and b (capacity 6 blocks) on a view of 6 blocks, and c (no capacity),
    which then saves 2 more."""
    keys = [bytes([i]) * 16 for i in range(6)]
    for key in keys:
        put(ns, key)
    a, b, c = engine(ns, 6 * SIZE), engine(ns, 6 * SIZE), engine(ns, None)
    new = [b"c" * 16, b"d" * 16]
    for key in new:
        save(c, ns, key)
    return a, b, c, keys, new


def test_engines_that_learn_of_the_same_growth_trim_it_once(tmp_path) -> None:
    """a and b (capacity 6 blocks, views of 6) learn from c's ledger that it saved 2 more:
    the first to take the trim lock evicts 2, the second finds that trim (it is in the
    trims record and in the first's ledger) and keeps its victims."""
    ns = str(tmp_path)
    a, b, c, keys, new = three_engines_and_two_new_blocks(ns)
    poll(c, a, b)
    assert a.apply_rescan(never) is False  # no re-read: the ledgers alone
    b.apply_rescan(lambda key: key not in a)  # (b's victims differ from a's)
    settle(a, b)
    assert len(on_disk(ns, keys + new)) == 6
    assert read_trims(ns) == TrimView(1, 2 * SIZE)
    assert sorted([a.trims_deferred, b.trims_deferred]) == [0, 1]
    # The one that kept its victims sees the first's trim in its ledger at its next poll.
    poll(a, b)
    for index in (a, b):
        index.apply_rescan(never)
        index.keep_within_limit(never)
    settle(a, b)
    assert len(on_disk(ns, keys + new)) == 6 and read_trims(ns) == TrimView(1, 2 * SIZE)
    for index in (a, b, c):
        index.close()


def test_background_polls_write_and_read_the_ledgers(tmp_path) -> None:
    """With rescans started, the re-read thread writes the engine's ledger and reads the
    others' every `POLL_S` (capped at `rescan_s`), between its walks."""
    ns = str(tmp_path)
    a, b = engine(ns, 10 * SIZE), engine(ns, None)
    a.start_rescans(30.0)  # no walk during the test: polls only
    b.start_rescans(0.05)
    for key in (b"x" * 16, b"y" * 16, b"z" * 16):
        save(b, ns, key)
    deadline = time.monotonic() + 10
    while a.others_growth != 3 * SIZE and time.monotonic() < deadline:
        time.sleep(0.05)
        a.apply_rescan(never)
    assert a.others_growth == 3 * SIZE and a.rescans == 1  # engine()'s own
    a.close()
    b.close()


def test_a_trim_is_in_its_engines_ledger_before_it_is_in_the_trims_record(tmp_path) -> None:
    """a trims what c's ledger added; b polls after that trim but before a's own next
    poll. b reads the trims record first (which shows a's trim), then the ledgers: a's
    must show the bytes that trim freed, or b, whose view is then as of that trim, would
    take the namespace for over capacity and trim as much again (4 blocks left of 6)."""
    ns = str(tmp_path)
    a, b, c, keys, new = three_engines_and_two_new_blocks(ns)
    poll(c, a)
    a.apply_rescan(never)
    settle(a)
    assert read_trims(ns) == TrimView(1, 2 * SIZE)
    poll(b)
    b.apply_rescan(never)
    b.keep_within_limit(never)
    settle(b)
    assert b.others_growth == 0 and b.evictions == 0
    assert len(on_disk(ns, keys + new)) == 6
    for index in (a, b, c):
        index.close()


def test_blocks_a_lookup_found_are_not_counted_twice(tmp_path) -> None:
    """a's lookups find 3 of the 4 blocks c saved (a prompt they share) and account them:
    c's ledger says the same 4, so a counts the one it has not seen, not 7 (it trimmed 3
    blocks too many before)."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(3)]
    for key in keys:
        put(ns, key)
    a, c = engine(ns, 8 * SIZE), engine(ns, None)
    new = [b"c" * 15 + bytes([i]) for i in range(4)]
    for key in new:
        save(c, ns, key)
    for key in new[:3]:
        assert a.probe(key)
    poll(c, a)
    a.apply_rescan(never)
    a.keep_within_limit(never)
    settle(a)
    assert a.total_bytes == 6 * SIZE and a.others_growth == 4 * SIZE and a.evictions == 0
    assert a._own_capacity() == 7 * SIZE
    for index in (a, c):
        index.close()


def test_lookups_of_blocks_no_ledger_wrote_take_nothing_off_the_growth(tmp_path) -> None:
    """Blocks a lookup finds that no ledger counted (an engine without one) are in the
    view as they were before ledgers: they take nothing off the capacity beyond their
    size, and give nothing back."""
    ns = str(tmp_path)
    a = engine(ns, 4 * SIZE)
    theirs = [bytes([i]) * 16 for i in range(3)]
    for key in theirs:
        put(ns, key)  # no ledger
        assert a.probe(key)
    poll(a)
    a.apply_rescan(never)
    assert a._own_capacity() == 4 * SIZE and a.total_bytes == 3 * SIZE
    a.close()


def test_a_block_another_engine_saved_since_the_lookup_is_not_saved_again(tmp_path) -> None:
    """Two engines computed one prompt; b's save landed after a looked it up. a must find
    it rather than write it again: the rewrite added no bytes, but counted in a's ledger
    as added, every other engine would have trimmed as much for nothing."""
    ns = str(tmp_path)
    a, b = engine(ns, 8 * SIZE), engine(ns, None)
    key = b"k" * 16
    assert a.wants_save(key)  # not there: a plans it...
    save(b, ns, key)  # ...b's save lands first
    assert not a.wants_save(key) and key in a and a.total_bytes == SIZE
    for index in (a, b):
        index.close()


def test_additions_and_deletions_are_taken_off_apart(tmp_path) -> None:
    """c saves 2 blocks and d evicts 2 that a's view holds; a's lookups find those 2 gone.
    The ledgers' net is 0, but what a's lookups saw is of the deletions only: a may then
    account 6 blocks of its capacity of 8 (c's 2 are not in its view), not 8. Found in
    review: one net figure let the namespace reach 10 blocks until a's next walk."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(6)]
    for key in keys:
        put(ns, key)
    a, c, d = engine(ns, 8 * SIZE), engine(ns, None), engine(ns, None)
    for key in (b"c" * 16, b"d" * 16):
        save(c, ns, key)
    d.evict_to(4 * SIZE, never)
    settle(d)
    gone = [k for k in keys if k not in on_disk(ns, keys)]
    assert len(gone) == 2
    for key in gone:
        assert not a.probe(key)
    poll(c, d, a)
    a.apply_rescan(never)
    assert a.others_growth == 0 and a.total_bytes == 4 * SIZE
    assert a._own_capacity() == 6 * SIZE
    for index in (a, c, d):
        index.close()


def test_a_long_walk_of_the_directory_polls_the_ledgers_on_the_way(tmp_path, monkeypatch) -> None:
    """A walk of a large or remote directory takes long, the case ledgers are for: the
    re-read thread writes and reads them during it too, every POLL_S. Before, only between
    walks: an engine inside a long walk told and learnt nothing."""
    from kvdist.connectors.disk import rescan

    ns = str(tmp_path)
    for i in range(6):
        put(ns, bytes([i]) * 16)
    real = rescan.iter_block_dirs

    def slow(ns_dir, *args):
        for item in real(ns_dir, *args):
            time.sleep(0.05)
            yield item

    monkeypatch.setattr(rescan, "iter_block_dirs", slow)
    monkeypatch.setattr(rescan, "POLL_S", 0.1)
    calls = []
    found = rescan.read_blocks(ns, 1, between=lambda: calls.append(time.monotonic()))
    assert found is not None and len(found) == 6
    assert len(calls) >= 1, calls


def test_concurrent_flushes_leave_the_latest_counts(tmp_path, monkeypatch) -> None:
    """The re-read thread and a trim flush the ledger at once: the older counts must not
    land last (found in review: a trim's freed bytes vanished from the file, and another
    engine trimmed as much again)."""
    import threading

    ns = str(tmp_path)
    ledger = OwnLedger(ns)
    ledger.add(100)
    assert ledger.flush()
    real = ledger_mod.os.pwrite
    first_in, release = threading.Event(), threading.Event()

    def held_pwrite(fd, data, offset):
        if not first_in.is_set():  # the first writer stalls inside its write
            first_in.set()
            release.wait(5)
        return real(fd, data, offset)

    monkeypatch.setattr(ledger_mod.os, "pwrite", held_pwrite)
    ledger.add(-40)
    older = threading.Thread(target=ledger.flush)
    older.start()
    assert first_in.wait(5)
    ledger.add(-60)  # the trim's deletions, flushed while the first write stalls
    newer = threading.Thread(target=ledger.flush)
    newer.start()
    time.sleep(0.2)
    release.set()
    older.join(5)
    newer.join(5)
    assert not older.is_alive() and not newer.is_alive()
    assert read_ledgers(ns) == {ledger.engine_id: (100, 100)}


def test_an_eviction_another_engine_made_first_is_not_counted_twice(tmp_path) -> None:
    """b evicts a block a's view holds and saves another in its room (its ledger: one
    added, one freed); a then evicts the same block and finds it gone. a dropped it from
    its view, so b's freeing of it must not give a room again: a may account 5 of its 6
    (b's new block is not in its view). Found on the GPU: 145 such evictions an engine
    let the directory reach 1.4x the capacity."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(6)]
    for key in keys:
        put(ns, key)
    a, b = engine(ns, 6 * SIZE), engine(ns, 6 * SIZE)
    save(b, ns, b"s" * 16)  # evicts b's least recently used block, keys[0], for its room
    settle(b)
    assert on_disk(ns, keys[:1]) == []
    a.evict_to(5 * SIZE, never)  # keys[0] too: gone already
    settle(a)
    assert a.evictions_already_gone == 1 and a.total_bytes == 5 * SIZE
    poll(b, a)
    a.apply_rescan(never)
    assert a._own_capacity() == 5 * SIZE
    for index in (a, b):
        index.close()


def test_a_saves_room_is_in_the_ledger_with_the_save(tmp_path) -> None:
    """A save into a full view evicts as much as it adds: the ledger must show both at
    once (net 0), not the save's bytes until the deleter gets to the eviction. Found on
    the GPU: engines that shared no block read each other's saves without their room
    and trimmed for it, holding the directory at 0.93x of the capacity with 3x the
    evictions."""
    import threading

    ns = str(tmp_path)
    a = engine(ns, 3 * SIZE)
    for i in range(3):
        save(a, ns, bytes([i]) * 16)
    busy = threading.Event()
    a._deleter.submit(busy.wait, 5)  # the deleter is busy: the eviction waits
    save(a, ns, b"n" * 16)
    assert a._ledger is not None and a._ledger.flush()
    assert read_ledgers(ns) == {a._ledger.engine_id: (4 * SIZE, SIZE)}
    busy.set()
    settle(a)
    assert a._ledger.flush()
    assert read_ledgers(ns) == {a._ledger.engine_id: (4 * SIZE, SIZE)}  # not twice
    a.close()


def test_a_poll_made_during_a_walk_counts_again_on_the_walks_view(tmp_path) -> None:
    """A poll during a walk is applied on the old view; the walk then brings a new view,
    as of its start: what the ledgers grew by since then must count on it. Before, the
    same poll was not taken again, and the growth read 0 until the next poll."""
    ns = str(tmp_path)
    a, c = engine(ns, 10 * SIZE), engine(ns, None)
    r = a._rescanner
    assert r is not None
    start = r.poll_now()  # the walk's view: before c's saves
    for key in (b"p" * 16, b"q" * 16):
        save(c, ns, key)
    poll(c, a)  # during the walk
    a.apply_rescan(never)
    assert a.others_growth == 2 * SIZE
    r.read_now()  # stands for the walk's end (its own poll is newer: made the latest below)
    changes = r.take()
    assert changes is not None
    changes.before = start  # its view: as of its start, before c's saves
    changes.changed = {}  # (the stand-in walk saw nothing of them)
    r._changes = changes
    r._poll = a._poll_applied  # the latest poll is the one applied during the walk
    a.apply_rescan(never)
    assert a.others_growth == 2 * SIZE
    for index in (a, c):
        index.close()


def test_an_eviction_another_engine_made_first_is_made_up_for_once(tmp_path) -> None:
    """b and a each save a block into a full namespace (capacity 6 blocks), both evicting
    the same one: the directory holds 7 and one trim brings it back to 6. a's eviction
    finds its block gone: b's ledger (its save) is what tells a its room was taken, and
    a trims 1. Before, a also evicted as much again as for an engine without a ledger
    (`_replace_gone`), and the directory held 5."""
    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(6)]
    for key in keys:
        put(ns, key)
    a, b = engine(ns, 6 * SIZE), engine(ns, 6 * SIZE)
    theirs, mine = b"s" * 16, b"m" * 16
    save(b, ns, theirs)  # evicts keys[0] for its room
    settle(b)
    save(a, ns, mine)  # evicts keys[0] too: gone already
    settle(a)
    assert a.evictions_already_gone == 1
    assert len(on_disk(ns, [*keys, theirs, mine])) == 7
    poll(b, a)
    for index in (a, b):
        index.apply_rescan(never)
        index.keep_within_limit(never)
        settle(index)
        poll(a, b)
    assert len(on_disk(ns, [*keys, theirs, mine])) == 6
    # a's ledger: its save, and its trim; not the eviction that freed nothing.
    assert a._ledger is not None and a._ledger.flush()
    assert read_ledgers(ns)[a._ledger.engine_id] == (SIZE, SIZE)
    for index in (a, b):
        index.close()


def test_a_write_during_a_walk_is_not_counted_twice(tmp_path, monkeypatch) -> None:
    """c saves 2 blocks while a's re-read walks the directory: the walk finds them, and
    c's ledger, read at the walk's start, grows by them after it. a (capacity 6 blocks,
    4 before) must count them once: 6 blocks, no trim. Before, they counted in the view
    and as c's growth until the next walk, and a trimmed 2 blocks for nothing."""
    from kvdist.connectors.disk import rescan

    ns = str(tmp_path)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys:
        put(ns, key)
    a, c = engine(ns, 6 * SIZE), engine(ns, None)
    new = [b"p" * 16, b"q" * 16]
    real = rescan.iter_block_dirs

    def while_walking(ns_dir, *args):
        time.sleep(0.05)  # file times after the walk began, whatever the clock's grain
        for key in new:
            save(c, ns, key)
        poll(c)
        yield from real(ns_dir, *args)

    monkeypatch.setattr(rescan, "iter_block_dirs", while_walking)
    a.rescan_now()
    monkeypatch.undo()
    a.apply_rescan(never)
    assert a.total_bytes == 6 * SIZE  # the walk found them
    poll(a)  # c's ledger: 2 blocks since the walk began
    a.apply_rescan(never)
    a.keep_within_limit(never)
    settle(a)
    assert a.others_growth == 2 * SIZE and a.evictions == 0
    assert len(on_disk(ns, keys + new)) == 6
    for index in (a, c):
        index.close()


def test_what_a_save_did_not_add_is_taken_off_its_added_bytes(tmp_path) -> None:
    """A save the ranks report not stored added nothing: its reservation comes off the
    ledger's added bytes, not onto its freed ones. Counted as freed, an engine whose own
    lookups learnt of deletions (which cancel the others' freed bytes) kept the phantom
    addition and trimmed for it."""
    ns = str(tmp_path)
    a = engine(ns, 10 * SIZE)
    key = b"k" * 16
    assert a.reserve(key, SIZE, never)
    a.settle(key, False)  # no rank stored it
    assert a._ledger is not None
    assert (a._ledger._added, a._ledger._removed) == (0, 0)
    a.close()


def test_a_count_taken_back_since_the_view_is_no_negative_growth() -> None:
    """A ledger's count goes down when its engine takes back what it counted before the
    view was read (a save whose records were there already): the view shows the directory
    as it is, so that is no growth, and it must not cancel another engine's real growth."""
    view = {"a": (100, 50)}
    assert growth_since(view, {"a": (60, 50), "b": (10, 0)}) == (10, 0)
    assert growth_since(view, {"a": (100, 20), "b": (0, 5)}) == (0, 5)


def test_cache_evict_tells_the_engines_what_it_freed(tmp_path) -> None:
    """`kvdist cache evict` removes 2 of the 4 blocks of a's view (capacity 4): a learns
    of the room at its next poll, from the eviction's ledger, and may save 2 blocks
    without evicting. Before, no ledger said so: until its next walk, a evicted a block
    of its own for each it saved, and the namespace held 2 of its 4."""
    from test_disk_trims import maintenance_namespace

    from kvdist.connectors.disk import maintenance

    ns = maintenance_namespace(tmp_path)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys:
        put(ns, key)
    a = engine(ns, 4 * SIZE)
    report = maintenance.evict_cache(str(tmp_path), to_bytes=2 * SIZE)
    assert report.removed == 2
    poll(a)
    a.apply_rescan(never)
    assert a.others_growth == -2 * SIZE
    for key in (b"n" * 16, b"m" * 16):
        save(a, ns, key)
    settle(a)
    assert a.evictions == 0 and len(on_disk(ns, [*keys, b"n" * 16, b"m" * 16])) == 4
    a.close()


def test_cache_evict_runs_count_in_one_ledger_per_host(tmp_path) -> None:
    """`kvdist cache evict` from cron: each run adds to one ledger per host, not a file
    per run (which every engine would read at every poll, for a day), and an engine
    learns of each run's room at its next poll."""
    from test_disk_trims import maintenance_namespace

    from kvdist.connectors.disk import maintenance

    ns = maintenance_namespace(tmp_path)
    keys = [bytes([i]) * 16 for i in range(4)]
    for key in keys:
        put(ns, key)
    a = engine(ns, 4 * SIZE)
    for left, freed_so_far in ((3, 1), (1, 3)):
        assert maintenance.evict_cache(str(tmp_path), to_bytes=left * SIZE).removed
        ledgers = read_ledgers(ns)
        assert len(ledgers) == 1 and list(ledgers.values()) == [(0, freed_so_far * SIZE)]
        poll(a)
        a.apply_rescan(never)
        assert a.others_growth == -freed_so_far * SIZE
    a.close()


def test_an_incomplete_block_saved_again_counts_only_what_it_adds(tmp_path) -> None:
    """A block one of two ranks stored (its other record missing) is saved again: the
    rank that had stored it finds its own record there, which the index held already and
    did not count as added; the block's other half is what the save adds, and stays in the
    ledger. (Taking back half of the reservation counted the save at half its bytes.)"""
    ns = str(tmp_path)
    key = b"k" * 16
    bdir = block_dir(ns, key)
    os.makedirs(bdir)
    with open(os.path.join(bdir, record_name(0, 1, 2)), "wb") as f:
        f.write(b"x" * SIZE)  # rank 0's half
    a = DiskIndex(ns, 2, 10 * SIZE)
    a.scan()
    assert a.reserve(key, 2 * SIZE, never)  # adds the missing half
    a.settle(key, True, found_there=0.5)  # rank 0's record was there: its own
    assert a._ledger is not None
    assert (a._ledger._added, a._ledger._removed) == (SIZE, 0)
    a.close()


@pytest.mark.parametrize("settled", ["before the walk is applied", "after"])
def test_own_saves_landing_during_a_walk_are_not_taken_for_the_others(
    tmp_path, monkeypatch, settled
) -> None:
    """Blocks a reserved before its walk began and wrote while it ran are a's own, not in
    the others' ledgers: counted as the others' writes during the walk, they cancelled
    as much of the others' real growth afterwards, and the namespace went over capacity
    (7 blocks of 6 here)."""
    from kvdist.connectors.disk import rescan

    ns = str(tmp_path)
    old = [bytes([i]) * 16 for i in range(2)]
    for key in old:
        put(ns, key)
    a, c = engine(ns, 6 * SIZE), engine(ns, None)
    mine = [b"m" * 15 + bytes([i]) for i in range(2)]
    for key in mine:
        assert a.reserve(key, SIZE, never)  # planned before the walk begins
    time.sleep(0.05)  # file times after the walk's start
    walk = rescan.iter_block_dirs

    def landing_during_the_walk(*args):
        time.sleep(0.05)
        for key in mine:
            put(ns, key)
        yield from walk(*args)

    monkeypatch.setattr(rescan, "iter_block_dirs", landing_during_the_walk)
    a.rescan_now()
    monkeypatch.setattr(rescan, "iter_block_dirs", walk)
    if settled == "after":
        a.apply_rescan(never)
    for key in mine:
        a.settle(key, True)
    a.apply_rescan(never)
    theirs = [b"t" * 15 + bytes([i]) for i in range(3)]
    for key in theirs:
        save(c, ns, key)
    poll(c, a)
    a.apply_rescan(never)
    settle(a)
    assert a.others_growth == 3 * SIZE
    assert len(on_disk(ns, old + mine + theirs)) == 6
    a.close()
    c.close()


def test_a_save_that_stored_nothing_takes_back_only_what_it_counted(tmp_path) -> None:
    """a saves a block whose other half (another engine's record) is deleted before a's
    ranks report, both failing: a takes back the half it counted, not the whole block
    (which took an earlier save's bytes off too; with none before, the count went
    negative, failed the record's check, and every engine ignored a's ledger)."""
    ns = str(tmp_path)
    key = b"k" * 16
    bdir = block_dir(ns, key)
    os.makedirs(bdir)
    half = os.path.join(bdir, record_name(0, 1, 2))
    with open(half, "wb") as f:
        f.write(b"x" * SIZE)  # another engine's half
    a = DiskIndex(ns, 2, 10 * SIZE)
    a.scan()
    mine = b"m" * 16
    assert a.reserve(mine, 2 * SIZE, never)  # an earlier save of a's, whole
    a.settle(mine, True)
    assert a.reserve(key, 2 * SIZE, never)  # counts the missing half
    os.unlink(half)  # evicted by that engine meanwhile
    a.settle(key, False)  # a's ranks stored nothing
    assert a._ledger is not None and a._ledger.flush()
    assert read_ledgers(ns) == {a._ledger.engine_id: (2 * SIZE, 0)}
    a.close()
