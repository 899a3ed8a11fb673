"""RequestBatch: a column store that must behave exactly like a list of RequestData."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdist.api.step import RequestBatch, RequestData, SchedulerOutput

ids = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20)
rows = st.lists(
    st.builds(
        RequestData,
        st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=6),
        ids,
        ids,
        st.integers(0, 10**6),
        st.integers(0, 99),
    ),
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(rows)
def test_batch_is_the_list_it_was_built_from(data: list[RequestData]) -> None:
    batch = RequestBatch(data)
    assert len(batch) == len(data)
    assert list(batch) == data
    assert batch == data
    assert [batch[i] for i in range(-len(data), len(data))] == data + data
    assert list(batch[1:-1]) == data[1:-1]
    assert [
        RequestData(rid, t.tolist(), b.tolist(), p, n) for rid, p, n, t, b in batch.rows()
    ] == data
    assert batch.total_scheduled_tokens == sum(r.num_scheduled_tokens for r in data)
    assert RequestBatch.from_columns(list(batch.request_ids), _concat(batch)) == batch


def _concat(batch: RequestBatch) -> array:
    out = array("i")
    for col in batch.columns():
        out += col
    return out


def test_add_copies_arrays_and_lists_alike() -> None:
    a, b = RequestBatch(), RequestBatch()
    toks = array("i", [5, 6, 7])
    a.add("r", toks, array("i", [1]), 0, 3)
    b.add("r", [5, 6, 7], [1], 0, 3)
    toks[0] = 99  # the batch holds a copy
    assert a == b and a[0].new_tokens == [5, 6, 7]


def test_rows_hand_out_copies() -> None:
    batch = RequestBatch([RequestData("r", [1, 2], [3], 0, 2)])
    ((_, _, _, toks, _),) = batch.rows()
    toks[0] = 42
    assert batch[0].new_tokens == [1, 2]


@pytest.mark.parametrize(
    "tokens, blocks, pos, n",
    [([2**31], [], 0, 1), ([1], ["x"], 0, 1), ([1], [2], 2**40, 1), ([1], [2], 0, None)],
)
def test_bad_row_is_rejected_and_the_batch_is_unchanged(tokens, blocks, pos, n) -> None:
    batch = RequestBatch([RequestData("ok", [1], [1], 0, 1)])
    before = [list(c) for c in batch.columns()]
    with pytest.raises((TypeError, OverflowError), match="request 'bad'"):
        batch.add("bad", tokens, blocks, pos, n)
    assert [list(c) for c in batch.columns()] == before
    assert batch.request_ids == ["ok"]


@settings(max_examples=100, deadline=None)
@given(rows, rows)
def test_add_rows_is_add_row_by_row(first: list[RequestData], data: list[RequestData]) -> None:
    """Rows given field by field, appended to a batch holding rows already, make the batch
    that adding them one by one makes."""
    one_by_one, at_once = RequestBatch(), RequestBatch()
    for r in first + data:
        one_by_one.append(r)
    for r in first:
        at_once.append(r)
    at_once.add_rows(
        [r.request_id for r in data],
        [array("i", r.new_tokens) for r in data],  # arrays and lists alike
        [r.new_block_ids for r in data],
        [r.computed_position for r in data],
        [r.num_scheduled_tokens for r in data],
    )
    assert at_once._columns() == one_by_one._columns()
    assert at_once.request_ids == one_by_one.request_ids
    assert list(at_once) == first + data


@pytest.mark.parametrize(
    "tokens, blocks, pos, n",
    [([2**31], [], 0, 1), ([1], ["x"], 0, 1), ([1], [2], 2**40, 1), ([1], [2], 0, None)],
)
def test_add_rows_refuses_a_bad_row_by_name_and_adds_none(tokens, blocks, pos, n) -> None:
    batch = RequestBatch([RequestData("ok", [1], [1], 0, 1)])
    before = [list(c) for c in batch.columns()]
    with pytest.raises((TypeError, OverflowError), match="request 'bad'"):
        batch.add_rows(
            ["fine", "bad", "after"], [[1], tokens, [3]], [[], blocks, []], [0, pos, 0], [1, n, 1]
        )
    assert [list(c) for c in batch.columns()] == before
    assert batch.request_ids == ["ok"]
    with pytest.raises(TypeError, match="without NUL"):
        batch.add_rows(["a\0b"], [[1]], [[]], [0], [1])
    with pytest.raises(ValueError, match="2 request ids, 2 token lists, 1 block lists"):
        batch.add_rows(["a", "b"], [[1], [2]], [[]], [0, 0], [1, 1])
    assert batch.request_ids == ["ok"]


def test_add_rows_takes_iterables_without_a_length() -> None:
    """As `add` does: token and block ids from generators."""
    batch = RequestBatch()
    batch.add_rows(["r"], [(t for t in (4, 5))], [iter([7])], [3], [2])
    assert list(batch) == [RequestData("r", [4, 5], [7], 3, 2)]


def test_request_id_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="request_id must be a str"):
        RequestBatch().add(7, [1], [], 0, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ids, ints, message",
    [
        (["a"], [0, 1], "cannot hold the counts"),
        (["a"], [0, 1, 2, 0, 5], "need 6"),
        (["a"], [0, 1, -1, 0], "negative"),
        (["a"], [0, 1, -1, 1, 7], "negative"),  # the totals alone would match
        (["a", "b"], [0, 0, 1, 1, 1, 0, 0, 0, 9, 9], "need 9"),
    ],
)
def test_from_columns_checks_the_counts(ids, ints, message) -> None:
    with pytest.raises(ValueError, match=message):
        RequestBatch.from_columns(ids, array("i", ints))


@pytest.mark.parametrize("ints", [array("l", [0, 2, 1, 1, 111, 222]), [0, 1, 0, 0]])
def test_from_columns_takes_int32_columns_only(ints) -> None:
    """Counts read as uint32 from an array of another width (array('l')) described
    other rows than its slices held: a batch contradicting itself, where a TypeError
    is due."""
    with pytest.raises(TypeError, match=r"must be an array\('i'\) of int32"):
        RequestBatch.from_columns(["a"], ints)


def test_index_errors_match_a_list() -> None:
    batch = RequestBatch([RequestData("r", [1], [], 0, 1)])
    with pytest.raises(IndexError):
        batch[1]
    with pytest.raises(IndexError):
        batch[-2]


def test_scheduler_output_holds_batches() -> None:
    rd = RequestData("r", [1, 2], [0], 0, 2)
    so = SchedulerOutput(step=1, new_requests=[rd], cached_requests=RequestBatch())
    assert isinstance(so.new_requests, RequestBatch)
    assert so.all_requests() == [rd]
    assert so.num_scheduled_tokens == 2
    batch = RequestBatch([rd])
    assert SchedulerOutput(new_requests=batch).new_requests is batch


def test_nul_in_request_id_is_refused() -> None:
    """Ids travel NUL-joined on the wire, so a NUL inside one is refused when added."""
    with pytest.raises(TypeError, match="without NUL"):
        RequestBatch().add("a\0b", [1], [], 0, 1)
