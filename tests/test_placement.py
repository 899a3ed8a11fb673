"""Helpers run off the CPUs their rank is bound to: the CPU lists, the `io_cpus` setting,
and where the disk connector's IO threads, writer process and index threads end up."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

from kvdist.connectors.disk.io_pool import IOPool
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.connectors.placement import (
    check_helper_cpus,
    format_cpu_list,
    helper_cpus,
    online_cpus,
    parse_cpu_list,
    resolve_helper_cpus,
)
from kvdist.connectors.testing import SimulatedRanks

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to move helpers between"
)


def test_cpu_lists():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert format_cpu_list({3, 1, 2, 8, 10, 11}) == "1-3,8,10-11"
    assert format_cpu_list({5}) == "5" and format_cpu_list(()) == ""
    assert parse_cpu_list(format_cpu_list(range(5))) == set(range(5))
    for bad in ("x", "3-1", "-1", "1-x", "1-", "0-1000000000", "70000"):
        with pytest.raises(ValueError, match="bad CPU range"):
            parse_cpu_list(bad)
    assert os.sched_getaffinity(0) <= online_cpus()


def test_helper_cpus_are_the_cpus_the_rank_is_not_bound_to():
    online = online_cpus()
    assert helper_cpus(online) is None  # free to run anywhere: nothing to move away from
    first = min(online)
    assert helper_cpus({first}) == (online - {first} or None)
    assert resolve_helper_cpus("inherit") is None
    assert resolve_helper_cpus("0,2") == {0, 2} & online  # CPUs that do not exist are dropped


def test_io_cpus_setting_is_checked(tmp_path):
    for good in ("auto", "inherit", "0-1"):
        check_helper_cpus("disk connector", good)
    for bad in ("", "any", "3-1", 4, None):
        with pytest.raises(ValueError, match="disk connector: io_cpus must be"):
            check_helper_cpus("disk connector", bad)
    with pytest.raises(ValueError, match="io_cpus"):
        DiskSettings(path=str(tmp_path), io_cpus="some")


@contextlib.contextmanager
def bound_to(cpus: set[int]):
    """This thread bound to `cpus`, as a launcher binds a rank; restored after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def helper_threads(
    prefix: str, since: set[int] | frozenset[int] = frozenset()
) -> dict[str, set[int]]:
    """This process's threads named `prefix`... (but those in `since`, by ident), and the
    CPUs each may run on."""
    return {
        t.name: set(os.sched_getaffinity(t.native_id))
        for t in threading.enumerate()
        if t.name.startswith(prefix) and t.native_id is not None and t.ident not in since
    }


def process_threads(pid: int) -> list[set[int]]:
    """The CPUs each thread of process `pid` may run on."""
    return [set(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")]


@needs_two_cpus
def test_io_pool_threads_run_where_they_are_told():
    mine = sorted(os.sched_getaffinity(0))
    before = {t.ident for t in threading.enumerate()}
    pool = IOPool(2, "test-place", cpus={mine[-1]})
    try:
        pool.submit(0, lambda: None)
        time.sleep(0.05)
        threads = helper_threads("test-place", before)
        assert len(threads) == 2 and all(v == {mine[-1]} for v in threads.values())
        assert os.sched_getaffinity(0) == set(mine)  # the creating thread stays put
    finally:
        pool.shutdown()


@needs_two_cpus
@pytest.mark.parametrize("io_cpus", ["auto", "inherit"])
def test_disk_helpers_leave_the_bound_cpu(tmp_path, full, io_cpus):
    """A rank bound to one CPU (Open MPI binds each of up to two ranks so): with io_cpus
    'auto' the disk worker's IO threads, its writer process and that process's threads,
    and the index's rescan thread run on the other CPUs; with 'inherit' they stay on the
    rank's. A failure means a connector's helpers take turns with the engine's thread."""
    mine = sorted(os.sched_getaffinity(0))
    rank_cpu = {mine[0]}
    cfg = {"name": "disk", "kwargs": {"path": str(tmp_path), "io_cpus": io_cpus, "rescan_s": 30}}
    before = {t.ident for t in threading.enumerate()}  # other tests' threads are not ours
    with bound_to(rank_cpu):
        ranks = SimulatedRanks(cfg, 1, full, fill=True)
    try:
        # The kernel keeps a thread within the CPUs this process may use at all.
        want = (online_cpus() - rank_cpu) & set(mine) if io_cpus == "auto" else rank_cpu
        writer = ranks.workers[0].shard.process
        assert writer is not None and writer.alive
        helpers = helper_threads("kvdist-disk", before)
        # 8 IO threads, the writer's sender and receiver, the index's rescans
        assert len(helpers) == 11 and all(v == want for v in helpers.values()), helpers
        deadline = time.monotonic() + 10  # the child starts its 8 IO threads
        while len(process_threads(writer.pid)) < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        child = process_threads(writer.pid)
        assert len(child) == 9 and all(v == want for v in child), child
    finally:
        ranks.shutdown()


def test_an_io_cpus_list_of_no_online_cpu_is_an_error(tmp_path):
    """A CPU list naming none of this machine's CPUs is a ValueError naming the setting;
    one naming some keeps only those."""
    from kvdist.connectors import create_connector
    from kvdist.connectors.placement import online_cpus, resolve_helper_cpus
    from kvdist.connectors.testing import tp_context

    far = max(online_cpus()) + 1000
    with pytest.raises(ValueError, match=r"disk connector: io_cpus .* names no online CPU"):
        create_connector(
            {"name": "disk", "kwargs": {"path": str(tmp_path), "io_cpus": f"{far}-{far + 1}"}},
            tp_context(0, 1),
        )
    assert resolve_helper_cpus(f"0,{far}") == frozenset({0})
