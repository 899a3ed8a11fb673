"""The disk connector's IO threads: reads ahead of queued writes, nothing lost at shutdown."""

from __future__ import annotations

import json
import logging
import threading

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
    in both queue orders) complete and verify, and the engine thread's slowdown is
    measured during a save and a load; the numbers are not checked."""
    from kvdist.bench.cli import run_benchmark

    out = tmp_path / "disk.json"
    assert run_benchmark("disk", ["--quick", "--dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["load_behind_saves_s"]) == {"fifo", "reads_first"}
    assert all(s > 0 for s in result["load_behind_saves_s"].values())
    slowdown = result["engine_thread_slowdown"]
    assert set(slowdown) == {"during_save", "during_load"}
    for part in slowdown.values():
        assert part["busy_slices"] >= 1 and part["idle_op_us"] > 0 and part["ratio"] > 0
