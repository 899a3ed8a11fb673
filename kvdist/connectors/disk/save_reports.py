"""Rank 0's view of the ranks' disk saves, from their reports.

Each rank reports, in steps where something changed (`DiskConnectorWorker
.build_worker_meta`):

    {"v": 1, "stored": bytes, "not_stored": bytes, "lost": bytes, "backlog": int,
     "full": True (only when so), "there": bytes (only when some),
     "loads_over": [request ids] (only when some)}

`stored` / `not_stored`: the 16-byte keys of blocks whose records this rank wrote / did
not write (the write failed, or the rank skipped the step's saves) since its last report,
empty on a replica rank (one that writes nothing); `lost`: keys of blocks whose records
were unusable when this rank loaded them (any rank, replicas too: the index forgets them);
`backlog`: bytes of its saves still waiting to be written; `full`: one of its writes found
the filesystem full since its last report (`full_ranks` after `apply`); `there`: keys of
`stored` whose record another writer had put there already (another engine saving the
block at the same moment): the index takes their share of the block off its ledger
(`DiskIndex.settle`); `loads_over`: requests of the metadata's `drain` whose load is over
on this rank (`load_drains`, applied by the scheduler). A block this
scheduler planned is settled once every writing rank reported it (the replicas of a head
past the first never write, so never report): complete on disk if all stored it, and
rank 0 finds it whole (looked for in the first blocks: `not_shared`); else incomplete, to
be saved again or evicted. Until then it stays in flight, so it is neither saved again nor
evicted while a rank is still writing it, however long its writes wait in a queue (from
the first report on: an engine that never passes the reports leaves the index's
`pending_timeout_s` in charge).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kvdist.api.types import ConnectorContext
from kvdist.connectors.disk.index import DiskIndex
from kvdist.connectors.disk.store import block_dir, list_records
from kvdist.connectors.tracking import check_report, unpack_hashes
from kvdist.kv.hashing import HASH_BYTES
from kvdist.kv.layout import kv_head_shard

_CHECKED = 16
"""Blocks stored on every rank whose records rank 0 looks for (the first ones)."""


class SaveReports:
    def __init__(
        self,
        ctx: ConnectorContext,
        index: DiskIndex,
        *,
        give_up_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`give_up_s`: how long a planned block waits for its reports before it is
        forgotten here (the index stops treating it as in flight after as long)."""
        world, heads = ctx.world_size, ctx.num_kv_heads
        self.writers = frozenset(
            r for r in range(world) if kv_head_shard(r, world, heads).replica == 0
        )
        self.backlog: dict[int, int] = {}
        """Each rank's bytes of saves waiting to be written, as last reported."""
        self.full_ranks: list[int] = []
        """The ranks whose last report (in the last `apply`) said a write found no room."""
        self.unseen = 0
        """Of the first `_CHECKED` blocks every writing rank stored, those whose records
        rank 0 did not all find (one may be late on a network filesystem; all of them: the
        ranks do not share the directory, `not_shared`)."""
        self._checks_left = _CHECKED
        self._index = index
        # key -> (planned at, {rank: stored?}, ranks whose record was there already)
        self._awaiting: dict[bytes, tuple[float, dict[int, bool], set[int]]] = {}
        self.active = False
        """Whether reports arrive (the engine passes them on): set by the first."""
        self._give_up_s = give_up_s
        self._clock = clock
        self._purged_at = clock()

    def __len__(self) -> int:
        """Blocks planned and not yet reported by every writing rank."""
        return len(self._awaiting)

    @property
    def not_shared(self) -> bool:
        """Whether rank 0 found none of the first blocks the other ranks stored."""
        return self.unseen == _CHECKED

    def awaits(self, key: bytes) -> bool:
        """Whether block `key` was planned and some writing rank has not reported it yet
        (always False until reports arrive)."""
        return self.active and key in self._awaiting

    def planned(self, keys: list[bytes]) -> None:
        """This step's metadata asks the ranks to save blocks `keys`."""
        now = self._clock()
        for key in keys:
            self._awaiting.setdefault(key, (now, {}, set()))

    def expire(self) -> None:
        """Forget reports that never came (every step: blocks awaiting them are not
        evicted): all of them when the engine does not pass them on, and, once it does,
        one lost (a bug) after ten times as long."""
        now = self._clock()
        give_up_s = self._give_up_s * (10 if self.active else 1)
        if now - self._purged_at > give_up_s:
            self._purged_at = now
            old = now - give_up_s
            self._awaiting = {k: v for k, v in self._awaiting.items() if v[0] >= old}

    def ranks_behind(self, step_bytes: int, bound: int) -> dict[int, int]:
        """Ranks whose waiting bytes plus `step_bytes` pass `bound` (a rank with nothing
        waiting never does: a step alone larger than the bound is still saved), with
        their waiting bytes."""
        return {r: b for r, b in self.backlog.items() if b and b + step_bytes > bound}

    def apply(self, worker_metas: list[Any]) -> tuple[int, int]:
        """Take every rank's report (None: nothing new); settle the blocks every writing
        rank has now reported in the index. Returns (blocks complete, blocks incomplete)
        settled. A malformed report raises `ValueError` naming its rank, before any
        report is applied."""
        checked = [
            (rank, _check(meta, rank, rank in self.writers))
            for rank, meta in enumerate(worker_metas)
            if meta is not None
        ]
        self.active = True
        complete = incomplete = 0
        self.full_ranks = [rank for rank, meta in checked if meta.get("full", False)]
        for rank, meta in checked:
            self.backlog[rank] = meta["backlog"]
            for key in unpack_hashes(meta.get("there", b"")):
                entry = self._awaiting.get(key)
                if entry is not None:
                    entry[2].add(rank)
            for key in unpack_hashes(meta["lost"]):
                # Its record was unusable on that rank (and removed when corrupt): the
                # block is saved again by the next request that computes or holds it.
                self._index.lost(key)
            for name, ok in (("stored", True), ("not_stored", False)):
                for key in unpack_hashes(meta[name]):
                    entry = self._awaiting.get(key)
                    if entry is None:
                        continue  # not planned here, or given up on
                    outcomes = entry[1]
                    outcomes[rank] = ok
                    if len(outcomes) < len(self.writers):
                        continue
                    del self._awaiting[key]
                    there = len(entry[2]) / len(self.writers)  # the writers' shares are equal
                    all_stored = all(outcomes.values())
                    if all_stored and self._checks_left:
                        # Rank 0 must see what the others wrote: not so where each node
                        # has a copy of the directory (its id copied too). Then its own
                        # records are there and the others' are not; a block with none
                        # left was evicted (another engine's trim): no check made.
                        if self._index.probe(key):
                            self._checks_left -= 1
                        else:
                            all_stored = False
                            if list_records(block_dir(self._index.ns_dir, key)):
                                self._checks_left -= 1
                                self.unseen += 1
                    self._index.settle(key, all_stored, found_there=there)
                    complete += all_stored
                    incomplete += not all_stored
        return complete, incomplete


def _check(meta: Any, rank: int, writes: bool) -> dict[str, Any]:
    meta = check_report(meta, "disk", rank)
    backlog = meta.get("backlog")
    if type(backlog) is not int or backlog < 0:
        raise ValueError(f"disk connector: rank {rank} reported backlog={backlog!r}")
    if type(meta.get("full", False)) is not bool:
        raise ValueError(f"disk connector: rank {rank} reported full={meta['full']!r}")
    over = meta.get("loads_over", [])
    if type(over) is not list or not all(type(r) is str for r in over):
        raise ValueError(
            f"disk connector: rank {rank} reported loads_over={over!r:.60}, not a list of "
            "request ids"
        )
    for name in ("stored", "not_stored", "lost", "there"):
        keys = meta.get(name, b"" if name == "there" else None)
        if type(keys) is not bytes or len(keys) % HASH_BYTES:
            raise ValueError(
                f"disk connector: rank {rank} reported {name}={keys!r:.60}, not "
                f"{HASH_BYTES}-byte block keys"
            )
        if keys and not writes and name != "lost":
            raise ValueError(
                f"disk connector: rank {rank} reported blocks {name}, but it is a replica "
                "of another rank's KV heads and writes none"
            )
    return meta
