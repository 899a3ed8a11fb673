"""The codec for the two messages that cross ranks every step.

`Plan` (rank 0 → all, one broadcast) and `Report` (all → all, one allgather). A report is
a msgpack array `[type tag, version, fields...]`. A plan is an 8-byte frame (magic, header
length), a msgpack array of the same kind (its header), then the int32 columns of its
request batches as raw little-endian bytes. The fields are named and typed in
`_PLAN_FIELDS` / `_REPORT_FIELDS`; decoding checks the frame, the tag, the version, the
length and every field's type, and any problem raises `WireError` naming it.

Why this shape: the decode of a step at a few hundred requests is on every step's critical
path, on every rank but 0. Positional fields cost no key strings to pack, hash and look
up; the columns outside msgpack are copied once on each side, not four times; all request
ids travel as one NUL-joined string, one object rather than one per request. Arrays of ids
(tokens, blocks) are packed int32, never msgpack lists. No pickle: connector metadata must
be plain msgpack data (None, bool, int, float, str, bytes, list, dict).
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvdist.api.step import RequestBatch, SchedulerOutput

WIRE_VERSION = 6
_SWAP = sys.byteorder != "little"  # the wire is little-endian
assert array("i").itemsize == 4, "kvdist packs ids as 4-byte C ints"


class WireError(ValueError):
    """Bytes that are not a valid kvdist message of this version, or data that cannot be
    encoded as one."""

    step: int | None = None
    """The plan's step, when its header was read before the problem was found."""


@dataclass
class Plan:
    """Everything the ranks need for one step, decided on rank 0."""

    step: int
    scheduler_output: SchedulerOutput
    loading_req_ids: list[str] = field(default_factory=list)
    """Requests whose async load starts this step (passed to `get_finished` once)."""
    saving_req_ids: list[str] = field(default_factory=list)
    """Finished requests whose blocks are held until every rank reports their save."""
    connector_meta: Any = None
    stop: bool = False
    """True: the engine loop ends after this message (no forward pass, no report
    exchange); such a plan carries nothing but its step."""
    error: str | None = None
    """Set when rank 0 failed to plan: every rank raises with this message."""


@dataclass
class Report:
    """One rank's new completions for one step."""

    rank: int
    step: int
    saved: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    failed_blocks: list[int] = field(default_factory=list)
    error: str | None = None
    """Set when this rank failed during the step: every rank raises with it."""
    worker_meta: Any = None
    """What this rank's connector worker tells rank 0's connector scheduler
    (`ConnectorWorker.build_worker_meta`): plain msgpack data, None for nothing."""


def pack_ids(ids: Any) -> bytes:
    """Little-endian int32 bytes of a sequence of ids."""
    try:
        arr = array("i", ids)
    except OverflowError as exc:
        raise WireError("an id does not fit in int32") from exc
    except TypeError as exc:
        raise WireError(f"ids must be integers ({exc})") from exc
    if _SWAP:
        arr.byteswap()
    return arr.tobytes()


def unpack_ids(data: Any, what: str) -> list[int]:
    return _int32_array(data, what).tolist()


def _int32_array(data: Any, what: str) -> array:
    if not isinstance(data, (bytes, memoryview)):
        raise WireError(f"{what}: expected packed int32 bytes, got {type(data).__name__}")
    if len(data) % 4:
        raise WireError(
            f"{what}: expected packed int32 bytes, got {len(data)} bytes, not a multiple of 4"
        )
    arr = array("i")
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return arr


def utf8_text(text: str) -> str:
    """`text` with what UTF-8 cannot encode escaped: an error naming a path of undecodable
    bytes (which Python keeps as surrogates) must still travel, or the rank that has it
    fails alone while the others wait for its message."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _pack(obj: Any, what: str) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"{what} cannot be encoded as msgpack: {exc}") from exc


def _unpack(data: bytes | memoryview, kind: str, fields: tuple[tuple[str, Any], ...]) -> list[Any]:
    """The message's fields as a list, after checking its type tag, version and length."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{kind}: expected bytes, got {type(data).__name__}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"{kind}: malformed msgpack bytes ({type(exc).__name__}: {exc})") from exc
    if isinstance(msg, dict) and "v" in msg:  # how versions before 4 framed a message
        msg = [msg.get("t"), msg.get("v")]
    if not isinstance(msg, list) or len(msg) < 2:
        raise WireError(f"{kind}: expected an array [type, version, ...], got {type(msg).__name__}")
    if msg[0] != kind:
        raise WireError(f"expected a {kind!r} message, got type {msg[0]!r}")
    if msg[1] != WIRE_VERSION:
        raise WireError(
            f"{kind}: wire version {msg[1]!r}, this kvdist speaks {WIRE_VERSION}; "
            "every rank must run the same kvdist version"
        )
    if len(msg) != len(fields):
        raise WireError(
            f"{kind}: {len(msg)} fields, version {WIRE_VERSION} has {len(fields)} "
            f"({', '.join(k for k, _ in fields)})"
        )
    return msg


def _check_fields(msg: list[Any], kind: str, fields: tuple[tuple[str, Any], ...]) -> None:
    """Check each field of `msg` against `fields` (`(name, type or tuple of types)`,
    `object`: any); a bool does not pass for an int. `msg` has the right length (`_unpack`
    checked it)."""
    for (key, want), value in zip(fields, msg):
        if want is not object and type(value) not in (want if isinstance(want, tuple) else (want,)):
            raise WireError(f"{kind}: field {key!r} has type {type(value).__name__}")


def _str_list(value: list[Any], what: str) -> list[str]:
    for item in value:
        if type(item) is not str:
            raise WireError(f"{what}: expected a list of strings")
    return value


def _split_ids(joined: str, count: int, what: str) -> list[str]:
    # Request ids travel as one NUL-joined string (RequestBatch refuses NUL in an id):
    # one object to pack and one split, instead of one msgpack string per request.
    ids = joined.split("\0") if count or joined else []
    if len(ids) != count:
        raise WireError(f"{what}: {len(ids)} request ids for {count} requests")
    return ids


def _swapped(col: array) -> array:
    out = array("i", col)
    out.byteswap()
    return out


# -- plan -------------------------------------------------------------------------------
# A plan is a frame: `_FRAME` (magic, header length), a msgpack array (the header: the
# fields below, in order, with their types), then the int32 columns of both request
# batches (the new batch's six, then the cached batch's six) as raw little-endian bytes.
# The columns are most of a large plan's bytes; outside msgpack they are copied once on
# each side (into the frame, out into the batch's arrays) instead of four times. Both
# batches' request ids travel in one NUL-joined string.
_FRAME = struct.Struct("<4sI")
_PLAN_MAGIC = b"\xc1KVP"  # 0xc1 never starts a msgpack object: older, all-msgpack plans differ
_PLAN_FIELDS: tuple[tuple[str, Any], ...] = (
    ("type", str),
    ("version", int),
    ("step", int),
    ("stop", bool),
    ("error", (str, type(None))),
    ("request_ids", str),
    ("num_new", int),
    ("num_cached", int),
    ("finished", list),
    ("preempted", list),
    ("sync_loading", list),
    ("loading", list),
    ("saving", list),
    ("meta", bytes),
)
_PLAN_TYPES = tuple(t if isinstance(t, type) else type(None) for _, t in _PLAN_FIELDS)


def encode_plan(plan: Plan) -> bytes:
    so = plan.scheduler_output
    new, cached = RequestBatch.of(so.new_requests), RequestBatch.of(so.cached_requests)
    # The metadata is packed on its own so that a failure names the connector.
    meta = _pack(plan.connector_meta, "connector metadata (build_connector_meta's result)")
    joined = "\0".join(new.request_ids + cached.request_ids)
    if joined.count("\0") != max(len(new) + len(cached) - 1, 0):
        # An id edited into a batch past `add`: rank 0, which reuses its batches, would run
        # the step while the other ranks split the id into more requests and fail on it.
        raise WireError(
            "plan.scheduler_output: a request id holds a NUL character (set in a batch's "
            "request_ids past add, which refuses it)"
        )
    header = _pack(
        [
            "plan",
            WIRE_VERSION,
            plan.step,
            plan.stop,
            utf8_text(plan.error) if isinstance(plan.error, str) else plan.error,
            joined,
            len(new),
            len(cached),
            so.finished_req_ids,
            so.preempted_req_ids,
            so.sync_load_req_ids,
            plan.loading_req_ids,
            plan.saving_req_ids,
            meta,
        ],
        "plan",
    )
    cols: list[array] = []
    for name, batch in (("new_requests", new), ("cached_requests", cached)):
        try:
            cols += batch.columns()
        except ValueError as exc:  # rank 0 would run rows the others do not read
            raise WireError(f"plan.scheduler_output.{name}: {exc}") from None
    if _SWAP:
        cols = [_swapped(c) for c in cols]
    # Arrays are bytes-like: the join is their only copy.
    return b"".join([_FRAME.pack(_PLAN_MAGIC, len(header)), header, *cols])


def decode_plan(data: bytes, *, sent: Plan | None = None) -> Plan:
    """The plan in `data`. The rank that encoded it may pass the plan it `sent`: its request
    batches are then reused, not decoded again (encoding them is lossless), while every
    other field, the connector metadata included, still comes from the bytes."""
    # Every step's critical path runs through here on every rank but 0, on caches gone
    # cold since the last step: the well-formed case is a few large calls, and the checks
    # that name a problem run only once something is wrong.
    try:
        magic, header_len = _FRAME.unpack_from(data)
    except (struct.error, TypeError):
        magic = header_len = None
    if magic != _PLAN_MAGIC:
        _unpack(data, "plan", _PLAN_FIELDS)  # names what it is: not bytes, an older version
        raise WireError("plan: bytes do not start with a plan frame")
    view = memoryview(data)
    columns_at = _FRAME.size + header_len
    if columns_at > len(view):
        raise WireError(f"plan: header of {header_len} bytes runs past the {len(view)}-byte frame")
    msg = _unpack(view[_FRAME.size : columns_at], "plan", _PLAN_FIELDS)
    if tuple(map(type, msg)) != _PLAN_TYPES:  # the common case passes on one comparison
        _check_fields(msg, "plan", _PLAN_FIELDS)
    (
        _,
        _,
        step,
        stop,
        error,
        joined,
        num_new,
        num_cached,
        finished,
        preempted,
        sync_loading,
        loading,
        saving,
        meta,
    ) = msg
    if sent is None:
        new, cached = _decode_batches(joined, num_new, num_cached, view[columns_at:])
    else:
        new = sent.scheduler_output.new_requests
        cached = sent.scheduler_output.cached_requests
    id_lists = (finished, preempted, sync_loading, loading, saving)
    if any(id_lists):
        for (key, _), ids in zip(_PLAN_FIELDS[8:13], id_lists):
            _str_list(ids, f"plan.{key}")
    try:
        meta = msgpack.unpackb(meta, strict_map_key=False)
    except Exception as exc:
        error = WireError(
            "plan: the connector metadata (build_connector_meta's result) does not decode "
            f"({type(exc).__name__}: {exc}); it must be plain msgpack data, whose map keys "
            "decode as hashable values (str, int, bytes): a tuple key arrives as a list"
        )
        error.step = step
        raise error from exc
    return Plan(
        step,
        SchedulerOutput(step, new, cached, finished, preempted, sync_loading),
        loading,
        saving,
        meta,
        stop,
        error,
    )


def _decode_batches(
    joined: str, num_new: int, num_cached: int, columns: memoryview
) -> tuple[RequestBatch, RequestBatch]:
    if num_new < 0 or num_cached < 0:
        raise WireError(f"plan: negative request count ({num_new} new, {num_cached} cached)")
    ids = _split_ids(joined, num_new + num_cached, "plan.request_ids")
    if len(columns) % 4:
        raise WireError(f"plan.columns: {len(columns)} bytes is not a whole number of int32")
    ints = _int32_array(columns, "plan.columns")
    unsigned = memoryview(ints).cast("B").cast("I")  # shared by both batches' count checks
    try:
        new, end = RequestBatch.take_columns(ids[:num_new], ints, 0, unsigned)
        cached, end = RequestBatch.take_columns(ids[num_new:], ints, end, unsigned)
    except ValueError as exc:
        raise WireError(f"plan.columns: do not match the requests ({exc})") from None
    if 4 * end != len(columns):
        raise WireError(
            f"plan.columns: {len(columns) // 4 - end} ints left over after the requests"
        )
    return new, cached


# -- report -----------------------------------------------------------------------------
_REPORT_FIELDS: tuple[tuple[str, Any], ...] = (
    ("type", str),
    ("version", int),
    ("rank", int),
    ("step", int),
    ("saved", list),
    ("loaded", list),
    ("failed", bytes),
    ("error", (str, type(None))),
    ("worker_meta", object),  # any msgpack data
)
# The common report: error None, worker_meta None.
_REPORT_TYPES = tuple(
    t if isinstance(t, type) and t is not object else type(None) for _, t in _REPORT_FIELDS
)


def encode_report(report: Report) -> bytes:
    try:
        saved, loaded = list(report.saved), list(report.loaded)
        failed = sorted(report.failed_blocks) if report.failed_blocks else []
    except TypeError as exc:  # ids not in a collection, or block ids that do not compare
        raise WireError(f"report cannot be encoded: {exc}") from exc
    msg = [
        "report",
        WIRE_VERSION,
        report.rank,
        report.step,
        saved,
        loaded,
        pack_ids(failed) if failed else b"",
        utf8_text(report.error) if isinstance(report.error, str) else report.error,
        report.worker_meta,
    ]
    return _pack(msg, "report")


def decode_report(data: bytes) -> Report:
    msg = _unpack(data, "report", _REPORT_FIELDS)
    if tuple(map(type, msg)) != _REPORT_TYPES:
        _check_fields(msg, "report", _REPORT_FIELDS)
    _, _, rank, step, saved, loaded, failed, error, worker_meta = msg
    return Report(
        rank=rank,
        step=step,
        saved=_str_list(saved, "report.saved"),
        loaded=_str_list(loaded, "report.loaded"),
        failed_blocks=_block_ids(failed, "report.failed") if failed else [],
        error=error,
        worker_meta=worker_meta,
    )


def _block_ids(data: Any, what: str) -> list[int]:
    ids = unpack_ids(data, what)
    if ids and min(ids) < 0:
        raise WireError(f"{what}: negative block id {min(ids)}")
    return ids
