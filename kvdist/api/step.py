"""What one step schedules: `RequestData` rows, held in a `RequestBatch`, and the
`SchedulerOutput` that carries them.

A step at a few hundred running requests is mostly decode rows of one token each; holding
them as one `RequestData` object per row made building, sending and reading the step cost
a Python object per request at every stage. A batch holds the same data as int32 columns
(`array('i')`): positions, scheduled counts, token and block counts, and every row's tokens
and blocks concatenated. Appending a row is a few appends; the wire form is the columns'
bytes; reading a received batch is one copy. It is still a sequence of `RequestData`:
indexing and iterating build the rows on demand (with list fields), so connector code
written against `list[RequestData]` works unchanged. Hot loops use `rows()` instead.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, overload


@dataclass(slots=True)
class RequestData:
    """What one step schedules for one request (a delta: only what the ranks do not know).

    For a request new to the ranks, `new_tokens` is its whole known token list (prompt, and
    outputs when it is resumed after preemption) and `new_block_ids` its whole block table.
    For a request the ranks already hold, they are the tokens sampled since the last step
    and the blocks allocated since then. The step computes the tokens at positions
    `[computed_position, computed_position + num_scheduled_tokens)`.
    """

    request_id: str
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


Row = tuple[str, int, int, array, array]
"""`(request_id, computed_position, num_scheduled_tokens, new_tokens, new_block_ids)`;
the two id arrays are copies the caller may keep."""


class RequestBatch(Sequence[RequestData]):
    """Rows of `RequestData` stored column-wise (see the module docstring)."""

    __slots__ = (
        "request_ids",
        "positions",
        "num_scheduled",
        "token_counts",
        "block_counts",
        "tokens",
        "block_ids",
        "_offsets",
    )

    def __init__(self, rows: Iterable[RequestData] = ()):
        self.request_ids: list[str] = []
        self.positions = array("i")
        self.num_scheduled = array("i")
        self.token_counts = array("i")
        self.block_counts = array("i")
        self.tokens = array("i")
        """Every row's `new_tokens`, concatenated in row order."""
        self.block_ids = array("i")
        """Every row's `new_block_ids`, concatenated in row order."""
        self._offsets: tuple[list[int], list[int]] | None = None
        if rows:  # an empty batch, the most common one, skips the empty conversions
            self.extend(rows)

    # -- building ---------------------------------------------------------------------
    def add(
        self,
        request_id: str,
        new_tokens: Iterable[int],
        new_block_ids: Iterable[int],
        computed_position: int,
        num_scheduled_tokens: int,
    ) -> None:
        """Append one row. Token and block ids held as `array('i')` are copied as memory."""
        if not isinstance(request_id, str) or "\0" in request_id:
            raise TypeError(f"request_id must be a str without NUL characters, got {request_id!r}")
        n_tok, n_blk = len(self.tokens), len(self.block_ids)
        try:
            self.tokens.extend(new_tokens)
            self.block_ids.extend(new_block_ids)
            self.positions.append(computed_position)
            self.num_scheduled.append(num_scheduled_tokens)
        except (TypeError, OverflowError) as exc:
            # Leave the batch as it was: every column the same length.
            del self.tokens[n_tok:], self.block_ids[n_blk:]
            del self.positions[len(self.request_ids) :]
            raise type(exc)(
                f"request {request_id!r}: token ids, block ids, position and scheduled "
                f"count must be int32 integers ({exc})"
            ) from None
        self.request_ids.append(request_id)
        self.token_counts.append(len(self.tokens) - n_tok)
        self.block_counts.append(len(self.block_ids) - n_blk)
        self._offsets = None

    def add_rows(
        self,
        request_ids: Sequence[str],
        new_tokens: Sequence[Iterable[int]],
        new_block_ids: Sequence[Iterable[int]],
        computed_positions: Sequence[int],
        num_scheduled_tokens: Sequence[int],
    ) -> None:
        """Append rows given field by field: one sequence per field, one item per row.

        Each field is converted by one C call where `add` pays several Python calls per
        row (about 1.4x faster for a step of decode rows). All or nothing: a bad value
        raises as `add` raises it, naming its request, and leaves the batch as it was."""
        n = len(request_ids)
        lengths = (len(new_tokens), len(new_block_ids), len(computed_positions))
        if lengths + (len(num_scheduled_tokens),) != (n, n, n, n):
            raise ValueError(
                f"add_rows: {n} request ids, {lengths[0]} token lists, {lengths[1]} block "
                f"lists, {lengths[2]} positions and {len(num_scheduled_tokens)} scheduled "
                "counts; give one of each per row"
            )
        if not n:
            return
        try:
            if "\0" in "".join(request_ids):  # join: TypeError for an id that is no str
                raise TypeError("a request id holds a NUL character")
            positions = array("i", computed_positions)
            num_scheduled = array("i", num_scheduled_tokens)
            # An iterable without a length raises TypeError: taken row by row below.
            token_counts = array("i", map(len, new_tokens))  # type: ignore[arg-type]
            block_counts = array("i", map(len, new_block_ids))  # type: ignore[arg-type]
            tokens, blocks = array("i"), array("i")
            for t in new_tokens:
                tokens.extend(t)
            for b in new_block_ids:
                blocks.extend(b)
        except (TypeError, OverflowError):
            # Row by row into a batch of their own, which names the bad row (or takes
            # iterables without a length, which `add` accepts).
            own = RequestBatch()
            for row in zip(
                request_ids, new_tokens, new_block_ids, computed_positions, num_scheduled_tokens
            ):
                own.add(*row)
            positions, num_scheduled = own.positions, own.num_scheduled
            token_counts, block_counts = own.token_counts, own.block_counts
            tokens, blocks = own.tokens, own.block_ids
        self.request_ids.extend(request_ids)
        self.positions.extend(positions)
        self.num_scheduled.extend(num_scheduled)
        self.token_counts.extend(token_counts)
        self.block_counts.extend(block_counts)
        self.tokens.extend(tokens)
        self.block_ids.extend(blocks)
        self._offsets = None

    def extend(self, rows: Iterable[RequestData]) -> None:
        """Append `rows` (`RequestData`), field by field as `add_rows` does."""
        rows = rows if isinstance(rows, (list, tuple)) else list(rows)
        self.add_rows(
            [r.request_id for r in rows],
            [r.new_tokens for r in rows],
            [r.new_block_ids for r in rows],
            [r.computed_position for r in rows],
            [r.num_scheduled_tokens for r in rows],
        )

    def append(self, row: RequestData) -> None:
        self.add(
            row.request_id,
            row.new_tokens,
            row.new_block_ids,
            row.computed_position,
            row.num_scheduled_tokens,
        )

    @classmethod
    def of(cls, rows: Iterable[RequestData] | RequestBatch) -> RequestBatch:
        """`rows` itself when it is a batch, else a new batch holding them."""
        return rows if isinstance(rows, RequestBatch) else cls(rows)

    # -- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.request_ids)

    @overload
    def __getitem__(self, index: int) -> RequestData: ...
    @overload
    def __getitem__(self, index: slice) -> RequestBatch: ...
    def __getitem__(self, index: int | slice) -> RequestData | RequestBatch:
        if isinstance(index, slice):
            return RequestBatch(self[i] for i in range(*index.indices(len(self))))
        i = range(len(self))[index]  # IndexError and negative indices as lists have them
        tok, blk = self._row_offsets()
        return RequestData(
            self.request_ids[i],
            self.tokens[tok[i] : tok[i + 1]].tolist(),
            self.block_ids[blk[i] : blk[i + 1]].tolist(),
            self.positions[i],
            self.num_scheduled[i],
        )

    def __iter__(self) -> Iterator[RequestData]:
        for rid, pos, n, toks, blks in self.rows():
            yield RequestData(rid, toks.tolist(), blks.tolist(), pos, n)

    def rows(self) -> Iterator[Row]:
        """Each row as a plain tuple, without building `RequestData` objects."""
        t = b = 0
        tokens, blocks = self.tokens, self.block_ids
        for rid, pos, n, nt, nb in zip(
            self.request_ids, self.positions, self.num_scheduled, self.token_counts,
            self.block_counts,
        ):  # fmt: skip
            yield rid, pos, n, tokens[t : t + nt], blocks[b : b + nb]
            t += nt
            b += nb

    @property
    def total_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, RequestBatch):
            return self._columns() == other._columns() and self.request_ids == other.request_ids
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"RequestBatch({list(self)!r})"

    # -- columns (the wire form) --------------------------------------------------------
    def columns(self) -> tuple[array, ...]:
        """The six int32 columns in wire order: positions, scheduled counts, token counts,
        block counts, tokens, block ids. Raises `ValueError` when they do not describe the
        rows (columns edited in place past `add`): the ranks would read other rows."""
        r = len(self.request_ids)
        if not (
            len(self.positions) == len(self.num_scheduled) == len(self.token_counts) == r
            and len(self.block_counts) == r
            # Summed as unsigned, a negative count makes the total >= 2**31: no match.
            and sum(memoryview(self.token_counts).cast("B").cast("I")) == len(self.tokens)
            and sum(memoryview(self.block_counts).cast("B").cast("I")) == len(self.block_ids)
        ):
            raise ValueError(
                f"the batch's columns do not describe its {r} rows: {len(self.positions)} "
                f"positions, {len(self.num_scheduled)} scheduled counts, token counts summing "
                f"to {sum(self.token_counts)} for {len(self.tokens)} tokens, block counts "
                f"summing to {sum(self.block_counts)} for {len(self.block_ids)} block ids"
            )
        return self._columns()

    def _columns(self) -> tuple[array, ...]:
        return (
            self.positions,
            self.num_scheduled,
            self.token_counts,
            self.block_counts,
            self.tokens,
            self.block_ids,
        )

    @classmethod
    def from_columns(cls, request_ids: list[str], ints: array) -> RequestBatch:
        """The batch whose `columns()`, concatenated, are `ints`. Raises `ValueError` when
        the counts do not add up to the lengths (the caller names the message)."""
        batch, end = cls.take_columns(request_ids, ints, 0)
        if end != len(ints):
            raise ValueError(
                f"{len(ints)} ints, but the counts of {len(request_ids)} requests need {end} "
                "(a count is wrong or negative)"
            )
        return batch

    @classmethod
    def take_columns(
        cls, request_ids: list[str], ints: array, start: int, unsigned: memoryview | None = None
    ) -> tuple[RequestBatch, int]:
        """The batch whose columns start at `ints[start]`, and the index after its last
        column (where the next batch's columns may start). Raises `ValueError` when its
        counts are negative or run past the end of `ints`. `unsigned`: `ints` viewed as
        uint32, when the caller already has it. Raises `TypeError` for other than an
        `array('i')`: the counts would be read at another width than the columns."""
        if not (isinstance(ints, array) and ints.typecode == "i"):
            raise TypeError(
                f"the columns must be an array('i') of int32, got {type(ints).__name__}"
                + (f"('{ints.typecode}')" if isinstance(ints, array) else "")
            )
        r = len(request_ids)
        counts = start + 4 * r
        if len(ints) < counts:
            raise ValueError(f"{len(ints) - start} ints cannot hold the counts of {r} requests")
        # Summed as unsigned, a negative count becomes >= 2**31: the totals then run past
        # the end, so one pass per column checks both the sign and the length.
        if unsigned is None:
            unsigned = memoryview(ints).cast("B").cast("I")
        num_tokens = sum(unsigned[counts - 2 * r : counts - r])
        split = counts + num_tokens
        end = split + sum(unsigned[counts - r : counts])
        if end > len(ints):
            raise ValueError(
                f"{len(ints)} ints, but the counts of {r} requests need {end} "
                "(a count is wrong or negative)"
            )
        batch = cls.__new__(cls)  # no empty columns to throw away
        batch.request_ids = request_ids
        batch.positions = ints[start : start + r]
        batch.num_scheduled = ints[start + r : start + 2 * r]
        batch.token_counts = ints[start + 2 * r : start + 3 * r]
        batch.block_counts = ints[start + 3 * r : counts]
        batch.tokens = ints[counts:split]
        batch.block_ids = ints[split:end]
        batch._offsets = None
        return batch, end

    def _row_offsets(self) -> tuple[list[int], list[int]]:
        if self._offsets is None:
            self._offsets = (
                list(accumulate(self.token_counts, initial=0)),
                list(accumulate(self.block_counts, initial=0)),
            )
        return self._offsets


assert array("i").itemsize == 4, "kvdist stores ids as 4-byte C ints"


@dataclass
class SchedulerOutput:
    """The engine's decisions for one step, as passed to `build_connector_meta`.

    `finished_req_ids`: requests that stopped generating (finished or aborted) in the
    previous step; the ranks drop their state for them after this step.
    `preempted_req_ids`: requests whose blocks were taken back; they come again later as
    new requests.
    `sync_load_req_ids`: scheduled requests whose external tokens a connector loads within
    this step (a synchronous load). If such a load fails on any rank, the engine rolls the
    step back for that request and computes it again: the KV this step leaves in its blocks
    (loaded or computed on top of the load) must not be saved before a later step.
    """

    step: int = 0
    new_requests: RequestBatch = field(default_factory=RequestBatch)
    cached_requests: RequestBatch = field(default_factory=RequestBatch)
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    sync_load_req_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Any sequence of RequestData is accepted; it is held as a batch.
        self.new_requests = RequestBatch.of(self.new_requests)
        self.cached_requests = RequestBatch.of(self.cached_requests)

    @property
    def num_scheduled_tokens(self) -> int:
        return (
            self.new_requests.total_scheduled_tokens + self.cached_requests.total_scheduled_tokens
        )

    def all_requests(self) -> list[RequestData]:
        """New then cached requests, as `RequestData` objects (built on each call)."""
        return [*self.new_requests, *self.cached_requests]
