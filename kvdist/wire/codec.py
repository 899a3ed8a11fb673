"""The msgpack codec for the two messages that cross ranks every step.

`Plan` (rank 0 → all, one broadcast) and `Report` (all → all, one allgather). Each message
is a msgpack map with a type tag `t` and a version `v`; fields are checked on decode and
any problem raises `WireError` naming it. Arrays of ids (tokens, blocks) travel as packed
little-endian int32 bytes, not msgpack lists, and the requests of a plan travel as
columns (one array per field, all requests concatenated). No pickle: connector metadata must be plain
msgpack data (None, bool, int, float, str, bytes, list, dict).
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvdist.api.step import RequestBatch, SchedulerOutput

WIRE_VERSION = 3
_SWAP = sys.byteorder != "little"  # the wire is little-endian
assert array("i").itemsize == 4, "kvdist packs ids as 4-byte C ints"


class WireError(ValueError):
    """Bytes that are not a valid kvdist message of this version, or data that cannot be
    encoded as one."""


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
    """True: the engine loop ends after this message (no forward pass)."""
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
    if not isinstance(data, bytes) or len(data) % 4:
        raise WireError(f"{what}: expected packed int32 bytes, got {type(data).__name__}")
    arr = array("i")
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return arr


def _pack(obj: Any, what: str) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"{what} cannot be encoded as msgpack: {exc}") from exc


def _unpack(data: bytes, kind: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{kind}: expected bytes, got {type(data).__name__}")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"{kind}: malformed msgpack bytes ({type(exc).__name__}: {exc})") from exc
    return _check_header(msg, kind)


def _check_header(msg: Any, kind: str) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise WireError(f"{kind}: expected a map, got {type(msg).__name__}")
    if msg.get("t") != kind:
        raise WireError(f"expected a {kind!r} message, got type {msg.get('t')!r}")
    if msg.get("v") != WIRE_VERSION:
        raise WireError(
            f"{kind}: wire version {msg.get('v')!r}, this kvdist speaks {WIRE_VERSION}; "
            "every rank must run the same kvdist version"
        )
    return msg


def _fields(msg: dict[str, Any], kind: str, schema: tuple[tuple[str, type], ...]) -> list[Any]:
    """The values of the `(name, type)` fields of `schema`, each checked to be present and
    of exactly that type (a bool does not pass for an int), and the optional `error`
    string last."""
    try:
        values = [msg[key] for key, _ in schema]
    except KeyError as exc:
        raise WireError(f"{kind}: missing field {exc.args[0]!r}") from None
    for (key, want), value in zip(schema, values):
        if type(value) is not want:
            raise WireError(f"{kind}: field {key!r} has type {type(value).__name__}")
    error = msg.get("error")
    if error is not None and not isinstance(error, str):
        raise WireError(f"{kind}: field 'error' must be a string or nil")
    return [*values, error]


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not set(map(type, value)) <= {str}:
        raise WireError(f"{what}: expected a list of strings")
    return value


def _encode_batch(batch: RequestBatch) -> list[Any]:
    # A batch is already columns: its six int32 columns travel as one blob.
    cols = batch.columns()
    if _SWAP:
        cols = tuple(_swapped(c) for c in cols)
    # Request ids travel as one NUL-joined string (RequestBatch refuses NUL in an id):
    # one object to pack and one split, instead of one msgpack string per request.
    return ["\0".join(batch.request_ids), len(batch), b"".join([c.tobytes() for c in cols])]


def _decode_batch(value: Any, what: str) -> RequestBatch:
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not isinstance(value[0], str)
        or type(value[1]) is not int
    ):
        raise WireError(f"{what}: expected [NUL-joined request ids, count, packed columns]")
    joined, count, data = value
    ids = joined.split("\0") if count else []
    if len(ids) != count:
        raise WireError(f"{what}: {len(ids)} request ids for {count} requests")
    ints = _int32_array(data, f"{what} columns")
    try:
        return RequestBatch.from_columns(ids, ints)
    except ValueError as exc:
        raise WireError(
            f"{what}: request columns do not match the number of requests ({exc})"
        ) from None


def _swapped(col: array) -> array:
    out = array("i", col)
    out.byteswap()
    return out


def encode_plan(plan: Plan) -> bytes:
    so = plan.scheduler_output
    # The metadata is packed on its own so that a failure names the connector.
    meta = _pack(plan.connector_meta, "connector metadata (build_connector_meta's result)")
    msg = {
        "t": "plan",
        "v": WIRE_VERSION,
        "step": plan.step,
        "new": _encode_batch(RequestBatch.of(so.new_requests)),
        "cached": _encode_batch(RequestBatch.of(so.cached_requests)),
        "finished": so.finished_req_ids,
        "preempted": so.preempted_req_ids,
        "loading": plan.loading_req_ids,
        "saving": plan.saving_req_ids,
        "stop": plan.stop,
        "error": plan.error,
        "meta": meta,
    }
    return _pack(msg, "plan")


_PLAN_SCHEMA = (
    ("step", int),
    ("new", list),
    ("cached", list),
    ("finished", list),
    ("preempted", list),
    ("loading", list),
    ("saving", list),
    ("stop", bool),
    ("meta", bytes),
)


def decode_plan(data: bytes, *, sent: Plan | None = None) -> Plan:
    """The plan in `data`. The rank that encoded it may pass the plan it `sent`: its request
    batches are then reused, not decoded again (encoding them is lossless), while every
    other field, the connector metadata included, still comes from the bytes."""
    msg = _unpack(data, "plan")
    fields = _fields(msg, "plan", _PLAN_SCHEMA)
    step, new, cached, finished, preempted, loading, saving, stop, meta, error = fields
    if sent is None:
        new = _decode_batch(new, "plan.new")
        cached = _decode_batch(cached, "plan.cached")
    else:
        new = sent.scheduler_output.new_requests
        cached = sent.scheduler_output.cached_requests
    for (key, _), ids in zip(_PLAN_SCHEMA[3:7], (finished, preempted, loading, saving)):
        _str_list(ids, f"plan.{key}")
    try:
        meta = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except Exception as exc:
        raise WireError(
            f"plan: malformed connector metadata ({type(exc).__name__}: {exc})"
        ) from exc
    return Plan(
        step=step,
        scheduler_output=SchedulerOutput(step, new, cached, finished, preempted),
        loading_req_ids=loading,
        saving_req_ids=saving,
        connector_meta=meta,
        stop=stop,
        error=error,
    )


def encode_report(report: Report) -> bytes:
    return _pack(
        {
            "t": "report",
            "v": WIRE_VERSION,
            "rank": report.rank,
            "step": report.step,
            "saved": list(report.saved),
            "loaded": list(report.loaded),
            "failed": pack_ids(sorted(report.failed_blocks)),
            "error": report.error,
        },
        "report",
    )


_REPORT_SCHEMA = (
    ("rank", int),
    ("step", int),
    ("saved", list),
    ("loaded", list),
    ("failed", bytes),
)


def decode_report(data: bytes) -> Report:
    msg = _unpack(data, "report")
    rank, step, saved, loaded, failed, error = _fields(msg, "report", _REPORT_SCHEMA)
    return Report(
        rank=rank,
        step=step,
        saved=_str_list(saved, "report.saved"),
        loaded=_str_list(loaded, "report.loaded"),
        failed_blocks=unpack_ids(failed, "report.failed") if failed else [],
        error=error,
    )
