"""The disk connector's IO process: records are written and read outside the engine's process.

Why a process. A thread that writes a record lets go of the GIL for each system call and
checksum and takes it back after; every time, the engine's thread, which also lets go of
it around each torch call, may have to wait for it. On a 2x H200 host, 8 such threads
saving made the engine's thread run 3-12x slower while they saved (`kvdist bench disk`,
`engine_thread_slowdown`). A child process has its own interpreter and GIL, so its
threads cost the engine's thread nothing but memory bandwidth.

How. The staging buffers the device copies blocks into are shared memory (`memfd`, no
name in any filesystem, gone when the last process closes it; see
`kvdist.kv.pinned.HostBufferPool(shared=True)`), passed to the child once each over a
Unix socket. Per step, the parent sends one message naming the buffer, the rows and their
block hashes, after the device copy completed (a sender thread waits for it); the child
writes one record per block with its own IO threads and answers per task of a few MB.
Loads go the same way the other way round: the parent names the rows of a staging buffer
and the records to read into them; the child reads and verifies them (reads before
queued writes) and answers per task; the parent copies the good rows to the device.

Parent and child speak msgpack over a `SOCK_SEQPACKET` socket pair (one message per
packet, file descriptors attached to the packet that maps them):

    parent -> child  ["map", buf_id, size] + fd | ["unmap", buf_id] | ["bye"] (then EOF:
                     finish what was asked; EOF alone, the parent died: drop what is queued)
                     ["write", task_id, buf_id, row_bytes, rows, keys, header, ns_dir, name, fsync,
                      label]   (label: the namespace string, for `make_block_dir`)
                     ["read", task_id, buf_id, row_bytes, rows, paths, keys, header,
                      read_only]   (read_only: an unusable record is kept, no file time set)
                     ["stamp", paths]   (no answer: `store.stamp_chain`; queued after
                                          writes, not ordered with them: the owner sends
                                          it once its writes of the chain are over)
                     (header: the record header's fields but key and the checksums)
    child -> parent  ["done", task_id, per row: bytes written or read (0: failed; for a
                      read, -1: no such record; for a write, negated: the record was
                      there already, `record.Written`), first error, seconds]

The child and the parent's sender and receiver threads run off the CPUs the rank is bound
to (`kvdist.connectors.placement`): a child sharing the rank's one core would take its
turns from the engine's thread. The child exits when the socket closes: once it finished
what it was given, when the parent said goodbye first (its shutdown); once the tasks
already running are over, when the parent died (nobody waits for the rest, and their
directory may be gone). If the child dies, the parent reports the tasks in flight as not
run (the saves complete without those blocks, as for any failed write; the owner reads
the loads' blocks again itself) and its owner falls back to threads of its own (`alive`).

This module imports no torch: the child starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from queue import SimpleQueue
from typing import Any, Protocol

import msgpack

from kvdist.connectors.disk.io_pool import READ, STAMP, WRITE, IOPool
from kvdist.connectors.disk.record import (
    CorruptRecord,
    RecordError,
    RecordHeader,
    RecordIOError,
    UnreadableRecord,
    Written,
    fsync_dir,
    read_record,
    write_record,
)
from kvdist.connectors.disk.store import (
    block_dir,
    discard_record,
    disk_full,
    record_io_failed,
    record_used,
    stamp_chain,
    write_namespace_label,
)
from kvdist.connectors.placement import (
    format_cpu_list,
    helper_thread,
    move_this_thread,
    parse_cpu_list,
)

log = logging.getLogger(__name__)

_MAX_PACKET = 1 << 20  # far above a task's message (a few blocks); the socket buffers fit it
# What a write message carries of the record header: all but the block's own fields.
_HEADER_FIELDS = tuple(
    f.name for f in fields(RecordHeader) if f.name not in ("key", "payload_bytes", "crc32")
)

Done = Callable[["list[int] | None", "str | None", float], None]
"""Called on the parent's receiver thread with the outcome per row (bytes written or read;
0: that row failed; -1: a read found no such record; a write's bytes negated: its record
was there already, another writer's, `write_blocks`), the first error message (None if
every row went through) and the seconds the child spent on the task. The list is None
when the child never ran the task (it is gone): the error says why."""
MISSING = -1
"""A read's outcome for a row whose record does not exist."""


class SharedBufferLike(Protocol):
    """What `write` needs of a shared buffer (`kvdist.kv.pinned.SharedBuffer`)."""

    buf_id: int
    fd: int
    size: int


def make_block_dir(path: str, fsync: bool = False, label: str | None = None) -> None:
    """`os.makedirs(path, exist_ok=True)` in one system call when the parent exists. With
    `fsync`, the entries of the directories it created are made durable too (a record's
    own fsync covers the file and its directory, not that directory's name). `label`: the
    namespace string, written as the namespace's `NAMESPACE` when a fan-out directory is
    made and the file is missing."""
    try:
        os.mkdir(path)
        created = [path]
    except FileExistsError:
        return
    except FileNotFoundError:
        fan = os.path.dirname(path)
        ns_dir = os.path.dirname(fan)
        created = [d for d in (ns_dir, fan) if not os.path.isdir(d)]
        os.makedirs(path, exist_ok=True)
        created.append(path)
        if label is not None and fan in created:
            # The namespace's first blocks there, or its directory was removed under the
            # engine (rm -rf), its label with it: without one, `kvdist cache ls` cannot
            # say which model the namespace holds. A stat, a few hundred times a cache.
            with contextlib.suppress(OSError):  # for people: no reason to fail the save
                write_namespace_label(ns_dir, label)
    if fsync:
        for d in created:
            fsync_dir(os.path.dirname(d))


def write_block(
    bdir: str, name: str, header: RecordHeader, payload: Any, fsync: bool, label: str | None = None
) -> Written:
    """Write one block's record into `bdir` (created if missing, `make_block_dir`). Retries
    once when the directory vanishes between its creation and the write (another engine
    evicting the block)."""
    for attempt in range(2):
        try:
            make_block_dir(bdir, fsync, label)
            return write_record(bdir, name, header, payload, fsync=fsync)
        except FileNotFoundError:
            if attempt:
                _drop_if_empty(bdir)
                raise
        except BaseException:
            _drop_if_empty(bdir)  # a failed first record (ENOSPC): no empty block left
            raise
    raise AssertionError("unreachable")


def _drop_if_empty(bdir: str) -> None:
    with contextlib.suppress(OSError):  # fails when another record is there
        os.rmdir(bdir)


def write_blocks(
    ns_dir: str,
    name: str,
    header: RecordHeader,
    keys: list[bytes],
    payloads: list[Any],
    fsync: bool,
    label: str | None = None,
) -> tuple[list[int], str | None]:
    """Write the record of each block `keys[i]` from `payloads[i]` (`header` with that key);
    returns the bytes written per block (0: failed; negated: its record was there already,
    so the directory gained none of them) and the first error, if any. `label`: the
    namespace string (`make_block_dir`). Both the writer process and the engine's own IO
    threads write through here."""
    written: list[int] = []
    error: str | None = None
    full = False
    for key, payload in zip(keys, payloads):
        try:
            bdir = block_dir(ns_dir, key)
            record = replace(header, key=key)
            nbytes, created = write_block(bdir, name, record, payload, fsync, label)
            written.append(nbytes if created else -nbytes)
        except Exception as exc:
            written.append(0)
            error = error or f"{type(exc).__name__}: {exc}"
            full = full or disk_full(exc)
    # Any write that found no room marks the task's error (whichever failed first).
    return written, f"{DISK_FULL}{error}" if full else error


DISK_FULL = "disk full (a write found no room); first error: "
"""How the error of a write that found no room begins (`write_blocks`)."""


# -- parent side --------------------------------------------------------------------------

# Writers not shut down by their owner still finish the writes they were given when the
# interpreter exits (the sender thread is a daemon: without this, queued writes are lost).
_LIVE: weakref.WeakSet[WriterProcess] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for writer in list(_LIVE):
        writer.shutdown()


@dataclass
class _Pending:
    rows: int
    done: Done


class WriterProcess:
    """The parent's handle on one writer process (one per rank's disk worker)."""

    def __init__(self, threads: int, name: str, cpus: Iterable[int] | None = None) -> None:
        """`cpus`: where the child and this side's threads run
        (`kvdist.connectors.placement.helper_cpus`); None: where this thread may."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_PACKET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _MAX_PACKET)
        # The child imports this module from where this process found it: its path starts
        # with that tree. (`python -m` would put the working directory first, where a
        # directory named kvdist, another checkout, would shadow it.)
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3))
        boot = (
            f"import sys; sys.path = [{root!r}] + [p for p in sys.path if p]; "
            f"from {__name__} import main; sys.exit(main())"
        )
        cmd = [
            sys.executable, "-c", boot,
            "--fd", str(child.fileno()), "--threads", str(threads), "--name", name,
        ]  # fmt: skip
        if cpus:
            cmd += ["--cpus", format_cpu_list(cpus)]
        try:
            # A session of its own: a Ctrl-C, sent to the terminal's process group, does not
            # reach it (it would, while it still imports, end it with a traceback). The
            # parent decides; this process ends when the parent closes the socket.
            self._proc = subprocess.Popen(
                cmd,
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            child.close()
        self._sock = parent
        self._lock = threading.Lock()  # guards _pending, _mapped and _alive
        self._pending: dict[int, _Pending] = {}
        self._mapped: set[int] = set()
        self._alive = True
        self._ids = itertools.count()
        self._outbox: SimpleQueue[tuple[Callable[[], None], list[Any], int] | None] = SimpleQueue()
        self._receiver = helper_thread(self._receive, f"{name}-recv", cpus)
        self._sender = helper_thread(self._send_loop, f"{name}-send", cpus)
        self._receiver.start()
        self._sender.start()
        self._closed = False
        _LIVE.add(self)

    @property
    def alive(self) -> bool:
        with self._lock:
            return self._alive

    @property
    def pid(self) -> int:
        return self._proc.pid

    def write(
        self,
        buf: SharedBufferLike,
        row_bytes: int,
        rows: list[int],
        keys: list[bytes],
        header: RecordHeader,
        ns_dir: str,
        name: str,
        *,
        fsync: bool,
        wait: Callable[[], None],
        done: Done,
        label: str | None = None,
    ) -> None:
        """Write rows `rows` (`row_bytes` each) of shared buffer `buf` as the records of
        blocks `keys` under `ns_dir`, once `wait()` returned (it blocks until the device
        copy into `buf` completed). `done` is called once, with the outcome. `label`: the
        namespace string (`make_block_dir`)."""
        task, msgs = self._task(buf, len(rows), done)
        if msgs is None:
            done(None, "the writer process is not running", 0.0)
            return
        fields = _header_fields(header)
        msgs.append(
            ["write", task, buf.buf_id, row_bytes, rows, keys, fields, ns_dir, name, fsync, label]
        )
        self._outbox.put((wait, msgs, task))

    def read(
        self,
        buf: SharedBufferLike,
        row_bytes: int,
        rows: list[int],
        paths: list[str],
        keys: list[bytes],
        header: RecordHeader,
        *,
        read_only: bool = False,
        done: Done,
    ) -> None:
        """Read the record at `paths[i]` (block `keys[i]`'s, checked against `header` with
        that key) into row `rows[i]` (`row_bytes` each) of shared buffer `buf`, in order,
        up to the first unusable one. `done` is called once, with the outcome.
        `read_only`: an unusable record is kept, and no file time is set."""
        task, msgs = self._task(buf, len(rows), done)
        if msgs is None:
            done(None, "the writer process is not running", 0.0)
            return
        msgs.append(
            [
                "read", task, buf.buf_id, row_bytes, rows, paths, keys, _header_fields(header),
                read_only,
            ]
        )  # fmt: skip
        self._outbox.put((_no_wait, msgs, task))

    def stamp(self, paths: list[str]) -> bool:
        """Stamp the file times of a chain's records (`store.stamp_chain`), at the lowest
        priority; nothing is answered, and nothing orders it with writes in progress (the
        caller sends it once those of the chain are over). Returns False, sending nothing,
        when the process is not running or shutting down (the caller stamps them itself)."""
        with self._lock:
            if not self._alive or self._closed:
                return False
            self._outbox.put((_no_wait, [["stamp", paths]], -1))
        return True

    def _task(self, buf: SharedBufferLike, rows: int, done: Done) -> tuple[int, list[Any] | None]:
        """A new task id, and the messages to send before its own (None: not running)."""
        task = next(self._ids)
        with self._lock:
            if not self._alive:
                return task, None
            self._pending[task] = _Pending(rows, done)
            return task, self._map_locked(buf)

    def _map_locked(self, buf: SharedBufferLike) -> list[Any]:
        """The map message `buf` needs before its first task (none once sent). Holds
        `_lock`."""
        if buf.buf_id in self._mapped:
            return []
        self._mapped.add(buf.buf_id)
        return [("map", buf)]

    def share(self, buf: SharedBufferLike) -> None:
        """Map `buf` in the child now, ahead of its first task (the child's mapping faults
        every page in, which would otherwise delay that task)."""
        with self._lock:
            msgs = self._map_locked(buf) if self._alive else []
        if msgs:
            self._outbox.put((_no_wait, msgs, -1))

    def forget(self, buf_id: int) -> None:
        """The parent freed buffer `buf_id`: the child unmaps it (once it has no task on it:
        the parent frees a buffer only after the writes from it are done)."""
        with self._lock:
            if buf_id not in self._mapped:
                return
            self._mapped.discard(buf_id)
        self._outbox.put((lambda: None, [["unmap", buf_id]], -1))

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Finish every write already asked for, then stop the child (idempotent)."""
        with self._lock:  # a stamp() racing this one is sent before the end, or refused
            if self._closed:
                return
            self._closed = True
            self._outbox.put((_no_wait, [["bye"]], -1))  # what was asked is still wanted
            self._outbox.put(None)
        _LIVE.discard(self)
        self._sender.join(timeout_s)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)  # the child drains, then exits on EOF
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("disk writer process %d did not exit in %.0f s; killing it",
                      self._proc.pid, timeout_s)  # fmt: skip
            self._proc.kill()
            self._proc.wait()
        self._receiver.join(timeout_s)
        self._sock.close()

    # threads --------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            wait, msgs, task = item
            try:
                # A buffer's map goes first, whatever becomes of this task: later tasks on
                # the buffer, already queued, do not carry it again.
                for m in msgs:
                    if m[0] == "map":
                        self._send_map(m[1])
                wait()
                for m in msgs:
                    if m[0] != "map":
                        self._sock.send(msgpack.packb(m, use_bin_type=True))
            except Exception as exc:  # the copy failed, or the child is gone
                self._fail(task, f"{type(exc).__name__}: {exc}")

    def _send_map(self, buf: SharedBufferLike) -> None:
        packet = msgpack.packb(["map", buf.buf_id, buf.size])
        try:
            socket.send_fds(self._sock, [packet], [buf.fd])
        except Exception:
            # The child does not have it: the next task on the buffer carries the map again
            # (tasks already queued without it are answered as not run, and run here).
            with self._lock:
                self._mapped.discard(buf.buf_id)
            raise

    def _receive(self) -> None:
        try:
            while True:
                packet = self._sock.recv(_MAX_PACKET)
                if not packet:
                    break
                kind, task, written, error, seconds = msgpack.unpackb(packet, raw=False)
                with self._lock:
                    pending = self._pending.pop(task, None)
                if kind == "done" and pending is not None:
                    try:
                        pending.done(written, error, seconds)
                    except Exception:  # the caller's, not the child's: keep receiving
                        log.exception("disk IO process: a task's completion callback failed")
        except OSError:
            pass
        except Exception:
            log.exception("disk writer process: malformed answer")
        with self._lock:
            self._alive = False
            lost, self._pending = self._pending, {}
            closed = self._closed
        if lost or not closed:
            # The socket closed first: give the process a moment to be reaped, so the
            # messages below say how it ended.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1.0)
        if lost:
            log.error(
                "disk writer process %d ended with %d writes in flight (exit code %s); "
                "their blocks are not saved, and this rank writes its records itself from now on",
                self._proc.pid, len(lost), self._proc.poll(),
            )  # fmt: skip
        elif not closed:  # nothing lost, but the rank's IO moves to its slower threads
            log.warning(
                "disk writer process %d ended (exit code %s) with no write in flight; this "
                "rank reads and writes its records itself from now on",
                self._proc.pid, self._proc.poll(),
            )  # fmt: skip
        for p in lost.values():
            p.done(None, "the writer process ended", 0.0)

    def _fail(self, task: int, error: str) -> None:
        with self._lock:
            pending = self._pending.pop(task, None)
        if pending is not None:
            pending.done(None, error, 0.0)


def _no_wait() -> None:
    pass


def _release(views: list[Any]) -> None:
    """Release memoryviews of a staging buffer (others are left to the collector)."""
    for v in views:
        if isinstance(v, memoryview):
            with contextlib.suppress(BufferError):
                v.release()


def _header_fields(header: RecordHeader) -> dict[str, Any]:
    """What a message carries of a record header (the child adds each block's key)."""
    return {k: getattr(header, k) for k in _HEADER_FIELDS}


# -- child side ---------------------------------------------------------------------------

_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # Linux


class _UnknownBuffer(Exception):
    """A task names a staging buffer whose map never arrived."""


class _Child:
    def __init__(self, sock: socket.socket, threads: int, name: str) -> None:
        self.sock = sock
        self.maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self._closing: list[tuple[mmap.mmap, memoryview]] = []
        self.send_lock = threading.Lock()
        self.io = IOPool(threads, name)

    def serve(self) -> None:
        said_bye = False
        while True:
            try:
                packet, fds, _, _ = socket.recv_fds(self.sock, _MAX_PACKET, 1)
            except OSError:
                break
            if not packet:
                break  # the parent closed its end
            msg = msgpack.unpackb(packet, raw=False)
            if msg[0] == "bye":
                said_bye = True  # an orderly end: finish what was asked, then exit
            elif msg[0] == "write":
                self._write(*msg[1:])
            elif msg[0] == "read":
                _, task, buf_id, row_bytes, rows, *rest = msg
                self.io.submit(
                    READ, self._answered, self._read, task, rows, buf_id, row_bytes, rows, *rest
                )
            elif msg[0] == "stamp":
                self.io.submit(STAMP, stamp_chain, msg[1])
            elif msg[0] == "map":
                _, buf_id, size = msg
                fd = fds[0]
                # Fault every page in now, in one call: touched first by the IO threads,
                # 512 MB of pages cost ~0.25 s of page faults on the 2-core VM, not 0.04 s.
                mm = mmap.mmap(fd, size, flags=_POPULATE)
                os.close(fd)
                self.maps[buf_id] = (mm, memoryview(mm))
            elif msg[0] == "unmap":
                self._closing.append(self.maps.pop(msg[1]))
            self._close_unmapped()
        if not said_bye:
            # The parent died (killed, or the job aborted): nobody waits for the queued
            # writes, and the directory may be gone (a demo's, removed by another rank).
            dropped = self.io.drop_queued()
            if dropped:
                logging.getLogger(__name__).warning(
                    "the engine process ended without closing its IO process: %d queued IO "
                    "tasks dropped",
                    dropped,
                )
        self.io.shutdown()
        self._close_unmapped()

    def _close_unmapped(self) -> None:
        """Close the maps the parent let go of. One still exported (an IO thread holding a
        slice of it an instant longer) is closed at a later message rather than failing."""
        still = []
        for mm, view in self._closing:
            try:
                view.release()
                mm.close()
            except BufferError:
                still.append((mm, view))
        self._closing = still

    def _write(
        self, task, buf_id, row_bytes, rows, keys, fields, ns_dir, name, fsync, label
    ) -> None:
        self.io.submit(
            WRITE, self._answered, self._run, task, rows,
            buf_id, row_bytes, rows, keys, fields, ns_dir, name, fsync, label,
        )  # fmt: skip

    def _answered(self, fn, task: int, rows: list[int], *args: Any) -> None:
        """Run a task; one that raises is still answered (every row failed), so the parent
        never waits on it. A task on a buffer never mapped here is answered as not run
        (None), so the parent runs it itself."""
        t0 = time.perf_counter()
        try:
            fn(task, *args)
        except _UnknownBuffer as exc:
            logging.getLogger(__name__).warning("IO task %d not run: %s", task, exc)
            self._answer(task, None, str(exc), time.perf_counter() - t0)
        except Exception as exc:
            logging.getLogger(__name__).exception("IO task %d failed", task)
            self._answer(task, [0] * len(rows), f"{type(exc).__name__}: {exc}",
                         time.perf_counter() - t0)  # fmt: skip

    def _view(self, buf_id: int) -> memoryview:
        mapped = self.maps.get(buf_id)
        if mapped is None:
            raise _UnknownBuffer(f"staging buffer {buf_id} was never mapped in the IO process")
        return mapped[1]

    def _run(self, task, buf_id, row_bytes, rows, keys, fields, ns_dir, name, fsync, label) -> None:
        t0 = time.perf_counter()
        view = self._view(buf_id)
        payloads = [view[r * row_bytes : (r + 1) * row_bytes] for r in rows]
        header = RecordHeader(key=b"", **fields)
        try:
            written, error = write_blocks(ns_dir, name, header, keys, payloads, fsync, label)
        finally:
            _release(payloads)  # before the answer: the parent may unmap the buffer then
        self._answer(task, written, error, time.perf_counter() - t0)

    def _read(self, task, buf_id, row_bytes, rows, paths, keys, fields, read_only) -> None:
        t0 = time.perf_counter()
        view = self._view(buf_id)
        header = RecordHeader(key=b"", **fields)
        got = [0] * len(rows)
        error = None
        for i, (r, path, key) in enumerate(zip(rows, paths, keys)):
            row = view[r * row_bytes : (r + 1) * row_bytes]
            try:
                _, payload = read_record(path, replace(header, key=key), into=row)
            except RecordError as exc:
                if isinstance(exc, (CorruptRecord, UnreadableRecord)):
                    discard_record(path, exc, keep=read_only)  # the block misses from now on
                elif isinstance(exc, RecordIOError):
                    record_io_failed(path, exc)
                elif not os.path.exists(path):
                    got[i] = MISSING  # the owner looks for other records of the block
                    continue
                error = f"block {key.hex()}: {exc}"
                break  # the blocks after an unusable one are not needed
            finally:
                _release([row])
            got[i] = payload.nbytes
            _release([payload])  # before the answer: the parent may unmap the buffer then
            record_used(path, read_only=read_only)
        self._answer(task, got, error, time.perf_counter() - t0)

    def _answer(self, task: int, rows: list[int] | None, error: str | None, seconds: float) -> None:
        answer = msgpack.packb(["done", task, rows, error, seconds], use_bin_type=True)
        # The parent gone: nobody to tell.
        with self.send_lock, contextlib.suppress(OSError):
            self.sock.send(answer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kvdist disk connector writer process (internal)")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--name", default="kvdist-disk-writer")
    p.add_argument("--cpus", default="", help="CPU list to run on (its IO threads inherit it)")
    args = p.parse_args(argv)
    # A SIGINT sent to this process all the same (its own session keeps a terminal's
    # Ctrl-C away): the parent decides; this process ends when the parent closes the
    # socket, after finishing what it was given.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.cpus:
        move_this_thread(parse_cpu_list(args.cpus))
    logging.basicConfig(format=f"[{args.name} %(levelname)s] %(message)s")
    sock = socket.socket(fileno=args.fd)
    _Child(sock, args.threads, args.name).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
