"""The two connector roles and every hook they have.

A connector is a pair of classes. `ConnectorScheduler` decides what to move and exists
on rank 0 only; `ConnectorWorker` moves this rank's shard of KV blocks and exists on every
rank (rank 0 too). One engine step, in order:

| hook | role | rank | when |
| --- | --- | --- | --- |
| `get_num_new_matched_tokens(request, num_computed_tokens)` | scheduler | 0 | a waiting request is considered for admission: again in each step it waits for room, and after a preemption |
| `update_state_after_alloc(request, block_ids, num_external_tokens)` | scheduler | 0 | blocks were allocated for an admitted request: again when it is admitted after a preemption |
| `request_finished(request, block_ids)` | scheduler | 0 | a request stopped (finished or aborted); once for every request it was asked about, admitted or not (then `block_ids` is empty); True holds its blocks |
| `build_connector_meta(scheduler_output)` | scheduler | 0 | once per step, after scheduling; the result is broadcast |
| `register_kv_caches(kv_cache)` | worker | all | once, after the paged KV cache is allocated |
| `agreed_settings()` | worker | all | once, after `register_kv_caches`; plain data that must be equal on every rank (default: the settings) |
| `shared_storage()` | worker | all | once, with `agreed_settings`; storage every rank must see as the same one, each with the identity this rank finds in it (default: none) |
| `bind_connector_meta(meta)` | worker | all | once per step, with the metadata broadcast from rank 0 |
| `start_load_kv(stream)` | worker | all | before the forward pass |
| `needs_layer_hooks()` | worker | all | after `start_load_kv`; True or False (anything else is an error), the same on every rank (answer from the step's metadata): False lets the engine skip the per-layer hooks (and replay a CUDA graph, whose tensor-parallel collectives are padded) this step |
| `wait_for_layer_load(layer_idx, stream)` | worker | all | just before decoder layer `layer_idx` runs |
| `save_kv_layer(layer_idx, stream)` | worker | all | just after decoder layer `layer_idx` wrote its KV |
| `wait_for_save(stream)` | worker | all | after the forward pass; left out in a step that failed (its blocks may be half written), and the built-in workers then drop that step's saves |
| `get_finished(finished_gen_req_ids, started_loading_req_ids)` | worker | all | after `wait_for_save`; reports async transfers done on this rank |
| `get_block_ids_with_load_errors()` | worker | all | after `get_finished` |
| `build_worker_meta()` | worker | all | after `get_block_ids_with_load_errors`; the result travels in this rank's report |
| `update_from_workers(worker_metas)` | scheduler | 0 | after the report exchange, in a step where some rank's `build_worker_meta` returned something |
| `shutdown()` | both | as above | when the engine stops |

`stream` is the engine's compute stream (a `torch.cuda.Stream`) on GPU, None on the CPU.
The KV cache given to `register_kv_caches` is one tensor per rank of shape
`(num_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim)` (see
`kvdist.kv.layout`).

Ids passed to `get_finished` are passed exactly once each. The worker returns, from any
later step, the ids of requests whose async save (of those ids it was given as finished,
and whose blocks `request_finished` held) or async load (of those it was given as started
loading) completed on this rank. A request's transfer counts as done once every rank has
reported it; the coordinator does that bookkeeping, so a worker only speaks for its own
rank. The reference engine fails a request whose async load some rank has not reported
within `load_timeout_s` (its blocks stay held until every rank has), and the waiting
requests once none could be admitted for the collective deadline (`timeout_s`,
default `KVDIST_TIMEOUT_S`), with no held transfer reported meanwhile, because the cache is
full of blocks held for transfers not reported.

A hook that raises (a `ConnectorError` names the connector class and the hook): a
`get_num_new_matched_tokens` that raises, or answers anything but a valid `(int, bool)`,
fails that request alone. Nothing was allocated for it yet: it ends with finish_reason
"error" and that error, gets its one `request_finished` (with no blocks), and the other
requests are served as usual. Any other hook raising in a step, or answering of the wrong
type, ends the step on every rank together (a `RemoteError` there), and the engine refuses
further work: from `update_state_after_alloc` on, the connector may have recorded a load
or save into the request's blocks, which would be freed and reused.

Connector metadata and worker metas travel as msgpack on every rank, rank 0 included:
tuples arrive as lists, bytes and int map keys as they were. A `stats` dict on either
half (numbers) is summed into `kvdist.LLM.stats` as `connector_<key>`.

`build_worker_meta` / `update_from_workers` are the way back from the workers to the
scheduler, for what the completion sets do not say: which blocks a rank stored or failed
to store, how far behind its writes are. They ride the step's report exchange, so they
cost no collective of their own; return None in steps with nothing to say.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from kvdist.api.types import ConnectorContext, Request, SchedulerOutput


class ConnectorScheduler(ABC):
    """Rank-0 half of a connector: decides what can be loaded and what to save."""

    def __init__(self, ctx: ConnectorContext) -> None:
        if ctx.rank != 0:
            raise RuntimeError(
                f"{type(self).__name__} is a connector scheduler and exists only on rank 0; "
                f"it was constructed on rank {ctx.rank}"
            )
        self.ctx = ctx

    @abstractmethod
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens beyond `num_computed_tokens` this connector can supply, and whether it
        loads them asynchronously (the request then waits until every rank has them).

        `num_computed_tokens` is the on-device prefix hit: a whole number of blocks (the
        built-in connectors refuse any other). `(0, True)` is not a valid answer.

        Raising, or answering anything but an int >= 0 and a bool, fails this request
        alone (finish_reason "error", the error naming this class and hook); it still
        gets its `request_finished`, with no blocks."""

    @abstractmethod
    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Blocks were allocated for `request`; the first `num_external_tokens` tokens after
        the on-device prefix hit are to be loaded by this connector (0: load nothing).

        It may be less than `get_num_new_matched_tokens` answered, and not a multiple of
        `block_size`: the engine computes at least a prompt's last token itself, so a hit
        on every block of a prompt of whole blocks comes back one token short. Load every
        block the tokens touch (`ceil(num_external_tokens / block_size)` blocks from the
        first after the on-device hit); the engine computes the rest of the last one.

        `block_ids` is the request's block table so far, the on-device hit's blocks first:
        the load starts at `block_ids[num_computed_tokens // block_size]`, with
        `num_computed_tokens` from the `get_num_new_matched_tokens` call just before this
        one, and block `i` is named by `request.block_hashes[i]`."""

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        """This step's instructions for the workers: plain, msgpack-encodable data (pack
        id lists as bytes: `kvdist.pack_ids`, read back with `kvdist.unpack_ids`). The
        step's rows are in `scheduler_output.new_requests` / `cached_requests`,
        `RequestBatch`es: sequences of `RequestData`, with `rows()` for loops that should
        not build objects."""

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        """`request` stopped. Return True to keep its blocks until every rank reports its
        save finished (through `ConnectorWorker.get_finished`). `block_ids` is empty when
        the request never got blocks, and when its blocks hold no valid KV (a load failed
        and `load_failure_policy` is "fail"): nothing of it may be saved then."""
        return False

    def update_from_workers(self, worker_metas: list[Any]) -> None:  # noqa: B027
        """What the workers said this step: `worker_metas[r]` is rank r's
        `ConnectorWorker.build_worker_meta()` result (None where it had nothing). Called
        after the report exchange, before the next `build_connector_meta`; not called in
        steps where every rank had nothing."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class ConnectorWorker(ABC):
    """Per-rank half of a connector: moves this rank's shard of the KV blocks."""

    def __init__(self, ctx: ConnectorContext) -> None:
        self.ctx = ctx
        self._meta: Any = None

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:  # noqa: B027
        """Called once with this rank's paged KV cache."""

    def agreed_settings(self) -> Any:
        """Plain data (msgpack-encodable) that must be the same on every rank. The engine
        compares it when the connector starts, after `register_kv_caches`: a difference
        fails every rank with an error naming it, rather than a step failing later. By
        default the connector's settings (`ctx.kwargs`); override to leave out those that
        may differ between ranks (IO threads, CPU lists), or to compare what was derived
        from them."""
        return self.ctx.kwargs

    def shared_storage(self) -> dict[str, str]:
        """Storage that every rank must see as one and the same, by what names it (e.g.
        "cache directory /mnt/kv/…") with an identity this rank read from it (e.g. an id
        file the first rank to get there created). The engine compares them when the
        connector starts, with `agreed_settings`: ranks that find another identity under
        one name (a directory on each node's own disk, where a filesystem shared by every
        node was meant) fail every rank, naming the storage and the hosts. Leave out what
        this rank could not identify. By default none."""
        return {}

    def bind_connector_meta(self, meta: Any) -> None:
        self._meta = meta

    def get_connector_meta(self) -> Any:
        return self._meta

    @abstractmethod
    def start_load_kv(self, stream: torch.cuda.Stream | None) -> None:
        """Start loading the blocks named in this step's metadata."""

    def needs_layer_hooks(self) -> bool:
        """Whether this step's forward must call `wait_for_layer_load` and `save_kv_layer`.

        Asked once per step, after `start_load_kv`. When False, the engine may run the
        step without them (the reference engine then replays a captured CUDA graph for a
        decode-only step). The default is True when this class overrides either hook and
        False otherwise; override it to say False in steps with nothing to wait for or
        save layer by layer.

        Every rank must give the same answer in a step (decide from the step's metadata,
        which every rank shares): the ranks' forward passes must issue the same
        tensor-parallel collectives, and a replayed graph pads the batch."""
        cls = type(self)
        return (
            cls.wait_for_layer_load is not ConnectorWorker.wait_for_layer_load
            or cls.save_kv_layer is not ConnectorWorker.save_kv_layer
        )

    def wait_for_layer_load(self, layer_idx: int, stream: torch.cuda.Stream | None) -> None:  # noqa: B027
        """Return once layer `layer_idx` of every synchronous load has arrived."""

    def save_kv_layer(self, layer_idx: int, stream: torch.cuda.Stream | None) -> None:  # noqa: B027
        """Layer `layer_idx` of this step has been written; saving may start."""

    def wait_for_save(self, stream: torch.cuda.Stream | None) -> None:  # noqa: B027
        """Return once no save of this step still reads device blocks.

        The engine calls it in every step that did not fail, after the forward (also in
        a step with no forward: its saves may be of blocks computed earlier), and leaves
        it out in a step that failed, whose blocks may be half written. A worker that
        finds it was left out (at the next `bind_connector_meta`, or at `shutdown`) must
        not make that step's saves late, from blocks no forward finished: the built-in
        workers drop them and tell their scheduler, which then counts those blocks as not
        stored (`kvdist.connectors.dropped_saves`); a worker of your own should do the
        same, or its scheduler will count blocks as stored that never were."""

    def get_finished(
        self, finished_gen_req_ids: set[str], started_loading_req_ids: set[str]
    ) -> tuple[set[str], set[str]]:
        """(ids whose async save finished on this rank, ids whose async load finished).

        `finished_gen_req_ids`: every request that finished since the last step (for the
        worker's own bookkeeping). Only those whose `request_finished` returned True have
        an async save to report; reporting another is an error, so the scheduler tells the
        workers which in its metadata (the built-in connectors send them as "held")."""
        return set(), set()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Device block ids whose load failed on this rank since the last call."""
        return set()

    def build_worker_meta(self) -> Any:
        """What this rank tells rank 0's connector scheduler this step (it arrives in
        `ConnectorScheduler.update_from_workers`): plain msgpack data, like the connector
        metadata, or None for nothing. Called once per step, after
        `get_block_ids_with_load_errors`; keep it small, it is on every step's path."""
        return None

    def shutdown(self) -> None:  # noqa: B027
        """Finish or cancel outstanding work and release resources."""
