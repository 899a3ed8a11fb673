"""An asynchronous connector in one file: its transfers run on a thread beside the engine.

Like `custom_connector.py`, `ThreadedMemory*` keeps every rank's KV shard of each full
block in that rank's process memory. Unlike it, the slow parts run on a worker thread, and
it uses each part of the protocol that asynchronous connectors need:

- **Loads are asynchronous.** `get_num_new_matched_tokens` answers `(tokens, True)`. The
  worker copies the blocks in on its thread and reports each load through `get_finished`.
  The engine schedules the request once every rank has reported it.
- **Saves take their copy in the step, and file it later.** `wait_for_save` copies the
  step's blocks out before it returns: after that the engine may reuse them (a preempted
  request's blocks go back to the pool). The thread files the copies in the store; that is
  the part a real connector would send to disk or over the network.
- **A finished request is held while its saves are filed.** `request_finished` returns
  True, so the request completes only once its KV is in the store on every rank. The
  workers are given every finished id, but may report only the held ones, so the
  scheduler names them in its metadata (`held`).
- **Hits need every rank.** Each worker tells rank 0 which blocks it filed
  (`build_worker_meta`, which arrives in `update_from_workers`). The scheduler answers a hit
  only on blocks that every rank has filed.
- **A failed transfer is still reported done.** A load that raised is reported loaded,
  with its blocks in `get_block_ids_with_load_errors`: every rank then computes them
  instead (the engine takes the union over ranks). The scheduler is not told by the
  engine, so the worker names the lost blocks in its worker meta, and the scheduler stops
  answering hits on them. A save that raised files nothing, so no hit is answered on it.
  Raising from `get_finished` instead would fail the step on every rank, and the engine.

Run it:   python examples/async_connector.py
          launch/mpirun.sh -n 2 python examples/async_connector.py
"""

from __future__ import annotations

import importlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

import kvdist

# The block store of this process: (block hash) -> this rank's shard, all layers. Like the
# store, what rank 0 knows of it outlives an engine: block hash -> ranks that filed it.
_STORE: dict[bytes, torch.Tensor] = {}
_FILED_BY: dict[bytes, set[int]] = {}


class ThreadedMemoryScheduler(kvdist.ConnectorScheduler):
    def __init__(self, ctx: kvdist.ConnectorContext):
        super().__init__(ctx)  # raises unless this is rank 0
        self.bs = ctx.block_size
        self.requests: dict[str, kvdist.Request] = {}
        self.tables: dict[str, list[int]] = {}
        self.saved_upto: dict[str, int] = {}
        self.saving: set[str] = set()  # requests with saves issued
        self.first_block: dict[str, int] = {}
        self.loads: list[list[Any]] = []
        self.held: list[str] = []

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        first = num_computed_tokens // self.bs
        hits = 0
        for h in request.block_hashes[first:]:
            if len(_FILED_BY.get(h, ())) < self.ctx.world_size:
                break
            hits += 1
        self.first_block[request.request_id] = first
        return (hits * self.bs, True) if hits else (0, False)  # (0, True) is not an answer

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        rid = request.request_id
        first = self.first_block.pop(rid)
        # Every block the external tokens touch: the last may end one token short.
        last = first + -(-num_external_tokens // self.bs)
        self.requests[rid] = request
        self.saved_upto[rid] = last  # loaded blocks need no save
        if num_external_tokens:
            self.loads.append([rid, block_ids[first:last], request.block_hashes[first:last]])

    def build_connector_meta(self, scheduler_output):
        saves = []
        for r in scheduler_output.new_requests:
            self.tables[r.request_id] = list(r.new_block_ids)
        for r in scheduler_output.cached_requests:
            self.tables[r.request_id] += r.new_block_ids
        for r in scheduler_output.all_requests():
            rid = r.request_id
            full = (r.computed_position + r.num_scheduled_tokens) // self.bs
            if full > self.saved_upto[rid]:
                start, self.saved_upto[rid] = self.saved_upto[rid], full
                hashes = self.requests[rid].block_hashes[start:full]
                saves.append([rid, self.tables[rid][start:full], hashes])
                self.saving.add(rid)
        meta = {"loads": self.loads, "saves": saves, "held": self.held}
        self.loads, self.held = [], []
        return meta

    def update_from_workers(self, worker_metas):
        for rank, meta in enumerate(worker_metas):
            if meta is None:
                continue
            for h in meta["filed"]:
                _FILED_BY.setdefault(h, set()).add(rank)
            for h in meta["lost"]:  # unusable on that rank: a miss from now on, so that
                _FILED_BY.pop(h, None)  # the next request computing it saves it again

    def request_finished(self, request, block_ids):
        rid = request.request_id
        for d in (self.requests, self.tables, self.saved_upto, self.first_block):
            d.pop(rid, None)
        if rid not in self.saving:
            return False
        self.saving.discard(rid)
        self.held.append(rid)  # the workers learn which finished ids to report
        return True


class ThreadedMemoryWorker(kvdist.ConnectorWorker):
    def __init__(self, ctx: kvdist.ConnectorContext):
        super().__init__(ctx)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="memory-connector")
        self.loading: dict[str, tuple[Future, list[int], list[bytes]]] = {}
        self.filing: dict[str, list[Future]] = {}
        self.held: set[str] = set()  # held by the scheduler, not yet given as finished
        self.finished: set[str] = set()  # held and finished, not yet reported
        self.lock = threading.Lock()
        self.filed: list[bytes] = []  # for rank 0's scheduler, at the next report
        self.lost: list[bytes] = []  # ... and the blocks whose load failed here
        self.failed_blocks: set[int] = set()  # for get_block_ids_with_load_errors

    def register_kv_caches(self, kv_cache):
        self.kv = kv_cache  # (layers, 2, blocks, block_size, this rank's heads, head_dim)

    def bind_connector_meta(self, meta):
        super().bind_connector_meta(meta)
        self.held.update(meta["held"])

    def start_load_kv(self, stream):
        for rid, block_ids, hashes in self.get_connector_meta()["loads"]:
            # The engine leaves these blocks alone until every rank reported the load.
            job = self.thread.submit(self._load, block_ids, hashes)
            self.loading[rid] = (job, block_ids, hashes)

    def _load(self, block_ids: list[int], hashes: list[bytes]) -> None:
        shards = torch.stack([_STORE[h] for h in hashes], dim=2)
        self.kv[:, :, block_ids] = shards.to(self.kv.device)

    def wait_for_save(self, stream):
        for rid, block_ids, hashes in self.get_connector_meta()["saves"]:
            shards = self.kv[:, :, block_ids].to("cpu", copy=True)  # before the engine
            job = self.thread.submit(self._file, shards, hashes)  # reuses the blocks
            self.filing.setdefault(rid, []).append(job)

    def _file(self, shards: torch.Tensor, hashes: list[bytes]) -> None:
        for i, h in enumerate(hashes):
            _STORE[h] = shards[:, :, i].clone()
        with self.lock:
            self.filed += hashes

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        loaded = {rid for rid, (job, _, _) in self.loading.items() if job.done()}
        for rid in loaded:
            job, block_ids, hashes = self.loading.pop(rid)
            if job.exception() is not None:  # done all the same, its blocks failed
                self.failed_blocks.update(block_ids)
                with self.lock:  # the scheduler forgets what this rank does not have
                    self.lost += [h for h in hashes if h not in _STORE]
        self.finished |= finished_gen_req_ids & self.held
        self.held -= finished_gen_req_ids
        for rid in finished_gen_req_ids - self.finished:
            self.filing.pop(rid, None)  # not held: nothing to report
        saved = {r for r in self.finished if all(j.done() for j in self.filing.get(r, ()))}
        for rid in saved:
            self.filing.pop(rid, None)  # a filing that raised filed nothing: no hit on it
        self.finished -= saved
        return saved, loaded

    def get_block_ids_with_load_errors(self):
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    def build_worker_meta(self):
        with self.lock:
            filed, lost, self.filed, self.lost = self.filed, self.lost, [], []
        # None: nothing to say this step (the scheduler hears nothing then).
        return {"filed": filed, "lost": lost} if filed or lost else None

    def shutdown(self):
        self.thread.shutdown(wait=True)


def main() -> None:
    from kvdist.comm import abort_on_error, init_distributed

    # Run as a script this file is __main__; the registry imports it by its file name (the
    # script's folder is on sys.path), so both halves share that module's store.
    module = "async_connector" if __name__ == "__main__" else __name__
    connector = kvdist.ConnectorConfig(
        module=module,
        scheduler_class="ThreadedMemoryScheduler",
        worker_class="ThreadedMemoryWorker",
    )
    # 100 tokens: 6 full blocks of 16 and 4 more; 112: exactly 7 blocks.
    prompts = [list(range(10, 10 + 100)), list(range(200, 200 + 112))]
    params = kvdist.SamplingParams(max_tokens=8)
    topo = init_distributed(device="cpu")

    def engine_run() -> tuple[list[kvdist.RequestOutput], dict]:
        """A new engine (empty device cache) on the same store: its outputs and stats."""
        llm = kvdist.LLM("tiny", connector=connector, topology=topo)
        outs = llm.generate(prompts, params)
        stats = llm.stats
        llm.shutdown()  # waits for the held saves on every rank
        return outs, stats

    def loaded(outs: list[kvdist.RequestOutput]) -> int:
        return sum(o.num_external_tokens for o in outs)

    with abort_on_error(topo.comm):
        first, _ = engine_run()
        second, _ = engine_run()
        # The last rank loses its copy of three blocks: their loads fail there and every
        # rank computes them; the next engine misses on them (the worker named them to the
        # scheduler) and saves them again, and the one after loads everything again.
        if topo.rank == topo.world_size - 1:
            store = importlib.import_module(module)._STORE  # the connector's (see above)
            for h in sorted(store)[:3]:
                del store[h]
        third, stats = engine_run()
        fourth, _ = engine_run()
        fifth, _ = engine_run()
        if topo.rank == 0:
            want = [o.output_token_ids for o in first]
            for x, y in zip(first, second):
                same = x.output_token_ids == y.output_token_ids
                print(
                    f"tokens loaded asynchronously: {y.num_external_tokens} of "
                    f"{len(y.prompt_token_ids)}, identical: {same}"
                )
            lost = f"with 3 blocks lost on rank {topo.world_size - 1}"
            for label, outs in (
                (f"{lost} ({stats['load_failures']} failed block loads)", third),
                ("next engine (the lost blocks miss, and are saved again)", fourth),
                ("the one after", fifth),
            ):
                same = [o.output_token_ids for o in outs] == want
                print(f"{label}: {loaded(outs)} tokens loaded, outputs identical: {same}")
    topo.close()


if __name__ == "__main__":
    main()
