"""Control-plane collectives through shared memory, for ranks on one host.

Under torchrun every gloo collective costs a few hundred µs (TCP on loopback); under
MPI, a nonblocking collective polled from Python ~10-20 µs. A plan broadcast and a report
allgather between processes of one machine need neither: here they are a memcpy into a
shared segment, a counter store, and a spin on the peers' counters.

Layout of the segment (a file in /dev/shm, mapped by every rank, unlinked once all have
mapped it; a later job removes one left by a rank 0 killed before that,
`remove_stale_segments`): one 64-byte line of counters per rank (arrived, done, gave up),
then two sets (by collective parity) of one slot per rank, each slot
`[payload length: uint64][collective number: uint64][kind: uint32][root: uint32]
[previous kind: uint32][previous root: uint32][payload head]`.

Protocol. Collectives are numbered 1, 2, ... identically on every rank. For collective
`s`, rank r writes its slot of set `s % 2` (the header always, the payload when it has
one: a broadcast's non-roots and a barrier contribute none), stores `arrived[r] = s`,
waits for the ranks it reads from, copies their slots out, then stores `done[r] = s`. A
writer first waits until every rank has `done >= s - 2`, so a set is never overwritten
while a slow rank still reads it. Payloads larger than a slot travel whole through the
wrapped communicator (every rank reads the length first, so all of them make that call).

Every slot read is checked against the reader's own collective: its number, kind
(broadcast, allgather, barrier) and root, and the kind and root of the collective before
it. Ranks that disagree, because a caller made different collectives on different ranks,
get `CollectiveMismatch` naming both sides, never another collective's bytes. The
previous collective's signature catches what a slot read alone cannot: ranks that each
took themselves for a broadcast's root read no slot in it, and learn at the next
collective in which they read one (every step's report exchange, in kvdist).

Ordering: a store of the payload and the later store of the counter are seen in that
order by other cores on x86-64 (total store order), and loads are not reordered with
each other; that is what the protocol relies on, so it is used only on x86-64. A rank
that misses the deadline is named from the counters (no roll call needed), and the
communicator refuses further use, as the slotted ones do. The rank that timed out also
stores the collective's number as its "gave up" counter: a late rank that reaches a
collective later reads it on entry and raises `LateForCollective` at once, rather than
complete a collective the others left and blame them at the next one.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import re
import socket
import struct
import time
import uuid
import warnings
from collections.abc import Callable
from typing import NoReturn, TypeVar

from kvdist.comm.base import (
    Call,
    CollectiveMismatch,
    CollectiveTimeout,
    Communicator,
    LateForCollective,
)
from kvdist.leftovers import STALE_AFTER_S, remove_left_behind

_T = TypeVar("_T")

DEFAULT_SLOT_BYTES = 1 << 20
_LINE = 64  # bytes of counters per rank (a cache line: ranks never share one)
_WORDS = _LINE // 8
# A slot's header: payload length, collective number, kind, root, and the kind and root of
# the writer's collective before it.
_SLOT_HEAD = struct.Struct("<QQIIII")
HEADER = _SLOT_HEAD.size
_BCAST, _ALLGATHER, _BARRIER = 1, 2, 3
_KIND_NAMES = {
    0: "no collective",
    _BCAST: "a broadcast",
    _ALLGATHER: "an allgather",
    _BARRIER: "a barrier",
}
_YIELD_SPIN_S = 5e-3
_FIRST_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3
# The least time a payload past the slots gets in the base communicator once the shared
# memory part used up the deadline: ranks that all arrived at its end still move it, and
# the base's roll call has time to hear from the others.
_BASE_FLOOR_S = 1.0
_yield = getattr(os, "sched_yield", lambda: None)
SHM_DIR = "/dev/shm"
_SEGMENT_NAME = re.compile(r"kvdist-(\d{1,10})-[0-9a-f]{12}")


def shared_memory_supported() -> bool:
    """Whether this machine can run the protocol (x86-64 ordering, a /dev/shm)."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


class SharedMemoryCommunicator(Communicator):
    """Collectives for ranks of one host over a shared segment; `base` (the launcher's
    communicator) sets it up, carries payloads larger than a slot, and aborts the job."""

    name = "shm"

    def __init__(
        self, base: Communicator, *, timeout_s: float, slot_bytes: int = DEFAULT_SLOT_BYTES
    ):
        super().__init__()
        if slot_bytes <= HEADER or slot_bytes % 8:
            raise ValueError(f"slot_bytes must be a multiple of 8 above {HEADER}, got {slot_bytes}")
        self.base = base
        self.rank = base.rank
        self.world_size = w = base.world_size
        self.slot_bytes = slot_bytes
        self._capacity = slot_bytes - HEADER  # the largest payload a slot holds
        self._counters_bytes = w * _LINE
        size = self._counters_bytes + 2 * w * slot_bytes
        seg = _map_segment(base, size, timeout_s)
        self._map = seg
        self._buf = memoryview(seg)
        # Rank r's counters are words 8r (arrived) and 8r + 1 (done); a stride-8 slice is
        # every rank's counter of one kind. Plain memoryview items, not numpy: reading them
        # is the inner loop of every wait.
        self._counters = self._buf[: self._counters_bytes].cast("Q")
        self._arrived = self._counters[0::_WORDS]
        self._done = self._counters[1::_WORDS]
        # The collective at which a rank timed out waiting for others (0: never): a rank
        # that gets there later learns it was the late one, at once, instead of
        # completing the collective the others left and then blaming them at the next.
        self._gave_up = self._counters[2::_WORDS]
        # 1 once a rank is ending the job (its abort): the others waiting for it to finish
        # its cleanup go on at once rather than after a fixed grace.
        self._ending = self._counters[3::_WORDS]
        # Each rank's pid and pid namespace: a rank can pass a signal on to another.
        self._pids = self._counters[4::_WORDS]
        self._pid_ns = self._counters[5::_WORDS]
        self._pids[self.rank] = os.getpid()
        self._pid_ns[self.rank] = _pid_namespace()
        self._previous = (0, 0)  # (kind, root) of this rank's last collective

    # -- the Communicator collectives -------------------------------------------------
    def broadcast_bytes(
        self, data: bytes | None, *, root: int = 0, timeout_s: float, what: str
    ) -> bytes:
        self._check_root(data, root, what)
        payload = self._payload(data, "broadcast_bytes", what) if self.rank == root else None
        call = self._begin(what, timeout_s)
        s = call.seq
        if min(self._done) < s - 2:
            self._await(self._done, s - 2, call)
        if self.rank == root:
            assert payload is not None
            fits = self._write(s, _BCAST, root, payload)
            self._arrived[self.rank] = s
            result = payload if isinstance(payload, bytes) else bytes(payload)
            self.stats.bytes_sent += len(payload)
        else:
            self._write(s, _BCAST, root, b"")
            self._arrived[self.rank] = s
            if self._arrived[root] < s:
                self._await(self._arrived[root : root + 1], s, call, ranks=[root])
            result, fits = self._read(s, root, _BCAST, root, call)
        self._done[self.rank] = s
        if not fits:  # every rank read the length, so every rank makes this call
            result = self._through_base(
                call,
                lambda left: self.base.broadcast_bytes(
                    data if self.rank == root else None, root=root, timeout_s=left, what=what
                ),
            )
        self._previous = (_BCAST, root)
        self._end(call)
        return result

    def allgather_bytes(self, data: bytes, *, timeout_s: float, what: str) -> list[bytes]:
        payload = self._payload(data, "allgather_bytes", what)
        call = self._begin(what, timeout_s)
        s = call.seq
        if min(self._done) < s - 2:
            self._await(self._done, s - 2, call)
        fits = self._write(s, _ALLGATHER, 0, payload)
        self._arrived[self.rank] = s
        self.stats.bytes_sent += len(payload)
        if min(self._arrived) < s:
            self._await(self._arrived, s, call)
        result, overflow = [], not fits
        for r in range(self.world_size):
            if r == self.rank:  # this rank's own payload needs no copy back
                result.append(payload if isinstance(payload, bytes) else bytes(payload))
                continue
            got, ok = self._read(s, r, _ALLGATHER, 0, call)
            result.append(got)
            overflow |= not ok
        self._done[self.rank] = s
        if overflow:  # every rank read every length, so every rank makes this call
            result = self._through_base(
                call, lambda left: self.base.allgather_bytes(data, timeout_s=left, what=what)
            )
        self._previous = (_ALLGATHER, 0)
        self._end(call)
        return result

    def barrier(self, *, timeout_s: float, what: str) -> None:
        call = self._begin(what, timeout_s)
        s = call.seq
        if min(self._done) < s - 2:
            self._await(self._done, s - 2, call)
        self._write(s, _BARRIER, 0, b"")
        self._arrived[self.rank] = s
        self._await(self._arrived, s, call)
        for r in range(self.world_size):
            if r != self.rank:
                self._read(s, r, _BARRIER, 0, call)
        self._done[self.rank] = s
        self._previous = (_BARRIER, 0)
        self._end(call)

    def abort(self, code: int = 1) -> None:
        if self._map is not None:
            self._ending[self.rank] = 1
        self.base.abort(code)

    def wait_for_abort(self, rank: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._map is not None and not self._ending[rank]:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def pid_of(self, rank: int) -> int | None:
        if self._map is None or not self._pids[rank]:  # closed, or not set up yet
            return None
        ns = _pid_namespace()
        return self._pids[rank] if ns and self._pid_ns[rank] == ns else None

    def close(self) -> None:
        if self._map is None:
            return
        self._pids[self.rank] = 0  # its pid may be another process's once this one ends
        views = (
            self._arrived, self._done, self._gave_up, self._ending, self._pids, self._pid_ns,
            self._counters, self._buf,
        )  # fmt: skip
        for view in views:
            view.release()
        with contextlib.suppress(BufferError):  # a view still held: the GC unmaps it
            self._map.close()
        self._map = None  # type: ignore[assignment]
        self.base.close()

    # -- machinery --------------------------------------------------------------------
    def _begin(self, what: str, timeout_s: float) -> Call:
        call = super()._begin(what, timeout_s)
        self.stats.collectives += 1
        if any(self._gave_up):
            gave_up = {r: s for r, s in enumerate(self._gave_up.tolist()) if s and r != self.rank}
            if gave_up:
                self._broken = f"'{what}' was reached after other ranks gave up"
                self._end(call)
                raise LateForCollective(what, timeout_s, self.rank, gave_up)
        return call

    def _slot(self, s: int, rank: int) -> int:
        return self._counters_bytes + ((s % 2) * self.world_size + rank) * self.slot_bytes

    def _write(self, s: int, kind: int, root: int, data: bytes | bytearray | memoryview) -> bool:
        """Put the header of collective `s` and `data` (or only its length, when it does
        not fit) in this rank's slot."""
        off, n = self._slot(s, self.rank), len(data)
        _SLOT_HEAD.pack_into(self._map, off, n, s, kind, root, *self._previous)
        if n > self._capacity:
            return False
        if n:
            self._map[off + HEADER : off + HEADER + n] = data
        return True

    def _read(self, s: int, rank: int, kind: int, root: int, call: Call) -> tuple[bytes, bool]:
        """The payload in `rank`'s slot, or `(b"", False)` when it did not fit there.
        Raises `CollectiveMismatch` when the slot holds another collective than this
        rank's (`s`, `kind`, `root`)."""
        off = self._slot(s, rank)
        n, their_s, their_kind, their_root, *their_previous = _SLOT_HEAD.unpack_from(self._map, off)
        if (their_s, their_kind, their_root) != (s, kind, root):
            self._mismatch(
                call,
                rank,
                f"collective #{s} is {_describe(kind, root)} ('{call.what}') here, but rank "
                f"{rank} wrote #{their_s} as {_describe(their_kind, their_root)}",
            )
        if tuple(their_previous) != self._previous:
            self._mismatch(
                call,
                rank,
                f"collective #{s - 1} was {_describe(*self._previous)} here, but rank {rank} "
                f"made it {_describe(*their_previous)} (found in #{s}, '{call.what}')",
            )
        if n > self._capacity:
            return b"", False
        return self._map[off + HEADER : off + HEADER + n], True  # one copy, to bytes

    def _through_base(self, call: Call, collective: Callable[[float], _T]) -> _T:
        """A payload too large for the slots goes through the base communicator, given
        what is left of the call's deadline (at least `_BASE_FLOOR_S`, or the whole
        deadline where shorter): a non-root that waited most of it for a late root must
        not wait a whole deadline more there. A rank that times out there says so in its
        counter, as in `_await`: a rank arriving later (a broadcast's root does not wait
        for the others) is told at once that it is late, not left to wait out its own
        deadline in the base collective."""
        floor = min(call.timeout_s, _BASE_FLOOR_S)
        try:
            return collective(max(call.deadline - time.monotonic(), floor))
        except CollectiveTimeout as exc:
            self._gave_up[self.rank] = call.seq
            # Named with this call's deadline, from the counters: a rank that came in
            # shared memory makes the base call too, whether or not the base's roll call
            # (given only what was left of the deadline) heard from it in time.
            missing = [r for r, s in enumerate(self._arrived.tolist()) if s < call.seq]
            err = CollectiveTimeout(call.what, call.timeout_s, self.rank, missing)
            self._broken = f"'{call.what}' timed out: {err}"
            raise err from exc

    def _mismatch(self, call: Call, rank: int, what: str) -> NoReturn:
        self._broken = f"'{call.what}' found rank {rank} in another collective"
        self._end(call)
        raise CollectiveMismatch(
            f"rank {self.rank}: {what}: the ranks made different collectives (every rank "
            "must make the same ones, in order)"
        )

    def _await(
        self, counters: memoryview, target: int, call: Call, ranks: list[int] | None = None
    ) -> None:
        """Return once every counter in `counters` (of `ranks`, default all) is >= target:
        spin, then yield, then sleep with backoff, until the call's deadline."""
        if target <= 0 or min(counters) >= target:
            return
        spin_end = min(call.deadline, time.monotonic() + _YIELD_SPIN_S)
        while min(counters) < target:
            if time.monotonic() >= spin_end:
                break
            _yield()
        else:
            return
        pause = _FIRST_SLEEP_S
        while min(counters) < target:
            if time.monotonic() >= call.deadline:
                self._gave_up[self.rank] = call.seq
                ranks = list(range(self.world_size)) if ranks is None else ranks
                missing = [r for r, c in zip(ranks, counters.tolist()) if c < target]
                self._broken = f"'{call.what}' timed out: rank(s) {missing} did not arrive"
                raise CollectiveTimeout(call.what, call.timeout_s, self.rank, missing)
            time.sleep(pause)
            pause = min(1.5 * pause, _MAX_SLEEP_S)


def _describe(kind: int, root: int) -> str:
    name = _KIND_NAMES.get(kind, f"a collective of unknown kind {kind}")
    return f"{name} from rank {root}" if kind == _BCAST else name


def _map_segment(base: Communicator, size: int, timeout_s: float) -> mmap.mmap:
    """Rank 0 creates the segment file and broadcasts its path; every rank maps it; the
    file is unlinked once all have (the mapping lives on, nothing is left behind). Raises
    OSError on every rank, naming the ranks that failed and why, when any rank could not
    create or map it."""
    path, failure = "", ""
    if base.rank == 0:
        try:  # housekeeping: never a reason for rank 0 to miss the broadcast below
            remove_stale_segments(SHM_DIR)
        except Exception as exc:
            warnings.warn(f"could not check {SHM_DIR} for stale segments: {exc}", stacklevel=3)
        candidate = os.path.join(SHM_DIR, f"kvdist-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                # Reserved now, not page by page on first use: a /dev/shm without room
                # for it (a container's 64 MB, filled by others) fails here, and the ranks
                # keep their base communicator, instead of a SIGBUS in a later collective.
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.unlink(candidate)
                raise
            finally:
                os.close(fd)
            path = candidate
        except OSError as exc:
            failure = f"rank 0 could not create a shared-memory segment in {SHM_DIR} ({exc})"
            warnings.warn(f"no shared-memory segment ({exc}); using {base.name}", stacklevel=3)
    try:
        # A path, or why there is none (paths start with "/").
        got = base.broadcast_bytes(
            (path or failure).encode() if base.rank == 0 else None,
            timeout_s=timeout_s,
            what="shm segment name",
        ).decode()
        if not got.startswith("/"):
            raise OSError(got)
        seg, error = None, ""
        try:  # another IPC namespace (a container) may not see rank 0's /dev/shm
            seg = _map(got, size)
        except OSError as exc:
            error = str(exc)
        errors = base.allgather_bytes(
            error.encode(), timeout_s=timeout_s, what="shm segment mapped"
        )
        failed = {r: e.decode() for r, e in enumerate(errors) if e}
        if failed:
            if seg is not None:
                seg.close()
            first = next(iter(failed.values()))
            raise OSError(
                f"rank(s) {sorted(failed)} could not map rank 0's shared-memory segment {got} "
                f"({first}): they likely see another {SHM_DIR} than rank 0 (a container with "
                f"its own {SHM_DIR} mount or IPC namespace)"
            )
    finally:
        if path:
            os.unlink(path)
    assert seg is not None
    return seg


def remove_stale_segments(directory: str, *, min_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove segment files left by a rank 0 killed (SIGKILL) between creating one and
    unlinking it (`kvdist.leftovers`). Returns the paths removed."""
    return remove_left_behind(directory, _SEGMENT_NAME, min_age_s=min_age_s)


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def same_host(
    base: Communicator, timeout_s: float, *, what: str = "shm host check", tag: bytes = b""
) -> bool:
    """Whether every rank runs on this host and passed the same `tag` (one allgather of
    host identities, labelled `what`)."""
    me = tag + _host_id()
    return len(set(base.allgather_bytes(me, timeout_s=timeout_s, what=what))) == 1


def _host_id() -> bytes:
    return f"{socket.gethostname()}/{_boot_id()}".encode()


def _pid_namespace() -> int:
    """This process's pid namespace (its inode), 0 when unknown: pids are comparable only
    within one (ranks in two containers may share memory, not pids)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _boot_id() -> str:
    # Two containers can share a host name; the kernel's boot id tells hosts apart.
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def maybe_shared_memory(
    base: Communicator, *, enabled: bool | None, timeout_s: float
) -> Communicator:
    """`base` wrapped in a `SharedMemoryCommunicator` when `enabled` (None: when every
    rank is on this host and the machine supports it), else `base` itself. Every rank
    must pass the same `enabled` (`KVDIST_SHM`): a `ValueError` on every rank otherwise."""
    if base.world_size == 1:
        return base
    supported = shared_memory_supported()
    # Every rank must take the same decision: one collective checks that every rank has
    # the same setting, and is on this host with the same support. It is made with
    # KVDIST_SHM=0 too, or ranks with the setting and ranks without it would pair their
    # collectives wrongly from here on. Each rank raises only after it, so none is left
    # waiting in it.
    setting = {None: b"a", True: b"1", False: b"0"}[enabled]
    me = setting + (b"+" if supported else b"-") + _host_id()
    tags = base.allgather_bytes(me, timeout_s=timeout_s, what="shm host check")
    settings = [t[:1] for t in tags]
    if len(set(settings)) > 1:
        shown = {b"a": "unset", b"1": "1", b"0": "0"}
        per_rank = ", ".join(f"rank {r}: {shown.get(v, '?')}" for r, v in enumerate(settings))
        raise ValueError(
            f"KVDIST_SHM differs across the ranks ({per_rank}); set it alike on every rank "
            "(Open MPI passes a variable to other hosts only when named with -x)"
        )
    if enabled is False:
        return base
    together = len(set(tags)) == 1
    if enabled and not supported:
        raise ValueError(
            f"KVDIST_SHM=1 needs an x86-64 machine with {SHM_DIR} (this is {platform.machine()})"
        )
    if not (together and supported):
        if enabled:
            raise ValueError(
                f"KVDIST_SHM=1 needs every rank on one host, each an x86-64 machine with {SHM_DIR}"
            )
        return base
    try:
        return SharedMemoryCommunicator(base, timeout_s=timeout_s)
    except OSError as exc:  # every rank gets here together: they exchanged whether they mapped
        if enabled:
            raise ValueError(
                f"KVDIST_SHM=1, but {exc}; unset KVDIST_SHM to fall back to {base.name}"
            ) from None
        return base
