"""The baselines of the coordination benchmark: two pickled-object patterns, reproduced.

- `BaselineCoordinator`, the established pattern kvdist's brief names: rank 0 answers each
  connector query and broadcasts each answer as a pickled Python object (one broadcast per
  new request, one per finished request), then broadcasts the whole step's metadata as
  nested lists and dicts, and every rank allgathers every id it still has pending.
- `PickledStepCoordinator`, the newer pattern of engines built around one pickled
  scheduler output per step (as vLLM v1 is): the connector's answers stay on rank 0, the
  step's metadata is one pickled broadcast, and each rank sends only the completions that
  are new on it, counted per id until every rank has sent it. Two collectives per step,
  as kvdist; what differs is the form (pickled nested objects against typed int32
  columns in msgpack) and kvdist's checks.

Both are rebuilt on purpose so the benchmark compares against them on the same steps.
**Pickle appears here and nowhere else in kvdist**; it is the thing being measured
against, never used by kvdist itself.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

from kvdist.bench.coordination_workload import DelayedSaveWorker, StepData


class ObjectCollectives:
    """The pattern's two object collectives; counts calls and keeps what this rank sent."""

    protocol = pickle.HIGHEST_PROTOCOL

    def __init__(self, rank: int):
        self.rank = rank
        self.calls = 0
        self.sent: list[Any] = []

    def bcast(self, obj: Any) -> Any:
        self.calls += 1
        if self.rank == 0:
            self.sent.append(obj)
        return self._bcast(obj)

    def allgather(self, obj: Any) -> list[Any]:
        self.calls += 1
        self.sent.append(obj)
        return self._allgather(obj)

    def take_sent_bytes(self) -> tuple[int, float]:
        """Pickled bytes of what this rank sent since the last call, and the seconds the
        pickling took (measured again here, outside the timed step)."""
        t0 = time.perf_counter()
        n = sum(len(pickle.dumps(o, protocol=self.protocol)) for o in self.sent)
        self.sent.clear()
        return n, time.perf_counter() - t0

    def barrier(self) -> None:
        """A blocking (busy-waiting) barrier that lines the ranks up before a timed step."""

    def close(self) -> None:
        pass

    def _bcast(self, obj: Any) -> Any:
        raise NotImplementedError

    def _allgather(self, obj: Any) -> list[Any]:
        raise NotImplementedError


class MPIObjectCollectives(ObjectCollectives):
    """mpi4py's lowercase (pickling) `bcast` / `allgather` on a private duplicate."""

    def __init__(self, mpi_comm):
        super().__init__(mpi_comm.Get_rank())
        self.comm = mpi_comm.Dup()

    def barrier(self) -> None:
        self.comm.Barrier()

    def _bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def _allgather(self, obj):
        return self.comm.allgather(obj)

    def close(self) -> None:
        self.comm.Free()


class TorchObjectCollectives(ObjectCollectives):
    """`broadcast_object_list` / `all_gather_object` on its own gloo group."""

    protocol = pickle.DEFAULT_PROTOCOL  # what torch's object collectives pickle with

    def __init__(self, group, rank: int, world_size: int):
        super().__init__(rank)
        self.group = group
        self.world_size = world_size

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def _bcast(self, obj):
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def _allgather(self, obj):
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class LocalObjectCollectives(ObjectCollectives):
    """World size 1: a pickle round trip, as an object collective to oneself costs."""

    def __init__(self):
        super().__init__(0)

    def _bcast(self, obj):
        return pickle.loads(pickle.dumps(obj, protocol=self.protocol))

    def _allgather(self, obj):
        return [pickle.loads(pickle.dumps(obj, protocol=self.protocol))]


def step_metadata(data: StepData) -> dict[str, Any]:
    """The whole step's metadata as the pattern ships it: nested lists and dicts."""

    def req(r, tokens_key):
        return {
            "req_id": r.request_id,
            tokens_key: r.new_tokens,
            "block_ids": r.new_block_ids,
            "num_computed_tokens": r.computed_position,
            "num_scheduled_tokens": r.num_scheduled_tokens,
        }

    return {
        "step": data.step,
        "scheduled_new_reqs": [req(r, "prompt_token_ids") for r in data.new],
        "scheduled_cached_reqs": [req(r, "new_token_ids") for r in data.cached],
        "finished_req_ids": list(data.finished),
        "saving_req_ids": list(data.finished),
        "kv_connector_metadata": {
            "reqs_to_save": [
                {"req_id": j.request_id, "block_ids": j.block_ids, "block_hashes": j.block_hashes}
                for j in data.save_jobs
            ],
            "reqs_to_load": [],
        },
    }


class BaselineCoordinator:
    """One rank's side of the pattern; `step` returns the saves done on every rank."""

    def __init__(self, oc: ObjectCollectives, worker: DelayedSaveWorker):
        self.oc = oc
        self.worker = worker
        self.pending: set[str] = set()  # started async saves, not yet done everywhere
        self.pending_here: set[str] = set()  # ... and not yet done on this rank

    def step(self, data: StepData, meta: dict[str, Any] | None) -> set[str]:
        """Every rank knows how many queries the scheduler makes (they all run it); rank 0
        alone consults the connector and passes `meta`, the others None."""
        oc, root = self.oc, self.oc.rank == 0
        for answer in data.matched:  # get_num_new_matched_tokens, one broadcast each
            oc.bcast(answer if root else None)
        for _ in data.finished:  # request_finished, one broadcast each
            oc.bcast((True, None) if root else None)
        meta = oc.bcast(meta if root else None)
        self.worker.bind_connector_meta(meta["kv_connector_metadata"])
        saving = meta["saving_req_ids"]
        self.pending.update(saving)
        self.pending_here.update(saving)
        saved, _ = self.worker.get_finished(set(meta["finished_req_ids"]), set())
        self.pending_here -= saved
        still = set().union(*oc.allgather(sorted(self.pending_here)))
        done = self.pending - still
        self.pending -= done
        return done


class PickledStepCoordinator:
    """One rank's side of the per-step pickled pattern; `step` returns the saves done on
    every rank. The engines it stands for gather the completions to the scheduler's
    process alone; here every rank gathers them, so that every rank ends the step knowing
    what kvdist's consensus tells it."""

    def __init__(self, oc: ObjectCollectives, worker: DelayedSaveWorker, world_size: int):
        self.oc = oc
        self.worker = worker
        self.world_size = world_size
        self.reported: dict[str, int] = {}  # async saves not yet done everywhere: ranks done

    def step(self, data: StepData, meta: dict[str, Any] | None) -> set[str]:
        oc, root = self.oc, self.oc.rank == 0
        meta = oc.bcast(meta if root else None)
        self.worker.bind_connector_meta(meta["kv_connector_metadata"])
        for rid in meta["saving_req_ids"]:
            self.reported[rid] = 0
        saved, _ = self.worker.get_finished(set(meta["finished_req_ids"]), set())
        done = set()
        for rank_saved in oc.allgather(list(saved)):
            for rid in rank_saved:
                n = self.reported[rid] + 1
                if n == self.world_size:
                    del self.reported[rid]
                    done.add(rid)
                else:
                    self.reported[rid] = n
        return done
