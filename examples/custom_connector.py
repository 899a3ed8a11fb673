"""A complete custom connector in one file: both halves, registered, run end to end.

`ProcessMemoryConnector` keeps every rank's KV shards of full blocks in a dict in that
rank's process memory. Every rank's worker copies its own head range in and out and tells
rank 0 which blocks it stored (`build_worker_meta`); rank 0's scheduler answers hits on
the blocks every rank stored (`update_from_workers`), so a block some rank never stored
(its step failed there) is never a hit. Loads are synchronous (done in `start_load_kv`),
saves happen after the forward (`wait_for_save`); the blocks of a step that also loaded
the request are saved a step later, once that load is known to have worked everywhere
(`sync_load_req_ids`): a request that finished in that step is held for them
(`request_finished` returns True, the worker reports it in `get_finished`).

Run it:   python examples/custom_connector.py
          launch/mpirun.sh -n 2 python examples/custom_connector.py
"""

from __future__ import annotations

from typing import Any

import torch

import kvdist

# The block store of this process: (block hash) -> this rank's shard, all layers.
_STORE: dict[bytes, torch.Tensor] = {}
_SAVED: set[bytes] = set()  # rank 0: hashes whose shards every rank reported stored


class ProcessMemoryScheduler(kvdist.ConnectorScheduler):
    def __init__(self, ctx: kvdist.ConnectorContext):
        super().__init__(ctx)  # raises unless this is rank 0
        self.bs = ctx.block_size
        self.loads: list[list[Any]] = []
        self.requests: dict[str, kvdist.Request] = {}
        self.tables: dict[str, list[int]] = {}
        self.saved_upto: dict[str, int] = {}
        self.first_block: dict[str, int] = {}
        self.deferred: dict[str, list[Any]] = {}  # last step's saves put off, by request
        self.held: dict[str, list[Any]] = {}  # finished, its put-off saves in the next meta

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        first = num_computed_tokens // self.bs
        hits = 0
        for h in request.block_hashes[first:]:
            if h not in _SAVED:
                break
            hits += 1
        self.first_block[request.request_id] = first
        return hits * self.bs, False  # synchronous load

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        rid = request.request_id
        first = self.first_block.pop(rid)
        # The engine computes at least a prompt's last token itself, so a hit on every block
        # comes back one token short: load every block the external tokens touch.
        last = first + -(-num_external_tokens // self.bs)
        self.requests[rid] = request
        self.saved_upto[rid] = last  # loaded blocks need no save
        if num_external_tokens:
            self.loads.append([block_ids[first:last], request.block_hashes[first:last]])

    def build_connector_meta(self, scheduler_output):
        saves = []
        for r in scheduler_output.new_requests:
            self.tables[r.request_id] = list(r.new_block_ids)
        for r in scheduler_output.cached_requests:
            self.tables[r.request_id] += r.new_block_ids
        saves, held = list(self.held.values()), list(self.held)
        self.held, self.deferred = {}, {}
        loading = set(scheduler_output.sync_load_req_ids)  # its load may yet fail somewhere
        for r in scheduler_output.all_requests():
            rid = r.request_id
            full = (r.computed_position + r.num_scheduled_tokens) // self.bs
            start = self.saved_upto[rid]
            if full > start:
                save = [self.tables[rid][start:full], self.requests[rid].block_hashes[start:full]]
                if rid in loading:
                    self.deferred[rid] = save  # saved next step (from here, if it finished)
                else:
                    saves.append(save)
                    self.saved_upto[rid] = full
        meta = {"loads": self.loads, "saves": saves, "held": held}
        self.loads = []
        return meta

    def update_from_workers(self, worker_metas):
        # A block is a hit once every rank stored its shard.
        stored = [set(m or ()) for m in worker_metas]
        _SAVED.update(set.intersection(*stored))

    def request_finished(self, request, block_ids):
        rid = request.request_id
        for d in (self.requests, self.tables, self.saved_upto):
            d.pop(rid, None)
        if rid in self.deferred:  # finished in the step that loaded it: save next step
            self.held[rid] = self.deferred.pop(rid)
            return True  # its blocks stay until every rank reported the save
        return False  # saves are done within the step: nothing to wait for


class ProcessMemoryWorker(kvdist.ConnectorWorker):
    def register_kv_caches(self, kv_cache):
        self.kv = kv_cache  # (layers, 2, blocks, block_size, this rank's heads, head_dim)
        self.stored: list[bytes] = []  # this step's, for rank 0

    def start_load_kv(self, stream):
        for block_ids, hashes in self.get_connector_meta()["loads"]:
            shards = torch.stack([_STORE[h] for h in hashes], dim=2)
            self.kv[:, :, block_ids] = shards.to(self.kv.device)

    def wait_for_save(self, stream):
        for block_ids, hashes in self.get_connector_meta()["saves"]:
            shards = self.kv[:, :, block_ids].to("cpu")
            for i, h in enumerate(hashes):
                _STORE[h] = shards[:, :, i].clone()
            self.stored += hashes

    def build_worker_meta(self):
        stored, self.stored = self.stored, []
        return stored or None  # plain msgpack data: a list of bytes

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        # A held request's saves were made in this step's wait_for_save.
        held = set(self.get_connector_meta()["held"])
        return held & finished_gen_req_ids, set()


def main() -> None:
    from kvdist.comm import abort_on_error, init_distributed

    # Run as a script this file is __main__; the registry imports it by its file name (the
    # script's folder is on sys.path), so both halves share that module's store.
    module = "custom_connector" if __name__ == "__main__" else __name__
    connector = kvdist.ConnectorConfig(
        module=module, scheduler_class="ProcessMemoryScheduler", worker_class="ProcessMemoryWorker"
    )
    # 100 tokens: 6 full blocks of 16 and 4 more; 112: exactly 7 blocks.
    prompts = [list(range(10, 10 + 100)), list(range(200, 200 + 112))]
    params = kvdist.SamplingParams(max_tokens=8)
    topo = init_distributed(device="cpu")
    with abort_on_error(topo.comm):
        first = kvdist.LLM("tiny", connector=connector, topology=topo)
        a = first.generate(prompts, params)
        first.shutdown()
        second = kvdist.LLM("tiny", connector=connector, topology=topo)  # empty device cache
        b = second.generate(prompts, params)
        second.shutdown()
        if topo.rank == 0:
            for x, y in zip(a, b):
                print(
                    f"tokens loaded by the connector: {y.num_external_tokens} of "
                    f"{len(y.prompt_token_ids)}, identical: {x.output_token_ids == y.output_token_ids}"
                )
    topo.close()


if __name__ == "__main__":
    main()
