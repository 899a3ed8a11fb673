"""IO threads that serve reads before writes.

A load has a request waiting on it; a save only holds blocks until it lands. With one
first-in-first-out queue, the reads of a request that returns (a conversation's next
turn) wait behind every write queued before them, which after a busy stretch is seconds
of writes on a slow disk. Here each task has a priority, `READ` before `WRITE` before
`STAMP` (file times of chains already written: `store.stamp_chain`), and tasks of one
priority start in the order they were submitted (with several threads, a task may start
while an earlier one still runs).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from kvdist.connectors.placement import helper_thread

log = logging.getLogger(__name__)

READ = 0
WRITE = 1
STAMP = 2

# Pools not shut down by their owner still finish their writes when the interpreter exits
# (their threads are daemons, so the exit does not wait on an idle pool forever).
_LIVE: weakref.WeakSet[IOPool] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for pool in list(_LIVE):
        pool.shutdown()


class IOPool:
    def __init__(
        self,
        threads: int,
        name: str,
        *,
        reads_first: bool = True,
        cpus: Iterable[int] | None = None,
    ) -> None:
        """`reads_first=False` runs every task in submission order (the benchmark's
        baseline). `cpus`: where the threads run (`kvdist.connectors.placement`); None:
        where the creating thread may."""
        if threads < 1:
            raise ValueError(f"IOPool needs at least one thread, got {threads}")
        self._queue: list[tuple[int, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closing = False
        self._reads_first = reads_first
        self._threads = [helper_thread(self._run, f"{name}-{i}", cpus) for i in range(threads)]
        for t in self._threads:
            t.start()
        _LIVE.add(self)

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on an IO thread; an exception it raises is logged, not lost."""
        with self._cv:
            if self._closing:
                raise RuntimeError("IOPool: submit after shutdown")
            rank = priority if self._reads_first else 0
            heapq.heappush(self._queue, (rank, next(self._order), fn, args))
            self._cv.notify()

    def drop_queued(self) -> int:
        """Forget the tasks not started yet (those running finish); how many."""
        with self._cv:
            n = len(self._queue)
            self._queue.clear()
            return n

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def shutdown(self) -> None:
        """Run every task already submitted, then stop the threads."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                _, _, fn, args = heapq.heappop(self._queue)
            try:
                fn(*args)
            except Exception:
                log.exception("IO task %s failed", getattr(fn, "__name__", fn))
