"""`Rescanner`: what successive re-reads of a namespace directory report as changed. Block
files here are stand-ins (a record's name and size are all a read looks at)."""

from __future__ import annotations

import os
import threading
import time

from kvdist.connectors.disk.rescan import Rescanner, read_blocks
from kvdist.connectors.disk.store import block_dir, record_name, remove_block

HEADS = 8


def put(ns: str, key: bytes, heads: tuple[int, int] = (0, HEADS), size: int = 100) -> None:
    bdir = block_dir(ns, key)
    os.makedirs(bdir, exist_ok=True)
    with open(os.path.join(bdir, record_name(*heads, HEADS)), "wb") as f:
        f.write(b"x" * size)


def test_reads_report_what_changed_since_the_last_take(tmp_path) -> None:
    """New, grown and completed blocks are changed; removed ones vanished; several reads
    before a take merge (a block that came and went is only vanished); a take empties."""
    ns = str(tmp_path)
    x, y, z, w = b"x" * 16, b"y" * 16, b"z" * 16, b"w" * 16
    put(ns, x)
    put(ns, z, heads=(0, 4))  # half a block: present, incomplete
    scanner = Rescanner(ns, HEADS, read_blocks(ns, HEADS) or {})
    scanner.read_now()
    changes = scanner.take()
    assert changes is not None and not changes.changed and not changes.vanished
    put(ns, y)
    put(ns, w)
    scanner.read_now()
    remove_block(block_dir(ns, x))
    remove_block(block_dir(ns, w))  # came and went between two takes
    put(ns, z, heads=(4, 8))  # z completes
    scanner.read_now()
    changes = scanner.take()
    assert changes is not None
    assert set(changes.changed) == {y, z} and changes.vanished == {x, w}
    assert changes.changed[z][1:] == (200, True) and changes.changed[y][1:] == (100, True)
    assert scanner.take() is None
    put(ns, y, size=150)  # rewritten larger
    scanner.read_now()
    changes = scanner.take()
    assert changes is not None and set(changes.changed) == {y} and not changes.vanished


def test_report_again_repeats_an_unchanged_block_once(tmp_path) -> None:
    """A block the index skipped is reported on the next read if it is still there."""
    ns = str(tmp_path)
    key = b"k" * 16
    put(ns, key)
    scanner = Rescanner(ns, HEADS, read_blocks(ns, HEADS) or {})
    scanner.report_again({key})
    scanner.read_now()
    changes = scanner.take()
    assert changes is not None and set(changes.changed) == {key}
    scanner.read_now()
    changes = scanner.take()
    assert changes is not None and not changes.changed  # once only


def test_background_thread_reads_until_closed(tmp_path) -> None:
    ns = str(tmp_path)
    scanner = Rescanner(ns, HEADS, {})
    scanner.start(0.01)
    thread = scanner._thread
    put(ns, b"b" * 16)
    seen = set()
    for _ in range(500):
        changes = scanner.take()
        if changes is not None:
            seen |= set(changes.changed)
        if seen:
            break
        threading.Event().wait(0.01)
    scanner.close()
    assert seen == {b"b" * 16}
    # Its own thread: another test's leaked scanner must not fail this one.
    assert thread is not None and not thread.is_alive()


def test_read_soon_reads_before_the_interval_is_up(tmp_path) -> None:
    """`read_soon` (after a deferred trim) has the background thread read at once, not at
    the end of its interval (an hour here); `close` ends the thread whatever it waits on."""
    ns = str(tmp_path)
    scanner = Rescanner(ns, HEADS, {})
    scanner.start(3600.0)
    put(ns, b"k" * 16)
    scanner.read_soon()
    deadline = time.monotonic() + 10
    changes = None
    while changes is None and time.monotonic() < deadline:
        time.sleep(0.01)
        changes = scanner.take()
    assert changes is not None and set(changes.changed) == {b"k" * 16}
    t0 = time.monotonic()
    scanner.close()
    assert time.monotonic() - t0 < 5
