"""The wire codec: round trips, and a clear WireError for every kind of bad bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvdist
from kvdist.api.types import RequestData, SchedulerOutput
from kvdist.wire.codec import (
    _FRAME,
    _PLAN_FIELDS,
    _PLAN_MAGIC,
    _REPORT_FIELDS,
    WIRE_VERSION,
    Plan,
    Report,
    WireError,
    decode_plan,
    decode_report,
    encode_plan,
    encode_report,
)

ids = st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=40)
req = st.builds(
    RequestData,
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=8),
    ids,
    ids,
    st.integers(0, 10**6),
    st.integers(0, 10**4),
)
meta = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=5)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(req, max_size=5),
    st.lists(req, max_size=5),
    st.lists(st.text(max_size=6), max_size=4),
    meta,
)
def test_plan_round_trip(new, cached, finished, connector_meta) -> None:
    """Whatever the plan holds comes back equal; a failure means ranks would see other data."""
    plan = Plan(
        step=3,
        scheduler_output=SchedulerOutput(
            step=3,
            new_requests=new,
            cached_requests=cached,
            finished_req_ids=finished,
            sync_load_req_ids=finished[::-1],
        ),
        loading_req_ids=finished[:1],
        saving_req_ids=finished[1:],
        connector_meta=connector_meta,
    )
    got = decode_plan(encode_plan(plan))
    assert got == plan
    assert list(got.scheduler_output.new_requests) == new
    assert list(got.scheduler_output.cached_requests) == cached


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=6)), st.lists(st.text(max_size=6)), ids)
def test_report_round_trip(saved, loaded, failed) -> None:
    r = Report(rank=1, step=2, saved=saved, loaded=loaded, failed_blocks=sorted(failed))
    assert decode_report(encode_report(r)) == r


@settings(max_examples=100, deadline=None)
@given(meta)
def test_report_round_trip_with_worker_meta(worker_meta) -> None:
    """Any plain data a worker reports to rank 0 comes back as it was (bytes as bytes)."""
    r = Report(rank=0, step=5, saved=["a"], worker_meta=worker_meta)
    assert decode_report(encode_report(r)) == r


def test_a_negative_failed_block_is_a_wire_error() -> None:
    data = encode_report(Report(rank=1, step=2, failed_blocks=[3, -8]))
    with pytest.raises(WireError, match="report.failed: negative block id -8"):
        decode_report(data)


@pytest.mark.parametrize(
    "fields", [{"failed_blocks": [1, "a"]}, {"failed_blocks": 5}, {"saved": None}, {"loaded": 3}]
)
def test_a_report_that_cannot_be_encoded_is_a_wire_error(fields) -> None:
    """WireError covers data that cannot be encoded: these raised a bare TypeError (from
    sorting the block ids, or listing the ids)."""
    with pytest.raises(WireError, match="report cannot be encoded"):
        encode_report(Report(rank=0, step=1, **fields))


def test_ids_travel_packed() -> None:
    """Id arrays are packed int32 bytes, not msgpack lists (4 bytes a token)."""
    plan = Plan(
        step=1,
        scheduler_output=SchedulerOutput(
            step=1, new_requests=[RequestData("r", list(range(1000)), list(range(100)), 0, 1000)]
        ),
    )
    assert len(encode_plan(plan)) < 1100 * 4 + 200


def _ints(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "little", signed=True) for v in values)


def _frame(header: list, columns: bytes = b"") -> bytes:
    packed = msgpack.packb(header)
    return _FRAME.pack(_PLAN_MAGIC, len(packed)) + packed + columns


def _empty_plan() -> list:
    """The header of a valid empty plan, as a list of fields."""
    data = encode_plan(Plan(step=1, scheduler_output=SchedulerOutput(step=1)))
    return msgpack.unpackb(data[_FRAME.size :])


def _plan_with(columns: bytes = b"", **fields) -> bytes:
    """A valid empty plan's bytes with some header fields (by name) replaced."""
    msg = _empty_plan()
    names = [key for key, _ in _PLAN_FIELDS]
    for key, value in fields.items():
        msg[names.index(key)] = value
    return _frame(msg, columns)


def _plan_with_new(ids: str, count: int, columns: bytes) -> bytes:
    return _plan_with(columns, request_ids=ids, num_new=count)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (msgpack.packb({"a": 1}), r"expected an array \[type, version"),
        (msgpack.packb([1, 2]), "expected a 'plan' message, got type 1"),
        (msgpack.packb({"t": "report", "v": WIRE_VERSION}), "expected a 'plan'"),
        (msgpack.packb({"t": "plan", "v": 3}), "wire version 3"),  # an older kvdist
        (msgpack.packb(["plan", 99]), "wire version 99"),
        (msgpack.packb(["plan", WIRE_VERSION]), f"2 fields, version {WIRE_VERSION} has 14"),
        (msgpack.packb(_empty_plan()), "do not start with a plan frame"),
        (_FRAME.pack(_PLAN_MAGIC, 99) + b"\x90", "header of 99 bytes runs past"),
        (_frame(["plan", WIRE_VERSION]), "2 fields"),
        (_plan_with_new("a", 1, _ints(0, 1)), "cannot hold the counts of 1"),
        (_plan_with_new("a", 1, _ints(0, 1, 1, 0)), "need 5"),
        (_plan_with_new("a", 1, _ints(0, 1, -1, 0)), "negative"),
        (_plan_with_new("a", 1, _ints(0, 1, 0, 0, 7)), "1 ints left over"),
        (_plan_with_new("a", 1, b"\x01\x00"), "not a whole number of int32"),
        (_plan_with_new("a", -1, b""), "negative request count"),
        (_plan_with_new("a\0b", 1, b""), "2 request ids for 1 requests"),
        (_plan_with_new("a", 0, b""), "1 request ids for 0 requests"),  # was dropped
        (_plan_with(request_ids=7), "field 'request_ids' has type int"),
        (
            _plan_with(meta=b"\xc1"),
            "the connector metadata .build_connector_meta.s result. does not decode",
        ),
    ],
)
def test_malformed_plan_bytes(data: bytes, message: str) -> None:
    """Bad bytes raise WireError naming the problem (never a KeyError or a silent default)."""
    with pytest.raises(WireError, match=message):
        decode_plan(data)


def test_bad_field_types_rejected() -> None:
    good = msgpack.unpackb(encode_report(Report(rank=0, step=1)))
    names = [key for key, _ in _REPORT_FIELDS]
    for key, value in [("rank", "0"), ("saved", [1]), ("failed", [1, 2]), ("step", True)]:
        bad = list(good)
        bad[names.index(key)] = value
        with pytest.raises(WireError, match=key):
            decode_report(msgpack.packb(bad))


def test_unencodable_metadata_names_connector() -> None:
    plan = Plan(step=1, scheduler_output=SchedulerOutput(step=1), connector_meta={"x": {1, 2}})
    with pytest.raises(WireError, match="connector metadata"):
        encode_plan(plan)


def test_sender_reuses_its_batches_and_reads_the_rest() -> None:
    """The encoding rank may skip decoding its own batches; everything else still comes
    from the bytes, so its metadata is exactly what the other ranks bind."""
    so = SchedulerOutput(step=2, new_requests=[RequestData("r", [1, 2], [0], 0, 2)])
    plan = Plan(step=2, scheduler_output=so, connector_meta={"k": (1, 2)}, saving_req_ids=["x"])
    data = encode_plan(plan)
    mine, theirs = decode_plan(data, sent=plan), decode_plan(data)
    assert mine == theirs
    assert mine.scheduler_output.new_requests is so.new_requests
    assert mine.connector_meta == {"k": [1, 2]}  # the tuple became a list everywhere


@pytest.mark.parametrize(
    "edit, names",
    [
        (lambda b: b.tokens.append(12), "token counts summing to 2 for 3 tokens"),
        (lambda b: b.block_ids.pop(), "block counts summing to 1 for 0 block ids"),
        (lambda b: b.positions.append(0), "2 positions"),
        (lambda b: (b.token_counts.__setitem__(0, -1), b.tokens.extend([0] * 3)), "summing to -1"),
    ],
)
def test_columns_edited_past_the_rows_are_refused_by_the_sender(edit, names) -> None:
    """Rank 0 reuses the batches it sent: columns edited in place so that they no longer
    describe the rows would run one batch on rank 0 and another (or none) on the others.
    Encoding refuses them, naming the batch and what is off."""
    so = SchedulerOutput(step=1, cached_requests=[RequestData("a", [10, 11], [5], 0, 2)])
    edit(so.cached_requests)
    with pytest.raises(WireError, match="plan.scheduler_output.cached_requests: the batch's"):
        encode_plan(Plan(step=1, scheduler_output=so))
    with pytest.raises(WireError, match=names):
        encode_plan(Plan(step=1, scheduler_output=so))


def test_a_nul_edited_into_a_request_id_is_refused_by_the_sender() -> None:
    """`add` refuses a NUL in a request id (ids travel NUL-joined); one set in a batch's
    request_ids past it used to encode: rank 0, which reuses its batches, ran the step with
    one request while every other rank failed to split the ids into one."""
    so = SchedulerOutput(step=1, new_requests=[RequestData("a", [1], [0], 0, 1)])
    so.new_requests.request_ids[0] = "a\0b"
    with pytest.raises(WireError, match="a request id holds a NUL character"):
        encode_plan(Plan(step=1, scheduler_output=so))
    so.new_requests.request_ids[0] = ""  # an empty id is fine, alone or not
    so.cached_requests.add("", [], [], 0, 0)
    assert list(
        decode_plan(encode_plan(Plan(step=1, scheduler_output=so))).scheduler_output.cached_requests
    ) == list(so.cached_requests)


@pytest.mark.parametrize(
    "key, value",
    [("step", True), ("num_cached", 1.0), ("saving", [1]), ("sync_loading", [b"x"]), ("error", 3)],
)
def test_bad_plan_field_types_rejected(key, value) -> None:
    with pytest.raises(WireError, match=key):
        decode_plan(_plan_with(**{key: value}))


def test_both_batches_share_one_id_string_and_one_blob() -> None:
    """The new batch's rows come first in both; each batch gets back exactly its rows."""
    so = SchedulerOutput(
        step=1,
        new_requests=[RequestData("n0", [1, 2, 3], [7], 0, 3)],
        cached_requests=[RequestData("c0", [4], [], 5, 1), RequestData("c1", [], [8, 9], 2, 0)],
    )
    data = encode_plan(Plan(step=1, scheduler_output=so))
    _, header_len = _FRAME.unpack_from(data)
    msg = msgpack.unpackb(data[_FRAME.size : _FRAME.size + header_len])
    names = [key for key, _ in _PLAN_FIELDS]
    assert msg[names.index("request_ids")] == "n0\0c0\0c1"
    # The columns follow the header, raw: 4 counts per row, then tokens and blocks.
    assert len(data) - _FRAME.size - header_len == 4 * (4 + 3 + 1 + 8 + 1 + 2)
    got = decode_plan(data).scheduler_output
    assert list(got.new_requests) == list(so.new_requests)
    assert list(got.cached_requests) == list(so.cached_requests)


def _sample_plan() -> bytes:
    so = SchedulerOutput(
        step=7,
        new_requests=[RequestData("n0", list(range(40)), [3, 4, 5], 0, 40)],
        cached_requests=[
            RequestData(f"c{i}", [i], [i] if i % 3 else [], 50 + i, 1) for i in range(6)
        ],
        finished_req_ids=["f0"],
    )
    plan = Plan(step=7, scheduler_output=so, saving_req_ids=["f0"], connector_meta={"k": b"v"})
    return encode_plan(plan)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_plan_bytes_fail_cleanly(data) -> None:
    """Truncated or altered plan bytes either still decode to a consistent plan or raise
    WireError: never another exception, never rows that disagree with their columns."""
    raw = bytearray(_sample_plan())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] = data.draw(st.integers(0, 255), label="byte")
    try:
        plan = decode_plan(bytes(raw))
    except WireError:
        return
    for batch in (plan.scheduler_output.new_requests, plan.scheduler_output.cached_requests):
        rows = list(batch.rows())
        assert sum(len(t) for *_, t, _ in rows) == len(batch.tokens)
        assert sum(len(b) for *_, b in rows) == len(batch.block_ids)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_report_bytes_fail_cleanly(data) -> None:
    raw = bytearray(encode_report(Report(rank=1, step=3, saved=["a", "b"], failed_blocks=[4, 9])))
    i = data.draw(st.integers(0, len(raw) - 1), label="at")
    raw[i] = data.draw(st.integers(0, 255), label="byte")
    try:
        report = decode_report(bytes(raw[: data.draw(st.integers(i, len(raw)), label="length")]))
    except WireError:
        return
    assert isinstance(report.rank, int) and all(isinstance(r, str) for r in report.saved)


def test_packed_ids_of_a_wrong_length_say_so() -> None:
    """`kvdist.unpack_ids` of bytes that are not whole int32s names their length: a
    failure means the error says only "got bytes", the type it was given and expects."""
    with pytest.raises(WireError, match="got 3 bytes, not a multiple of 4"):
        kvdist.unpack_ids(b"abc")
    with pytest.raises(WireError, match="got list"):
        kvdist.unpack_ids([1, 2])  # type: ignore[arg-type]
    assert kvdist.unpack_ids(kvdist.pack_ids([1, 2, 3])) == [1, 2, 3]
