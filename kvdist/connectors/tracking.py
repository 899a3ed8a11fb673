"""Rank-0 bookkeeping shared by the built-in connector schedulers, and meta packing.

`RequestTracker` follows each request's block table through the step deltas, says which
blocks became full (so can be saved) in a step, and remembers the keys (block hashes or
pool slots) that in-flight loads read, so they are not evicted under them.

A key is pinned from `update_state_after_alloc` until the request is next scheduled (the
engine schedules an async-loading request only once every rank has loaded it) or stops. A
request that stops while loading (aborted, or its load timed out) may still be read by
the ranks: a connector whose storage is not read in step order (the disk connector's) takes
its pins over then (`take_load_pins`) and releases them once every rank's load is over.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvdist.api.types import Request, SchedulerOutput
from kvdist.coordination.errors import as_index
from kvdist.coordination.tracker import RecentIds
from kvdist.kv.hashing import HASH_BYTES
from kvdist.wire.codec import pack_ids  # noqa: F401  (re-exported for the connectors)
from kvdist.wire.codec import unpack_ids as _unpack_ids

_FINISHED_KEPT = 65536
"""Finished request ids remembered, so that a second `request_finished` is named."""

META_VERSION = 1


def unpack_ids(data: bytes) -> list[int]:
    """Block ids or slots packed with `pack_ids` (the wire's little-endian int32)."""
    return _unpack_ids(data, "connector metadata")


def pack_hashes(hashes: Sequence[bytes]) -> bytes:
    data = b"".join(hashes)
    if len(data) != HASH_BYTES * len(hashes):
        raise ValueError(f"block hashes must be {HASH_BYTES} bytes each")
    return data


def unpack_hashes(data: bytes) -> list[bytes]:
    return [data[i : i + HASH_BYTES] for i in range(0, len(data), HASH_BYTES)]


def earlier_blocks(t: TrackedRequest, first: int) -> Callable[[bytes], bool]:
    """Whether a key is one of the request's blocks before block `first`. A request's later
    blocks are of no use without its earlier ones, so saving them never evicts those. The
    set lives on the request and grows by the blocks since the last question: a step pays
    for its new blocks, not for the whole prefix."""

    def contains(key: bytes) -> bool:
        if t.prefix_keys_to < first:
            t.prefix_keys.update(t.request.block_hashes[t.prefix_keys_to : first])
            t.prefix_keys_to = first
        return key in t.prefix_keys

    return contains


def touched_blocks(t: TrackedRequest, lo: int, hi: int, block_size: int) -> list[bytes]:
    """The keys to mark used, in order, once blocks `[lo, hi)` of a request are saved:
    while its prompt is prefilled, the whole prefix so far (its tail then goes first,
    whatever steps saved it); after, in decode, only the new blocks (one every
    `block_size` tokens; the whole chain is ordered again when it finishes)."""
    start = 0 if lo * block_size < len(t.request.prompt_token_ids) else lo
    return t.request.block_hashes[start:hi]


def check_report(meta: Any, connector: str, rank: int) -> dict:
    """A worker's report to rank 0 (`build_worker_meta`) of this version, from `rank`."""
    version = meta.get("v") if isinstance(meta, dict) else type(meta).__name__
    if version != META_VERSION:
        raise ValueError(
            f"{connector} connector: the report of rank {rank} has version {version!r}, not "
            f"{META_VERSION}; every rank must run the same kvdist version"
        )
    return meta


def check_meta(meta: object, connector: str) -> dict:
    if not isinstance(meta, dict) or meta.get("v") != META_VERSION:
        version = meta.get("v") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"{connector} connector: metadata version {version!r} is not {META_VERSION}; "
            "every rank must run the same kvdist version"
        )
    return meta


@dataclass
class TrackedRequest:
    request: Request
    block_ids: list[int] = field(default_factory=list)
    lookup_start: int | None = None
    """Block index where the last `get_num_new_matched_tokens` started (on-device hit)."""
    next_save_block: int = 0
    """First block index not yet offered for saving."""
    first_computed: int = 0
    """First block index the engine computes at its admission: those before it were hits,
    on the device or loaded by this connector."""
    deferred_to: int = 0
    """Blocks below this became full in a step that loaded synchronously: offered in the
    request's next step, or when it finishes (`unsaved_at_finish`)."""
    saves_issued: bool = False
    prefix_keys: set[bytes] = field(default_factory=set)
    """Keys of its first `prefix_keys_to` blocks, once a save had to evict (`earlier_blocks`)."""
    prefix_keys_to: int = 0


class RequestTracker:
    def __init__(self, block_size: int, num_blocks: int = 0) -> None:
        """`num_blocks`: the engine's KV cache blocks per rank, when known (else 0)."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.requests: dict[str, TrackedRequest] = {}
        self._pending: dict[str, list[Hashable]] = {}  # loads not yet in a meta
        self._loading: dict[str, list[Hashable]] = {}  # loads sent in an earlier meta
        self._pins: Counter[Hashable] = Counter()
        # Ids request_finished was called for, until reused.
        self._finished = RecentIds(_FINISHED_KEPT)

    def remember(self, request: Request) -> TrackedRequest:
        t = self.requests.get(request.request_id)
        if t is None or t.request is not request:
            t = self.requests[request.request_id] = TrackedRequest(request)
            self._finished.discard((request.request_id,))  # the id is reused
        return t

    def match(
        self,
        request: Request,
        num_computed_tokens: int,
        present: Callable[[bytes], bool],
        *,
        load_async: bool = True,
    ) -> tuple[int, bool]:
        """The `get_num_new_matched_tokens` answer of a connector whose blocks are
        `present`: consecutive full blocks after the on-device hit, loaded asynchronously
        (or within the step that schedules the request, with `load_async=False`)."""
        n = as_index(num_computed_tokens)
        if n is None or n < 0 or n % self.block_size:
            # The answer counts whole blocks from num_computed_tokens // block_size: from
            # a partial block, the engine would take tokens past the last loaded one as
            # computed.
            raise ValueError(
                f"get_num_new_matched_tokens({request.request_id!r}): num_computed_tokens="
                f"{num_computed_tokens!r} is not a whole number of {self.block_size}-token "
                "blocks (the on-device prefix hit is)"
            )
        t = self.remember(request)
        start = t.lookup_start = num_computed_tokens // self.block_size
        n = 0
        for key in request.block_hashes[start:]:
            if not present(key):
                break
            n += 1
        return (n * self.block_size, load_async) if n else (0, False)

    def misses(self, request: Request, found: int) -> int:
        """Full prompt blocks after the on-device hit that the connector did not supply."""
        start = self.requests[request.request_id].lookup_start or 0
        return max(0, request.num_prompt_tokens // self.block_size - start - found)

    def admit(self, request: Request, block_ids: list[int], num_external_tokens: int) -> range:
        """Record `request`'s block table (`update_state_after_alloc`); the block indices its
        `num_external_tokens` load covers (empty when it loads nothing)."""
        t = self.remember(request)
        t.block_ids = list(block_ids)
        bad = [b for b in t.block_ids if not 0 <= b < (self.num_blocks or b + 1)]
        if bad:
            raise ValueError(
                f"update_state_after_alloc({request.request_id!r}): block ids {bad[:5]} are "
                f"not blocks of the KV cache [0, {self.num_blocks})"
            )
        if num_external_tokens <= 0:
            t.first_computed = t.lookup_start or 0
            return range(0)
        loaded = self.load_range(request.request_id, num_external_tokens)
        t.first_computed = loaded.stop
        return loaded

    def load_range(self, request_id: str, num_external_tokens: int) -> range:
        """Block indices a load of `num_external_tokens` tokens covers (the last one may be
        partial: the engine recomputes at least the last prompt token)."""
        t = self.requests[request_id]
        if t.lookup_start is None:
            raise RuntimeError(
                f"update_state_after_alloc({request_id!r}) asks for {num_external_tokens} "
                "external tokens without a preceding get_num_new_matched_tokens call"
            )
        first = t.lookup_start
        last = -(-(first * self.block_size + num_external_tokens) // self.block_size)
        return range(first, last)

    def pin(self, request_id: str, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        self._pending.setdefault(request_id, []).extend(keys)
        self._pins.update(keys)

    def is_pinned(self, key: Hashable) -> bool:
        return self._pins[key] > 0

    def unpin(self, request_id: str, *, pending: bool = True) -> None:
        keys = self._loading.pop(request_id, [])
        if pending:
            keys += self._pending.pop(request_id, [])
        self.release(keys)

    def take_load_pins(self, request_id: str) -> list[Hashable]:
        """The keys `request_id`'s loads pin, taken from the request still pinned (its
        stopping then unpins nothing); `release` them once the loads are over."""
        return self._loading.pop(request_id, []) + self._pending.pop(request_id, [])

    def release(self, keys: Iterable[Hashable]) -> None:
        """Unpin keys of `take_load_pins` (once each)."""
        for k in keys:
            self._pins[k] -= 1
            if self._pins[k] <= 0:
                del self._pins[k]

    def update(self, so: SchedulerOutput) -> list[tuple[TrackedRequest, int, int]]:
        """Apply the step's block-table deltas, release the pins of scheduled requests, and
        return `(request, lo, hi)`: block indices `[lo, hi)` are full and may be saved after
        this step's forward (not yet, for a request loading synchronously in this step)."""
        for rid in so.preempted_req_ids:
            t = self.requests.get(rid)
            if t is not None:
                # The blocks a synchronous load's step left to save were freed: the request
                # computes them again in blocks of its own, which it offers as they fill,
                # all of them (what it saved before may have been evicted meanwhile; the
                # connector skips what it still holds).
                t.deferred_to = 0
                t.next_save_block = 0
        for rd in so.new_requests:
            t = self.requests.get(rd.request_id)
            if t is not None:
                t.block_ids = list(rd.new_block_ids)
        for rd in so.cached_requests:
            t = self.requests.get(rd.request_id)
            if t is not None:
                t.block_ids.extend(rd.new_block_ids)
        out = []
        # What a synchronous load fills, and what is computed on top of it, is rolled back
        # when the load fails on any rank: offered in the request's next step instead.
        unsure = set(so.sync_load_req_ids)
        for rd in so.all_requests():
            # Only loads sent in an earlier meta are over once the request is scheduled.
            self.unpin(rd.request_id, pending=False)
            t = self.requests.get(rd.request_id)
            if t is None or rd.num_scheduled_tokens <= 0:
                continue
            full = (rd.computed_position + rd.num_scheduled_tokens) // self.block_size
            hi = min(full, len(t.request.block_hashes), len(t.block_ids))
            if rd.request_id in unsure:
                t.deferred_to = max(t.deferred_to, hi)
                continue
            if hi > t.next_save_block:
                out.append((t, t.next_save_block, hi))
                t.next_save_block = hi
        for rid in so.finished_req_ids:
            # request_finished is not called for a request that never got blocks.
            self.forget(rid)
        for rid, keys in self._pending.items():
            self._loading.setdefault(rid, []).extend(keys)
        self._pending.clear()
        return out

    def unsaved_at_finish(
        self, request_id: str, block_ids: list[int]
    ) -> tuple[TrackedRequest, int, int] | None:
        """For `request_finished`: forget the request, and return `(request, lo, hi)`, the
        blocks its last step left to save because it loaded synchronously (the request
        finished, so that load did not fail), when `block_ids` holds valid KV; None when
        there are none. A connector saving them holds the blocks (returns True)."""
        if request_id in self._finished:
            raise ValueError(
                f"request_finished({request_id!r}) was called twice: an engine calls it once "
                "per request, and keeps the blocks while its first answer was True"
            )
        self._finished.add(request_id)
        t = self.forget(request_id)
        if t is None or not block_ids or t.deferred_to <= t.next_save_block:
            return None
        t.block_ids = list(block_ids)
        lo, hi = t.next_save_block, min(t.deferred_to, len(t.block_ids))
        t.next_save_block = hi
        return (t, lo, hi) if hi > lo else None

    def forget(self, request_id: str) -> TrackedRequest | None:
        self.unpin(request_id)
        return self.requests.pop(request_id, None)
