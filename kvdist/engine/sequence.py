"""Rank 0's state of one request."""

from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field

import torch

from kvdist.api.types import Request
from kvdist.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_LOAD = "waiting_for_load"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    params: SamplingParams
    index: int
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_external_tokens: int = 0
    loading_tokens: int = 0
    """Tokens an async load in flight will supply (counted once the load is done)."""
    load_started: float = 0.0
    """`time.monotonic()` when its async load in flight started."""
    load_limit: int | None = None
    """Set by a load failure: no token at or past this position came from a valid load."""
    failed_load_blocks: set[int] = field(default_factory=set)
    """Blocks whose async load some rank reported failed (ranks report in different steps:
    a block is counted once)."""
    sync_load_step: int = -1
    """Step in which a synchronous load supplied tokens (failures then undo the step)."""
    invalid_kv_to: int = 0
    """From `num_computed_tokens` up to here its blocks hold KV that is not valid: an
    async load in flight, or a step undone because its synchronous load failed, until
    loaded or recomputed. A request stopped then gives the connector no block ids."""
    computed_high: int = 0
    """The furthest any step scheduled it to (`num_computed_tokens` after it): a step
    that takes it past this made progress (`Scheduler.expire_stalled`); one that computes
    again what a preemption dropped made progress only as `recomputed_to` says."""
    recomputed_to: int = -1
    """How far it has recomputed since its last preemption (below `computed_high`): each
    step that takes it further made progress. -1 when none does: it was preempted again
    before any request got past its `computed_high`, so it goes round in circles (a
    request that needs a held block preempts itself and computes the same chunk again)."""
    preempted_at: int = -1
    """`Scheduler._advances` at its last preemption (see `recomputed_to`)."""
    num_tokens_sent: int = 0
    num_blocks_sent: int = 0
    known_to_ranks: bool = False
    seen_by_connector: bool = False
    """get_num_new_matched_tokens was called for it (however it answered, or if it
    raised), so request_finished will be."""
    arrival_time: float = field(default_factory=time.perf_counter)
    admission_time: float | None = None
    """When the scheduler first gave it blocks (its load or prefill could start)."""
    first_token_time: float | None = None
    finish_reason: str = ""
    error: str | None = None
    token_ids: array = field(init=False)
    """Prompt and output tokens as int32, kept beside the request's lists: the step's
    request batches copy them as memory rather than converting Python ints each step."""

    def __post_init__(self) -> None:
        self.token_ids = array("i", self.request.all_token_ids)

    def append_token(self, token: int) -> None:
        self.request.output_token_ids.append(token)
        self.token_ids.append(token)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.request.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.request.all_token_ids
