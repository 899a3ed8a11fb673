"""Variable-size byte collectives over fixed-size slots, with deadlines and roll calls.

Shared by the MPI and torch.distributed communicators, which only supply nonblocking
primitives. Control messages vary in size from step to step, and learning the sizes first
would double the collectives. Instead every rank uses a slot of the same size: 8 bytes of
payload length, then the payload's head. A payload that fits costs one collective. A larger
one costs a second collective for the rest (every rank learnt the lengths from the first).

Slot sizes change only on numbers every rank has seen (the payload lengths), so they stay
equal everywhere without a word exchanged. After an overflow the slot grows to the payload
plus a quarter (in 4 KiB steps, capped), so the next steps of about that size fit in one
collective. Because every collective moves the whole slot, a slot that stayed twice as
large as needed for `SHRINK_WINDOW` collectives shrinks back: one big plan must not tax
every later step. Broadcasts and allgathers keep separate slots (plans are large, reports
small).

A rank that misses its deadline marks the communicator broken (the collective stays posted
and cannot be cancelled), asks the backend for a roll call to learn which ranks never
arrived, and raises `CollectiveTimeout`. The caller is then expected to `abort()`.
"""

from __future__ import annotations

import struct
from abc import abstractmethod
from typing import Any

from kvdist.comm.base import Call, CollectiveTimeout, Communicator

_LENGTH = struct.Struct("<Q")  # the slot header: payload length
HEADER = _LENGTH.size
DEFAULT_SLOT_BYTES = 4096
# A plan admitting one long prompt (2k tokens, its blocks and hashes) fits in 16 KiB, so
# the broadcast slot starts there: a first big plan then costs no second collective.
MIN_BCAST_SLOT_BYTES = 16 << 10
DEFAULT_MAX_SLOT_BYTES = 4 << 20
# Long enough that occasional big plans (a new request every few dozen steps) keep the slot
# that fits them, instead of paying a second collective each time after it shrank.
SHRINK_WINDOW = 256
ROLL_CALL_WINDOW_S = 2.0


def _fitting(payload_len: int) -> int:
    # A quarter of headroom: plans vary from step to step, and a slot one size too small
    # costs a second collective. Rounded to 4 KiB so that sizes repeat.
    want = payload_len + HEADER
    return -(-(want + want // 4) // 4096) * 4096


class _Slot:
    """One slot size (same on every rank) and the buffers that use it."""

    def __init__(self, size: int, max_size: int, blocks: int):
        self.min_size, self.max_size, self.blocks = size, max_size, blocks
        self._resize(size)

    def _resize(self, size: int) -> None:
        self.size = size
        self.send = memoryview(bytearray(size))
        self.recv = memoryview(bytearray(size * self.blocks)) if self.blocks else self.send
        self.window_largest = self.window_calls = 0

    def observe(self, largest_payload: int) -> None:
        """Called on every rank after each collective, with the same number everywhere."""
        if largest_payload + HEADER > self.size:  # an overflow also restarts the window
            if self.size < self.max_size:
                self._resize(min(self.max_size, _fitting(largest_payload)))
            self.window_largest = self.window_calls = 0
            return
        if largest_payload > self.window_largest:
            self.window_largest = largest_payload
        self.window_calls += 1
        if self.window_calls == SHRINK_WINDOW:
            fit = max(self.min_size, _fitting(self.window_largest))
            if 2 * fit <= self.size:
                self._resize(fit)
            self.window_largest = self.window_calls = 0


class SlottedCommunicator(Communicator):
    """Implements the `Communicator` collectives on top of a backend's raw primitives."""

    def __init__(self, *, rank: int, world_size: int, slot_bytes: int, max_slot_bytes: int):
        super().__init__()
        if not HEADER < slot_bytes <= max_slot_bytes:
            raise ValueError(
                f"need {HEADER} < slot_bytes <= max_slot_bytes, got {slot_bytes}, {max_slot_bytes}"
            )
        self.rank = rank
        self.world_size = world_size
        # Requests (and their buffers) of collectives that failed: the backend may still
        # write into them, so they must outlive the call.
        self._stranded: list[Any] = []
        bcast_slot = min(max_slot_bytes, max(slot_bytes, MIN_BCAST_SLOT_BYTES))
        self._bcast_slot = _Slot(bcast_slot, max_slot_bytes, blocks=0)
        self._gather_slot = _Slot(slot_bytes, max_slot_bytes, blocks=world_size)

    @property
    def slot_bytes(self) -> tuple[int, int]:
        """Current (broadcast, allgather) slot sizes."""
        return self._bcast_slot.size, self._gather_slot.size

    # -- what a backend supplies --------------------------------------------------------

    @abstractmethod
    def _start_bcast(self, buf: memoryview, root: int) -> Any:
        """Post a broadcast of `buf` (filled on root); the handle keeps `buf` alive."""

    @abstractmethod
    def _start_allgather(self, send: memoryview, recv: memoryview) -> Any:
        """Post an allgather of equal blocks: rank i's `send` lands in `recv` block i."""

    @abstractmethod
    def _start_barrier(self) -> Any:
        """Post a barrier and return a handle."""

    @abstractmethod
    def _wait(self, handle: Any, deadline: float) -> bool:
        """Wait for `handle` until `deadline` (time.monotonic()); False if it passed."""

    @abstractmethod
    def _roll_call(self, seq: int, window_s: float) -> list[int] | None:
        """Ranks that did not reach collective `seq` (or a later one), None if unknown."""

    def _allgather_rest(self, rest: memoryview, counts: list[int], call: Call) -> list[memoryview]:
        """Second round: rank i contributes `counts[i]` bytes; default pads to the largest."""
        width = max(counts)
        send = memoryview(bytearray(width))
        send[: len(rest)] = rest
        recv = memoryview(bytearray(width * self.world_size))
        self._complete(self._start_allgather(send, recv), call, width)
        return [recv[i * width : i * width + c] for i, c in enumerate(counts)]

    # -- the Communicator collectives ---------------------------------------------------

    def broadcast_bytes(
        self, data: bytes | None, *, root: int = 0, timeout_s: float, what: str
    ) -> bytes:
        self._check_root(data, root, what)
        payload = self._payload(data, "broadcast_bytes", what) if self.rank == root else None
        call = self._begin(what, timeout_s)
        slot = self._bcast_slot
        buf, head = slot.send, slot.size - HEADER
        if payload is not None:
            _fill(buf, payload)
        self._complete(self._start_bcast(buf, root), call, self._sent_if(root, slot.size))
        (length,) = _LENGTH.unpack_from(buf)
        if length <= head:
            result = bytes(buf[HEADER : HEADER + length])
        else:
            whole = memoryview(bytearray(length))
            whole[:head] = buf[HEADER:]
            if payload is not None:
                whole[head:] = memoryview(payload)[head:]
            sent = self._sent_if(root, length - head)
            self._complete(self._start_bcast(whole[head:], root), call, sent)
            result = bytes(whole)
        slot.observe(length)
        self._end(call)
        return result

    def allgather_bytes(self, data: bytes, *, timeout_s: float, what: str) -> list[bytes]:
        payload = self._payload(data, "allgather_bytes", what)
        call = self._begin(what, timeout_s)
        slot = self._gather_slot
        size, head = slot.size, slot.size - HEADER
        _fill(slot.send, payload)
        self._complete(self._start_allgather(slot.send, slot.recv), call, size)
        recv = slot.recv
        lengths = [_LENGTH.unpack_from(recv, i * size)[0] for i in range(self.world_size)]
        if max(lengths) <= head:
            starts = range(HEADER, HEADER + size * self.world_size, size)
            result = [bytes(recv[i : i + n]) for i, n in zip(starts, lengths)]
        else:
            counts = [max(0, n - head) for n in lengths]
            rests = self._allgather_rest(memoryview(payload)[head:], counts, call)
            result = [
                bytes(recv[i * size + HEADER : i * size + HEADER + min(n, head)]) + bytes(r)
                for i, (n, r) in enumerate(zip(lengths, rests))
            ]
        slot.observe(max(lengths))
        self._end(call)
        return result

    def barrier(self, *, timeout_s: float, what: str) -> None:
        call = self._begin(what, timeout_s)
        self._complete(self._start_barrier(), call, 0)
        self._end(call)

    # -- machinery ----------------------------------------------------------------------

    def _complete(self, handle: Any, call: Call, sent: int) -> None:
        self.stats.collectives += 1
        self.stats.bytes_sent += sent
        try:
            done = self._wait(handle, call.deadline)
        except Exception as e:
            self._fail(f"'{call.what}' failed: {e}", handle, call)
            raise RuntimeError(f"rank {self.rank}: collective '{call.what}' failed: {e}") from e
        if not done:
            self._fail(f"'{call.what}' timed out", handle, call)
            missing = self._roll_call(call.seq, min(ROLL_CALL_WINDOW_S, call.timeout_s))
            if missing:
                self._broken = f"'{call.what}' timed out: rank(s) {missing} did not arrive"
            raise CollectiveTimeout(call.what, call.timeout_s, self.rank, missing)

    def _fail(self, reason: str, handle: Any, call: Call) -> None:
        self._broken = reason
        self._stranded.append(handle)
        self._end(call)

    def _sent_if(self, root: int, nbytes: int) -> int:
        return nbytes if self.rank == root else 0


def _fill(slot: memoryview, payload: bytes | bytearray | memoryview) -> None:
    n = len(payload)
    _LENGTH.pack_into(slot, 0, n)
    if n + HEADER <= len(slot):
        slot[HEADER : HEADER + n] = payload
    else:
        slot[HEADER:] = memoryview(payload)[: len(slot) - HEADER]
