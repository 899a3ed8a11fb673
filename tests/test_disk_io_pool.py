"""The disk connector's IO threads: reads ahead of queued writes, nothing lost at shutdown."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from kvdist.connectors.disk.io_pool import READ, WRITE, IOPool


@pytest.mark.parametrize("reads_first", [True, False])
def test_reads_run_before_queued_writes_in_submission_order(reads_first) -> None:
    pool = IOPool(1, "test-io", reads_first=reads_first)
    started, gate, ran = threading.Event(), threading.Event(), []

    def hold() -> None:  # holds the only thread while the rest is queued
        started.set()
        gate.wait(10)

    pool.submit(WRITE, hold)
    assert started.wait(10)
    for name in ("w1", "w2"):
        pool.submit(WRITE, ran.append, name)
    for name in ("r1", "r2"):
        pool.submit(READ, ran.append, name)
    pool.submit(WRITE, ran.append, "w3")
    assert pool.pending() == 5
    gate.set()
    pool.shutdown()
    if reads_first:
        assert ran == ["r1", "r2", "w1", "w2", "w3"]
    else:
        assert ran == ["w1", "w2", "r1", "r2", "w3"]


def test_shutdown_finishes_submitted_work_then_refuses_more() -> None:
    pool = IOPool(3, "test-io")
    done = []
    lock = threading.Lock()

    def work(i: int) -> None:
        with lock:
            done.append(i)

    for i in range(200):
        pool.submit(WRITE if i % 2 else READ, work, i)
    pool.shutdown()
    assert sorted(done) == list(range(200))
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(READ, work, 0)


def test_a_failing_task_is_logged_and_the_pool_goes_on(caplog) -> None:
    pool = IOPool(1, "test-io")
    ran = []

    def boom() -> None:
        raise OSError("disk gone")

    with caplog.at_level(logging.ERROR, logger="kvdist.connectors.disk.io_pool"):
        pool.submit(READ, boom)
        pool.submit(READ, ran.append, 1)
        pool.shutdown()
    assert ran == [1]
    assert "boom" in caplog.text and "disk gone" in caplog.text


def test_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        IOPool(0, "test-io")


def test_disk_benchmark_runs_both_queue_orders(tmp_path) -> None:
    """`kvdist bench disk --quick`: the loads it times (alone and behind a save backlog,
    in both queue orders) complete and verify; the numbers are not checked."""
    from kvdist.bench.cli import run_benchmark

    out = tmp_path / "disk.json"
    assert run_benchmark("disk", ["--quick", "--dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["load_behind_saves_s"]) == {"fifo", "reads_first"}
    assert all(s > 0 for s in result["load_behind_saves_s"].values())


def test_writes_are_capped_and_reads_still_get_the_other_threads() -> None:
    """With 4 threads and at most 2 writing: 6 blocked writes never run more than 2 at a
    time, a read submitted behind them runs at once, and shutdown drains everything."""
    pool = IOPool(4, "test-io", max_writes=2)
    gate, lock = threading.Event(), threading.Lock()
    running, peak, done = [0], [0], []

    def write(i: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(10)
        with lock:
            running[0] -= 1
            done.append(i)

    for i in range(6):
        pool.submit(WRITE, write, i)
    deadline = time.monotonic() + 10
    while running[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time for a third writer to start, were the cap not kept
    assert peak[0] == 2
    read_ran = threading.Event()
    pool.submit(READ, read_ran.set)
    assert read_ran.wait(10)  # not stuck behind the capped writes
    gate.set()
    pool.shutdown()
    assert sorted(done) == list(range(6)) and peak[0] == 2


def test_write_cap_is_checked() -> None:
    with pytest.raises(ValueError, match="max_writes"):
        IOPool(2, "test-io", max_writes=0)
    from kvdist.connectors.disk.settings import DiskSettings

    with pytest.raises(ValueError, match="write_threads"):
        DiskSettings(path="/tmp/x", write_threads=0)
