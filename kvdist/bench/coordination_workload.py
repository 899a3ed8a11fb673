"""The synthetic step stream of the coordination benchmark.

Steady state at `in_flight` requests, seeded so every rank builds the same steps: each step
about `in_flight / 32` requests finish (each with an async save) and as many arrive with
prompts of 256-2048 tokens, shipped whole with their block tables as an engine's first
schedule of a request is; the rest decode (one new token, a new block every 16 steps).
Each rank reports each save done 1-3 steps after it started, at a step of its own.

Arriving prompts are kept in both forms an engine holds them in: Python lists (the
baseline's engine) and int32 arrays converted once on arrival (kvdist's engine, whose
`Sequence` keeps `token_ids` as `array('i')`); the conversion is timed on its own
(`StepData.admission_s`) because it is paid once per request, outside the step.
"""

from __future__ import annotations

import time
import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np

from kvdist.api.connector import ConnectorWorker
from kvdist.api.types import RequestData, SchedulerOutput
from kvdist.coordination.coordinator import Coordinator
from kvdist.wire.codec import Plan

BLOCK_SIZE = 16
VOCAB = 32_000
PROMPT_TOKENS = (256, 2048)
HASH_BYTES = 16
NUM_BLOCKS = 1 << 24
"""Block ids wrap at this: the KV cache the steps allocate from, as the coordinator is told."""


@dataclass
class SaveJob:
    """One new request's save instruction as a connector builds it: blocks and hashes."""

    request_id: str
    block_ids: list[int]
    block_hashes: list[bytes]


@dataclass
class StepData:
    """One step's decisions on rank 0 (every rank builds the same ones)."""

    step: int
    new: list[RequestData] = field(default_factory=list)
    cached: list[RequestData] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    """Stopped in the previous step; every one saves asynchronously."""
    matched: list[tuple[int, bool]] = field(default_factory=list)
    """The connector's `(matched tokens, async?)` answer for each new request."""
    save_jobs: list[SaveJob] = field(default_factory=list)
    new_token_arrays: list[array] = field(default_factory=list)
    """The prompt of each new request as int32, converted on arrival."""
    admission_s: float = 0.0
    """Seconds the conversions to int32 took (once per request, not per step)."""


def save_delay(request_id: str, rank: int) -> int:
    """Steps after its start at which `rank` reports the save of `request_id` done (1-3)."""
    return 1 + zlib.crc32(f"{request_id}/{rank}".encode()) % 3


def turnover(in_flight: int, rng: np.random.Generator) -> int:
    """Requests that finish (and arrive) in one step: ~in_flight/32, >= 1 from 16 on."""
    if in_flight >= 16:
        return max(1, round(in_flight / 32))
    return int(rng.random() < in_flight / 32)


class Workload:
    """Generates the steps; keeps `in_flight` requests running throughout."""

    def __init__(self, in_flight: int, seed: int):
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.in_flight = in_flight
        self.rng = np.random.default_rng([seed, in_flight])
        self.step = 0
        self._next_id = 0
        self._next_block = 0
        # Requests already running when the benchmark starts: the ranks know them, so
        # they are never shipped whole. Value: the position their next token is at.
        self.running: dict[str, int] = {}
        for _ in range(in_flight):
            rid = self._new_id()
            self.running[rid] = int(self.rng.integers(*PROMPT_TOKENS, endpoint=True)) + int(
                self.rng.integers(0, 64)
            )

    def next_step(self) -> StepData:
        self.step += 1
        rng = self.rng
        out = StepData(step=self.step)
        k = turnover(self.in_flight, rng)
        ids = list(self.running)
        out.finished = [ids[i] for i in sorted(rng.choice(len(ids), size=k, replace=False))]
        for rid in out.finished:
            del self.running[rid]
        tokens = rng.integers(0, VOCAB, size=len(self.running)).tolist()
        for tok, (rid, pos) in zip(tokens, self.running.items()):
            blocks = [self._alloc(1)[0]] if pos % BLOCK_SIZE == 0 else []
            out.cached.append(RequestData(rid, [tok], blocks, pos, 1))
            self.running[rid] = pos + 1
        for _ in range(k):
            out.new.append(self._arrive(out))
        return out

    def _arrive(self, out: StepData) -> RequestData:
        rng = self.rng
        rid = self._new_id()
        n = int(rng.integers(*PROMPT_TOKENS, endpoint=True))
        tokens = rng.integers(0, VOCAB, size=n).tolist()
        blocks = self._alloc(-(-n // BLOCK_SIZE))
        full = n // BLOCK_SIZE
        matched = int(rng.integers(0, full // 2 + 1)) * BLOCK_SIZE
        hashes = rng.bytes(HASH_BYTES * full)
        out.matched.append((matched, False))
        out.save_jobs.append(
            SaveJob(
                rid,
                blocks[:full],
                [hashes[i : i + HASH_BYTES] for i in range(0, len(hashes), HASH_BYTES)],
            )
        )
        self.running[rid] = n
        t0 = time.perf_counter()
        out.new_token_arrays.append(array("i", tokens))
        out.admission_s += time.perf_counter() - t0
        return RequestData(rid, tokens, blocks, matched, n - matched)

    def _new_id(self) -> str:
        self._next_id += 1
        return f"cmpl-{self._next_id:08d}"

    def _alloc(self, n: int) -> list[int]:
        start = self._next_block
        self._next_block = (start + n) % NUM_BLOCKS
        return [(start + i) % NUM_BLOCKS for i in range(n)]


def admit_running(coordinator: Coordinator, workload: Workload, rank: int) -> None:
    """One untimed step (step 0) that sends the requests already running when the
    benchmark starts as new, as their admission once did: rank 0's plan checks then know
    them when later steps schedule them as cached. Their rows carry one token each (their
    content is not what is measured)."""
    plan = None
    if rank == 0:
        so = SchedulerOutput(step=0)
        so.new_requests.add_rows(
            list(workload.running), [[0]] * len(workload.running), [[]] * len(workload.running),
            [0] * len(workload.running), [1] * len(workload.running),
        )  # fmt: skip
        plan = Plan(step=0, scheduler_output=so)
    coordinator.exchange_reports(coordinator.publish_plan(plan))


class DelayedSaveWorker(ConnectorWorker):
    """Reports each async save done `save_delay(id, rank)` steps after it was handed over.

    `prepare(step)` is called, untimed, before each step: it works out when this rank
    will report the saves that step hands over (a hash per id), so the timed
    `get_finished` does only what a worker does there, bookkeeping of sets."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.step = 0
        self._when: dict[str, int] = {}
        self._due: dict[int, set[str]] = {}

    def prepare(self, data: StepData) -> None:
        self.step = data.step
        rank = self.ctx.rank
        self._when = {rid: data.step + save_delay(rid, rank) for rid in data.finished}

    def start_load_kv(self, stream) -> None:
        pass

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        for rid in finished_gen_req_ids:
            self._due.setdefault(self._when[rid], set()).add(rid)
        return self._due.pop(self.step, set()), set()
