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
from itertools import chain
from typing import Any

import msgpack

from kvdist.api.types import RequestData, SchedulerOutput

WIRE_VERSION = 2
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
    if not isinstance(data, bytes) or len(data) % 4:
        raise WireError(f"{what}: expected packed int32 bytes, got {type(data).__name__}")
    arr = array("i")
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return arr.tolist()


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


def _field(msg: dict[str, Any], key: str, types: type | tuple[type, ...], kind: str) -> Any:
    if key not in msg:
        raise WireError(f"{kind}: missing field {key!r}")
    value = msg[key]
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise WireError(f"{kind}: field {key!r} has type {type(value).__name__}")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WireError(f"{what}: expected a list of strings")
    return value


def _encode_requests(reqs: list[RequestData]) -> bytes:
    # Columns, not one entry per request, all in one int32 array: positions, scheduled
    # counts, token counts, block counts (one value per request each), then every token,
    # then every block id. A step with hundreds of running requests is one pack call.
    ints = [r.computed_position for r in reqs]
    ints += [r.num_scheduled_tokens for r in reqs]
    ints += [len(r.new_tokens) for r in reqs]
    ints += [len(r.new_block_ids) for r in reqs]
    ints += chain.from_iterable(r.new_tokens for r in reqs)
    ints += chain.from_iterable(r.new_block_ids for r in reqs)
    return pack_ids(ints)


def _decode_requests(ids: list[str], data: bytes) -> list[RequestData]:
    ints = unpack_ids(data, "plan.ints")
    r = len(ids)
    pos, n, nt, nb = ints[:r], ints[r : 2 * r], ints[2 * r : 3 * r], ints[3 * r : 4 * r]
    num_tokens = sum(nt)
    if len(nb) != r or len(ints) != 4 * r + num_tokens + sum(nb) or min(nt + nb, default=0) < 0:
        raise WireError("plan: request columns do not match the number of requests")
    out = []
    ti, bi = 4 * r, 4 * r + num_tokens
    for rid, p, k, a, c in zip(ids, pos, n, nt, nb):
        toks = [ints[ti]] if a == 1 else ints[ti : ti + a]
        out.append(RequestData(rid, toks, ints[bi : bi + c] if c else [], p, k))
        ti += a
        bi += c
    return out


def encode_plan(plan: Plan) -> bytes:
    so = plan.scheduler_output
    reqs = so.new_requests + so.cached_requests
    # The metadata is packed on its own so that a failure names the connector.
    meta = _pack(plan.connector_meta, "connector metadata (build_connector_meta's result)")
    msg = {
        "t": "plan",
        "v": WIRE_VERSION,
        "step": plan.step,
        "ids": [r.request_id for r in reqs],
        "num_new": len(so.new_requests),
        "ints": _encode_requests(reqs),
        "finished": so.finished_req_ids,
        "preempted": so.preempted_req_ids,
        "loading": plan.loading_req_ids,
        "saving": plan.saving_req_ids,
        "stop": plan.stop,
        "error": plan.error,
        "meta": meta,
    }
    return _pack(msg, "plan")


def decode_plan(data: bytes) -> Plan:
    msg = _unpack(data, "plan")
    ids = _str_list(_field(msg, "ids", list, "plan"), "plan.ids")
    num_new = _field(msg, "num_new", int, "plan")
    if not 0 <= num_new <= len(ids):
        raise WireError(f"plan: num_new {num_new} out of range for {len(ids)} requests")
    reqs = _decode_requests(ids, _field(msg, "ints", bytes, "plan"))
    step = _field(msg, "step", int, "plan")
    error = msg.get("error")
    if error is not None and not isinstance(error, str):
        raise WireError("plan: field 'error' must be a string or nil")
    try:
        meta = msgpack.unpackb(_field(msg, "meta", bytes, "plan"), raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(
            f"plan: malformed connector metadata ({type(exc).__name__}: {exc})"
        ) from exc
    so = SchedulerOutput(
        step=step,
        new_requests=reqs[:num_new],
        cached_requests=reqs[num_new:],
        finished_req_ids=_str_list(_field(msg, "finished", list, "plan"), "plan.finished"),
        preempted_req_ids=_str_list(_field(msg, "preempted", list, "plan"), "plan.preempted"),
    )
    return Plan(
        step=step,
        scheduler_output=so,
        loading_req_ids=_str_list(_field(msg, "loading", list, "plan"), "plan.loading"),
        saving_req_ids=_str_list(_field(msg, "saving", list, "plan"), "plan.saving"),
        connector_meta=meta,
        stop=_field(msg, "stop", bool, "plan"),
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


def decode_report(data: bytes) -> Report:
    msg = _unpack(data, "report")
    error = msg.get("error")
    if error is not None and not isinstance(error, str):
        raise WireError("report: field 'error' must be a string or nil")
    return Report(
        rank=_field(msg, "rank", int, "report"),
        step=_field(msg, "step", int, "report"),
        saved=_str_list(_field(msg, "saved", list, "report"), "report.saved"),
        loaded=_str_list(_field(msg, "loaded", list, "report"), "report.loaded"),
        failed_blocks=unpack_ids(_field(msg, "failed", bytes, "report"), "report.failed"),
        error=error,
    )
