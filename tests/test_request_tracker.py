"""`kvdist.connectors.tracking.RequestTracker` (the built-in schedulers' record of what each
request has computed and saved: cpu's, disk's, and so tiered's) across a preemption."""

from kvdist.api.types import Request, SchedulerOutput
from kvdist.connectors.tracking import RequestTracker
from kvdist.kv.hashing import extend_from_root


def test_a_preempted_request_offers_no_stale_deferred_blocks_at_its_finish() -> None:
    """A step that loads a request synchronously defers its saves to the request's next
    step. Preempted before that step, then re-admitted with less computed and aborted, the
    request used to offer, from its new blocks, the blocks the first step had computed:
    half-computed KV went into the cpu pool (or a tier's disk) under the prompt's hashes,
    and a later request loading that prefix generated other tokens."""
    tr = RequestTracker(16, 64)
    req = Request("a", list(range(1, 81)))  # 5 blocks
    extend_from_root(req.block_hashes, req.prompt_token_ids, 16, bytes(16))
    tr.match(req, 0, lambda key: True, load_async=False)
    tr.admit(req, [5, 3, 2, 1, 0], 48)  # loads blocks 0..2, computes tokens 48..80
    so = SchedulerOutput(step=1)
    so.new_requests.add("a", req.prompt_token_ids, [5, 3, 2, 1, 0], 48, 32)
    so.sync_load_req_ids.append("a")
    assert tr.update(so) == []  # deferred: blocks 0..4 offered in its next step
    so = SchedulerOutput(step=2)
    so.preempted_req_ids.append("a")  # its blocks are freed before that step
    tr.update(so)
    tr.match(req, 0, lambda key: key in req.block_hashes[:3], load_async=False)
    tr.admit(req, [1, 2, 3, 5], 48)  # 48 loaded again, only 9 computed this time
    so = SchedulerOutput(step=3)
    so.new_requests.add("a", req.prompt_token_ids, [1, 2, 3, 5], 48, 9)
    so.sync_load_req_ids.append("a")
    tr.update(so)
    # Aborted now: blocks 0..2 were loaded in this step (the load did not fail: the
    # request finished), block 3 holds 9 of its 16 tokens and block 4 none.
    unsaved = tr.unsaved_at_finish("a", [1, 2, 3, 5])
    assert unsaved is not None and unsaved[1:] == (0, 3), unsaved and unsaved[1:]
