"""`kvdist.LLM`: the reference engine's entry point.

Every rank constructs the same `LLM` and calls `generate` with the same prompts (SPMD).
Rank 0 schedules and samples; every rank runs its shard of the model and its connector
worker; the coordinator carries one plan broadcast and one report exchange per step.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import logging
import time
import traceback
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import msgpack
import torch

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import ConnectorConfig, ConnectorContext, Request, SchedulerOutput
from kvdist.comm.launch_env import read_launch_env
from kvdist.comm.setup import Topology, init_distributed
from kvdist.coordination.connector_start import (
    connector_stats,
    shutdown_connector,
    start_connector,
)
from kvdist.coordination.coordinator import Coordinator
from kvdist.coordination.errors import ConnectorError, call_hook
from kvdist.engine.block_manager import BlockManager
from kvdist.engine.config import EngineConfig
from kvdist.engine.decode_graphs import DecodeGraphs
from kvdist.engine.inputs import (
    Limits,
    Prompt,
    check_prompt,
    params_for,
    params_key,
    prompt_list,
    salts_for,
)
from kvdist.engine.model import TPInfo, load_model, parse_dtype
from kvdist.engine.outputs import RequestOutput
from kvdist.engine.runner import LayerHooks, ModelRunner
from kvdist.engine.sampling import Sampler, SamplingParams
from kvdist.engine.scheduler import COUNTER_NAMES, Scheduler
from kvdist.engine.sequence import Sequence as Seq
from kvdist.engine.stats import EngineStats
from kvdist.kv.hashing import make_namespace, root_hash
from kvdist.kv.layout import allocate_kv_cache, kv_cache_room
from kvdist.wire.codec import Plan

log = logging.getLogger("kvdist")


class ForwardError(RuntimeError):
    """The model's forward failed on this rank. Raised at once, without the step's report
    exchange: the other ranks may be waiting in this rank's tensor-parallel collectives
    (under `kvdist.comm.abort_on_error`, or a launcher, the job then ends)."""


class LLM:
    """An engine over one model, sharded over the launched ranks."""

    def __init__(
        self,
        model: str,
        connector: ConnectorConfig | str | dict[str, Any] | None = None,
        tensor_parallel_size: int | None = None,
        block_size: int = 16,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        topology: Topology | None = None,
        **engine_kwargs: Any,
    ):
        self.config = EngineConfig(block_size=block_size, **engine_kwargs)
        self._owns_topology = topology is None
        if topology is None:
            env = read_launch_env()
            if self.config.timeout_s is not None:  # the TP collectives' deadline too
                env = replace(env, timeout_s=self.config.timeout_s)
            topology = init_distributed(env=env, device=device)
        self.topology = topology
        self.connector_scheduler: ConnectorScheduler | None = None
        self.connector_worker: ConnectorWorker | None = None
        try:
            self._start(model, connector, tensor_parallel_size, block_size, dtype)
        except BaseException:
            # Leave the process as it was: what started is stopped, so that a corrected
            # `LLM(...)` can start again (it would find torch.distributed initialised).
            shutdown_connector(self.connector_scheduler, self.connector_worker)
            if self._owns_topology:
                self.topology.close()
            raise

    def _start(
        self,
        model: str,
        connector: ConnectorConfig | str | dict[str, Any] | None,
        tensor_parallel_size: int | None,
        block_size: int,
        dtype: str | torch.dtype | None,
    ) -> None:
        """Everything `__init__` does once the ranks can talk: model, KV cache, connector,
        coordinator, runner, scheduler."""
        topo = self.topology
        self.rank, self.world_size = topo.rank, topo.world_size
        if tensor_parallel_size is not None and tensor_parallel_size != topo.world_size:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} but {topo.world_size} rank(s) were "
                f"launched; launch with e.g. `launch/mpirun.sh -n {tensor_parallel_size} ...`"
            )
        self.device = topo.device
        self.dtype = _resolve_dtype(dtype, self.device)
        self.timeout_s = self.config.timeout_s or topo.env.timeout_s
        # Where the deadline was set, for the errors that quote it.
        self._timeout_name = "timeout_s" if self.config.timeout_s else "KVDIST_TIMEOUT_S"
        self.load_timeout_s = self.config.load_timeout_s or self.timeout_s
        tp = TPInfo(rank=topo.rank, size=topo.world_size, group=topo.tp_group)
        self.model, self.model_config, self.tokenizer, fingerprint = load_model(
            model, tp=tp, dtype=self.dtype, device=self.device
        )
        mc = self.model_config
        self.max_model_len = min(
            self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        if self.rank == 0 and (self.config.max_model_len or 0) > self.max_model_len:
            log.warning(
                "max_model_len=%d is past the model's context (max_position_embeddings=%d): "
                "requests are limited to %d tokens",
                self.config.max_model_len, self.max_model_len, self.max_model_len,
            )  # fmt: skip
        if block_size > self.max_model_len:
            raise ValueError(
                f"block_size={block_size} is more than the model's context "
                f"(max_model_len={self.max_model_len}): a block holds that many tokens"
            )
        self.namespace = make_namespace(
            fingerprint, str(self.dtype).removeprefix("torch."), block_size
        )
        base_ctx = ConnectorContext.for_rank(
            rank=topo.rank,
            world_size=topo.world_size,
            num_kv_heads=mc.num_kv_heads,
            num_layers=mc.num_layers,
            block_size=block_size,
            head_dim=mc.head_dim,
            dtype=self.dtype,
            device=self.device,
            model_namespace=self.namespace,
            ranks_on_host=topo.env.local_world_size,
        )
        num_blocks = self._agree_on_model_and_blocks(base_ctx)
        self.num_blocks = num_blocks  # of the KV cache, on every rank
        self._after_step_error: Exception | None = None  # rank 0's, sent with the next plan
        self._idle_polls = 0  # steps in a row with only transfers in flight and none done
        self.block_size = block_size
        self.kv_cache = allocate_kv_cache(base_ctx, num_blocks)
        if connector is not None:
            cfg = ConnectorConfig.from_any(connector)
            ctx = replace(base_ctx, num_blocks=num_blocks, kwargs=dict(cfg.kwargs))
            self.connector_scheduler, self.connector_worker = start_connector(
                cfg, ctx, self.kv_cache, topo.comm, self.timeout_s
            )
        self.stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.coordinator = Coordinator(
            topo.comm, self.connector_worker, timeout_s=self.timeout_s, num_blocks=num_blocks
        )
        self.graphs = self._decode_graphs(topo)
        self._graph_stats = self.graphs.stats if self.graphs is not None else None
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            block_size=block_size,
            device=self.device,
            graphs=self.graphs,
        )
        self.hooks = (
            LayerHooks(self.connector_worker, self.stream) if self.connector_worker else None
        )
        self.sampler = Sampler(self.config.seed)
        self.scheduler: Scheduler | None = None
        if topo.rank == 0:
            self.blocks = BlockManager(num_blocks, block_size, self.config.enable_prefix_caching)
            self.scheduler = Scheduler(
                self.config, self.blocks, self.connector_scheduler, max_model_len=self.max_model_len
            )
            eos = mc.eos_token_id
            self.scheduler.eos_token_ids = frozenset(
                [] if eos is None else [eos] if isinstance(eos, int) else eos
            )
        self._engine_stats = EngineStats()
        self._num_requests = 0
        self._closed = False
        self._failed: str | None = None  # why a step failed; the engine is unusable since
        self._in_on_step = False  # a generate call's on_step is running
        # Rank 0's scheduler counters, as the last generate call's results brought them.
        self._scheduler_counters = dict.fromkeys(COUNTER_NAMES, 0)
        ref = weakref.ref(self)

        def _at_exit() -> None:
            llm = ref()
            if llm is not None:
                llm.shutdown()

        self._atexit = _at_exit
        atexit.register(self._atexit)
        # The model and caches are long-lived: keep them out of every later GC pass, which
        # otherwise shows up as multi-millisecond spikes in step times.
        gc.freeze()

    # -- public API -------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | Sequence[str | None] | None = None,
        on_step: Callable[[LLM, int], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; every rank returns the same list, in prompt order.

        A prompt that cannot be served (empty, too long, ids outside the vocabulary) gets an
        output with finish_reason "error" and the others are served as usual. `on_step`, if
        given, is called on every rank after each step (e.g. to abort requests); if it
        raises, this call's requests are aborted and the exception goes to the caller.
        `cache_salt` (one for all prompts, or one per prompt) keeps a request's KV apart:
        only requests with the same salt share cached blocks, on device and in connectors."""
        self._check_open()
        prompts = prompt_list(prompts)
        params_list = params_for(sampling_params, len(prompts))
        salts = salts_for(cache_salt, len(prompts))
        limits = Limits(
            self.model_config.vocab_size, self.max_model_len, self.block_size, self.num_blocks
        )
        outputs: dict[str, RequestOutput] = {}
        order: list[str] = []
        queued: list[tuple[Seq, bytes]] = []
        digest = hashlib.blake2b(digest_size=16)
        first_request = self._num_requests
        # Every rank checks every prompt the same way, and nothing is queued before all
        # are checked: a prompt that fails fails alone, on every rank, and a call that
        # raises leaves nothing behind.
        for prompt, params, salt in zip(prompts, params_list, salts):
            rid = f"req-{self._num_requests}"
            self._num_requests += 1
            order.append(rid)
            try:  # whatever is wrong with one prompt fails that prompt only
                tokens, checked, error = check_prompt(prompt, params, self.tokenizer, limits)
                if checked is not None:
                    params = checked
                    root = root_hash(self.namespace, salt)
                    generator = self.sampler.make_generator(params, self._num_requests)
            except Exception as exc:
                tokens, error = [], f"{type(exc).__name__}: {exc}"
            if error is not None:
                digest.update(b"\0error")  # its text may name objects: not the same bytes
                outputs[rid] = RequestOutput(rid, tokens, finish_reason="error", error=error)
                continue
            digest.update(array("i", tokens).tobytes())
            digest.update(repr((params_key(params), salt)).encode())
            req = Request(
                request_id=rid,
                prompt_token_ids=tokens,
                cache_salt=salt,
                max_tokens=params.max_tokens,
            )
            queued.append((Seq(req, params, index=self._num_requests, generator=generator), root))
        try:
            self._check_same_call(digest.digest())
        except ValueError:
            # Refused on every rank: none counts its requests (ranks given more prompts
            # would otherwise number their next requests ahead of rank 0's).
            self._num_requests = first_request
            raise
        if self.scheduler is not None:
            for seq, root in queued:
                self.scheduler.add(seq, root)
        try:
            while self._stepped():
                if on_step is not None:
                    self._in_on_step = True
                    try:
                        on_step(self, self.coordinator.stats.steps)
                    finally:
                        self._in_on_step = False
        except BaseException:
            if self._failed is None:  # on_step raised (Ctrl-C, say), between two steps
                # The engine is sound, but nobody will return this call's requests: abort
                # them (rank 0), or the next call would run them first for nothing.
                for rid in order:
                    self.abort_request(rid)
            raise
        finished = self._collect_finished()
        for out in finished:
            outputs[out.request_id] = out
        return [outputs[rid] for rid in order]

    def _check_same_call(self, digest: bytes) -> None:
        """Every rank must call generate with the same prompts and parameters (rank 0
        schedules, the others follow its plan): a rank that did not would get rank 0's
        results for its own prompts. One exchange per call checks it."""
        if self.world_size == 1:
            return
        digests = self.topology.comm.allgather_bytes(
            digest, timeout_s=self.timeout_s, what="generate arguments"
        )
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise ValueError(
                f"generate was called with other prompts or parameters on rank(s) "
                f"{differ} than on rank 0: every rank must pass the same"
            )

    def _stepped(self) -> bool:
        """One step of `generate`. A step that raises (on every rank, together) leaves the
        scheduler, the ranks and the connector out of step with one another: the engine
        refuses further work from then on, and `shutdown` does not drain through it."""
        try:
            return self._step(stop_when_idle=True)
        except BaseException as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            raise

    def abort_request(self, request_id: str) -> bool:
        """Abort a request (effective on rank 0, a no-op elsewhere); False if unknown.

        The connector's `request_finished` runs here, outside a step: if it raises, the
        error is not this caller's alone. It travels with the next plan, and every rank
        raises it there together (the engine then refuses further work)."""
        if self.scheduler is None:
            return False
        try:
            return self.scheduler.abort(request_id)
        except ConnectorError as exc:
            log.error("aborting %s: %s", request_id, exc)
            self._after_step_error = exc
            return True

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of this rank: steps, control-plane collectives and time, engine overhead,
        and the connector's transfer counters; and the scheduler's counters, which live on
        rank 0: the other ranks hold rank 0's as of the end of the last `generate` call
        (zeros before the first)."""
        out: dict[str, Any] = {}
        out.update(self.coordinator.stats.as_dict())
        out.update(self._engine_stats.as_dict())
        if self._graph_stats is not None:
            out["cuda_graphs_captured"] = self._graph_stats.captured
            out["cuda_graph_capture_seconds"] = self._graph_stats.capture_seconds
        # Rank 0's own, live; elsewhere rank 0's as of the last generate call's end.
        out.update(
            self.scheduler.counters if self.scheduler is not None else self._scheduler_counters
        )
        for k, v in connector_stats(self.connector_scheduler, self.connector_worker).items():
            out[f"connector_{k}"] = v
        return out

    def _decode_graphs(self, topo: Topology) -> DecodeGraphs | None:
        """Decode graphs when asked for and possible: on CUDA, with NCCL between the ranks
        (a gloo all-reduce cannot be captured)."""
        if not self.config.cuda_graphs or self.device.type != "cuda":
            return None
        if topo.world_size > 1 and topo.tp_backend != "nccl":
            log.info("decode steps run eagerly: CUDA graphs need NCCL, not %s", topo.tp_backend)
            return None
        return DecodeGraphs(
            self.model,
            self.kv_cache,
            block_size=self.config.block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
        )

    def num_used_blocks(self) -> int:
        """Blocks in use on rank 0 (-1 on other ranks)."""
        return self.blocks.num_used if self.scheduler is not None else -1

    def shutdown(self, *, drain: bool = True) -> None:
        """Wait (within the collective deadline) for in-flight saves on every rank, then stop
        (after a failed step, without waiting: the engine's steps are what failed).
        `drain=False` does not step the engine again either (no collective): for unwinding
        after an interrupt, where the other ranks may not step with this one. Each rank's
        connector still finishes its own writes before it stops.

        Every rank must call it (a normal interpreter exit does). The model and the KV cache
        are released: their memory is freed once no connector holds the cache, and the
        model's reference to the tensor-parallel group no longer keeps the group alive
        into interpreter shutdown."""
        if self._closed:
            return
        self._refuse_in_on_step("shutdown")
        self._closed = True
        atexit.unregister(self._atexit)
        errors: list[BaseException] = []
        broken = self.topology.comm.broken  # no step can run: the ranks are out of step
        try:
            deadline = time.monotonic() + self.timeout_s
            while (drain and self._failed is None and broken is None) and self._step(
                stop_when_idle=True, drain=True, deadline=deadline
            ):
                pass
        except BaseException as exc:
            errors.append(exc)
        finally:
            # The connector shuts down and the engine releases what it holds whatever
            # fails; the first error is raised at the end, the rest logged.
            errors += shutdown_connector(self.connector_scheduler, self.connector_worker)
            del self.runner, self.model, self.kv_cache
            self.graphs = None  # it holds the model, the cache and the graphs' memory pool
            # The model holds reference cycles (layers and their weight loaders) that
            # gc.freeze() in __init__ put out of the collector's reach; without this they,
            # and the process group they reference, would live into interpreter shutdown.
            gc.unfreeze()
            gc.collect()
            broken = broken or self.topology.comm.broken  # or a collective of the drain
            if self._owns_topology and broken is not None and self.world_size > 1:
                # Other ranks may wait in a collective for ever, and MPI's finalize at
                # this process's exit with them: end the job (abort_on_error around the
                # caller's code would have).
                log.error(
                    "rank %d: a collective failed (%s): ending the job, whose ranks are "
                    "out of step", self.rank, broken,
                )  # fmt: skip
                self.topology.comm.abort(1)
            if self._owns_topology:
                try:
                    self.topology.close()
                except Exception as exc:
                    errors.append(exc)
            for later in errors[1:]:
                log.error("shutdown: also %s: %s", type(later).__name__, later)
            if errors:
                raise errors[0]

    # -- the step ---------------------------------------------------------------------
    def _step(self, *, stop_when_idle: bool, drain: bool = False, deadline: float = 0.0) -> bool:
        t0 = time.perf_counter()
        sched = self.scheduler
        step_plan = None
        plan = None
        if sched is not None:
            # A request held at its finish may need one more step for its saves to start
            # (a connector saves the blocks of a step that loaded synchronously after it).
            # Shutting down, the ranks hear of the last finished requests too: every id
            # reaches the workers' get_finished.
            busy = (
                sched.has_unfinished()
                or sched.has_unsent_saves()
                or (drain and (sched.has_held() or sched.has_unsent_finished()))
            )
            try:
                if self._after_step_error is not None:
                    failed, self._after_step_error = self._after_step_error, None
                    raise failed
                if drain and busy and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"shutdown: transfers did not finish on every rank within "
                        f"{self.timeout_s:g}s ({self._timeout_name}): "
                        f"{self._pending_transfers() or 'none pending'}"
                    )
                if sched.loading:
                    sched.expire_loads(self.load_timeout_s, lambda r: self._waiting_for(r, "load"))
                sched.expire_stalled(self.timeout_s, self._timeout_name, self._pending_transfers)
                if not busy and stop_when_idle:
                    plan = Plan(step=sched.step, scheduler_output=_empty(sched.step), stop=True)
                else:
                    step_plan = sched.schedule()
                    meta = (
                        call_hook(
                            self.connector_scheduler, "build_connector_meta", step_plan.output
                        )
                        if self.connector_scheduler is not None
                        else None
                    )
                    plan = Plan(
                        step=sched.step,
                        scheduler_output=step_plan.output,
                        loading_req_ids=step_plan.loading_req_ids,
                        saving_req_ids=step_plan.saving_req_ids,
                        connector_meta=meta,
                    )
            except Exception as exc:
                log.error("rank 0 failed to plan step %d:\n%s", sched.step, traceback.format_exc())
                plan = Plan(
                    step=sched.step,
                    scheduler_output=_empty(sched.step),
                    error=f"{type(exc).__name__}: {exc}",
                )
        plan = self.coordinator.publish_plan(plan)
        if plan.stop:
            return False
        result = None
        device_wait_s = 0.0
        connector_s = 0.0  # start_load_kv and wait_for_save; per-layer hooks are in result
        # A connector that fails on this rank is left out for the rest of the step, but the
        # forward still runs: the other ranks wait for this one in its all-reduces. The
        # error then ends the step on every rank, in the report exchange.
        error: BaseException | None = self.coordinator.bind_error
        worker = self.connector_worker if error is None else None
        try:
            out = plan.scheduler_output
            self._model_call(plan.step, self.runner.apply_plan, out)
            if worker is not None:
                t = time.perf_counter()
                try:
                    call_hook(worker, "start_load_kv", self.stream)
                except ConnectorError as exc:
                    error, worker = exc, None
                connector_s += time.perf_counter() - t
            if out.new_requests or out.cached_requests:
                hooks = self.hooks if worker is not None else None
                if hooks is not None:
                    hooks.reset()
                result = self._model_call(plan.step, self.runner.execute, out, hooks)
                if hooks is not None and hooks.error is not None:
                    error, worker = hooks.error, None
            if worker is not None:
                t = time.perf_counter()
                call_hook(worker, "wait_for_save", self.stream)
                connector_s += time.perf_counter() - t
        except ForwardError:
            raise
        except Exception as exc:
            error = error or exc
        if error is not None:
            log.error(
                "rank %d failed in step %d:\n%s", self.rank, plan.step,
                "".join(traceback.format_exception(error)),
            )  # fmt: skip
        consensus = self.coordinator.exchange_reports(plan, error=error)
        if sched is not None and step_plan is not None:
            try:
                if consensus.worker_metas and self.connector_scheduler is not None:
                    call_hook(
                        self.connector_scheduler, "update_from_workers", consensus.worker_metas
                    )
                sched.apply_consensus(consensus, step_plan)
                device_wait_s = self._wait_for_logits(result)
                sampled = self._sample(step_plan, result)
                sched.postprocess(step_plan, sampled)
            except Exception as exc:
                # The other ranks are past this step's collectives: the next plan carries
                # the error to them, and every rank raises it there.
                log.error("rank 0 failed after step %d:\n%s", plan.step, traceback.format_exc())
                self._after_step_error = exc
            if not step_plan.scheduled and (sched.loading or sched.held):
                # Only transfers in flight: let their threads run, polling less often the
                # longer nothing completes (0.5 ms, doubling up to 2 ms), so that a long
                # load does not cost thousands of empty steps.
                if consensus.saves_done or consensus.loads_done:
                    self._idle_polls = 0
                time.sleep(0.0005 * (1 << self._idle_polls))
                self._idle_polls = min(self._idle_polls + 1, 2)
            else:
                self._idle_polls = 0
        self._engine_stats.record_step(time.perf_counter() - t0, result, connector_s, device_wait_s)
        return True

    def _model_call(self, step: int, fn: Callable[..., Any], *args: Any) -> Any:
        """A call of the model runner for step `step`. A failure raises `ForwardError` at
        once: the other ranks may be waiting in this rank's tensor-parallel collectives,
        so the report exchange that tells them of a connector's failure would only wait
        out its deadline (and blame them)."""
        try:
            return fn(*args)
        except Exception as exc:
            hint = ""
            if self.world_size > 1 and "time" in str(exc).lower():
                hint = (
                    " (from the other ranks, a rank that is late or gone looks like this: "
                    "their tensor-parallel collectives time out after "
                    f"{self._timeout_name if self._owns_topology else 'KVDIST_TIMEOUT_S'})"
                )
            raise ForwardError(
                f"rank {self.rank} failed in the forward of step {step}: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc

    def _pending_transfers(self, limit: int = 8) -> str:
        """The async transfers rank 0 waits for, with the ranks that have not reported
        them (the first `limit`), for error messages."""
        assert self.scheduler is not None
        late = [
            f"{rid} {kind}: {self._waiting_for(rid, kind)}"
            for rid, kinds in sorted(self.scheduler.pending.items())
            for kind in sorted(kinds)
        ]
        more = f"; and {len(late) - limit} more" if len(late) > limit else ""
        return "; ".join(late[:limit]) + more

    def _waiting_for(self, request_id: str, kind: str) -> str:
        """Which ranks have not reported the async `kind` ("save" or "load") of
        `request_id`, for error messages."""
        missing = self.coordinator.waiting_for(request_id, kind)
        if missing is None:
            return "not handed to the workers yet"
        return f"rank(s) {', '.join(map(str, missing))} have not reported it"

    def _wait_for_logits(self, result) -> float:
        """Seconds rank 0 waits for the forward to finish on the device before sampling
        (the sampler would wait there anyway): model time, not engine overhead."""
        if self.stream is None or result is None or result.logits is None:
            return 0.0
        t = time.perf_counter()
        self.stream.synchronize()
        return time.perf_counter() - t

    def _sample(self, step_plan, result) -> dict[str, int]:
        if result is None or result.logits is None:
            return {}
        live = {e.seq.request_id: e for e in step_plan.scheduled if e.sample and not e.rolled_back}
        rows = [i for i, rid in enumerate(result.sample_ids) if rid in live]
        if not rows:
            return {}
        seqs = [live[result.sample_ids[i]].seq for i in rows]
        tokens = self.sampler.sample(
            result.logits[rows], [s.params for s in seqs], [s.generator for s in seqs]
        )
        now = time.perf_counter()
        for s in seqs:
            if s.first_token_time is None:
                s.first_token_time = now
        return {s.request_id: t for s, t in zip(seqs, tokens)}

    # -- helpers ----------------------------------------------------------------------
    def _collect_finished(self) -> list[RequestOutput]:
        """Rank 0's finished outputs, broadcast so every rank returns the same list, with
        its scheduler's counters: every rank's `stats` then holds them as of this call."""
        payload = None
        if self.scheduler is not None:
            outs = [self._to_output(s) for s in self.scheduler.newly_finished]
            self.scheduler.newly_finished.clear()
            payload = msgpack.packb(
                [[o.to_wire() for o in outs], self.scheduler.counters], use_bin_type=True
            )
        data = self.topology.comm.broadcast_bytes(
            payload, root=0, timeout_s=self.timeout_s, what="generate results"
        )
        outs_wire, counters = msgpack.unpackb(data, raw=False)
        self._scheduler_counters = counters
        return [RequestOutput.from_wire(x) for x in outs_wire]

    def _to_output(self, seq: Seq) -> RequestOutput:
        toks = list(seq.request.output_token_ids)
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
        ttft = (seq.first_token_time - seq.arrival_time) if seq.first_token_time else 0.0
        queue = (seq.admission_time - seq.arrival_time) if seq.admission_time else 0.0
        return RequestOutput(
            seq.request_id,
            list(seq.request.prompt_token_ids),
            toks,
            text,
            seq.num_cached_tokens,
            seq.num_external_tokens,
            ttft,
            seq.finish_reason,
            seq.error,
            queue,
        )

    def _agree_on_model_and_blocks(self, ctx: ConnectorContext) -> int:
        """The KV cache's block count, the same on every rank, from the one exchange of
        the engine's start, which also checks that every rank loaded the same model.
        Raises `ValueError` on every rank when they did not, or were given different
        `num_blocks`."""
        mine = self.config.num_blocks
        budget = None
        if mine is None:
            budget = self.config.kv_cache_memory_bytes
            if budget is None:
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    budget = free // 2
                else:
                    budget = 256 * 2**20
            mine = budget // ctx.block_shard_bytes
        given = self.config.num_blocks is not None
        room, where = kv_cache_room(ctx)
        ranks = [
            msgpack.unpackb(b)
            for b in self.topology.comm.allgather_bytes(
                msgpack.packb([self.namespace, mine, given, budget, room, where]),
                timeout_s=self.timeout_s,
                what="engine start",
            )
        ]
        small = [(r, n, b) for r, (_, n, g, b, *_) in enumerate(ranks) if not g and n < 2]
        if small:  # said on every rank
            r, n, b = small[0]
            source = (
                "kv_cache_memory_bytes"
                if self.config.kv_cache_memory_bytes is not None
                else "the default KV cache budget (half the free GPU memory; 256 MiB on CPU)"
            )
            raise ValueError(
                f"{source} gives rank {r} {b} bytes, {n} KV block(s) of "
                f"{ctx.block_shard_bytes} bytes; the cache needs at least 2: give it more "
                "memory, or set num_blocks"
            )
        other_model = [r for r, (ns, *_) in enumerate(ranks) if ns != ranks[0][0]]
        if other_model:
            r = other_model[0]
            raise ValueError(
                f"rank(s) {other_model} loaded another model than rank 0 (weights, dtype or "
                f"block size differ: {ranks[r][0]!r} on rank {r}, {ranks[0][0]!r} on rank "
                "0): every rank must load the same checkpoint"
            )
        counts = {(n, g) for _, n, g, *_ in ranks}
        if any(g for _, g in counts) and len(counts) > 1:
            raise ValueError(
                "num_blocks differs between ranks ("
                + ", ".join(
                    f"{n if g else 'unset'} on rank {r}" for r, (_, n, g, *_) in enumerate(ranks)
                )
                + "): pass the same on every rank, or leave it unset everywhere"
            )
        # Unset, ranks may see different free memory: the least fits everywhere.
        num_blocks = min(n for _, n, *_ in ranks)
        need = num_blocks * ctx.block_shard_bytes
        short = [(r, room, at) for r, (*_, room, at) in enumerate(ranks) if room and need > room]
        if short:  # said on every rank: none is left waiting for another's KV cache
            r, room, at = short[0]
            raise ValueError(
                f"num_blocks={num_blocks} needs {need} bytes of KV cache per rank, more than "
                f"rank {r} has ({room} bytes: {at}); lower num_blocks (or "
                "kv_cache_memory_bytes)"
            )
        return num_blocks

    def _refuse_in_on_step(self, what: str) -> None:
        """From `on_step`, the call under way would go on stepping an engine that a nested
        `generate` had taken its finished requests from (a KeyError for their ids), or
        that `shutdown` had released."""
        if self._in_on_step:
            raise RuntimeError(
                f"{what} was called from generate's on_step: the generate call is still "
                "running; call it after generate returns (abort_request ends requests early)"
            )

    def _check_open(self) -> None:
        self._refuse_in_on_step("generate")
        if self._closed:
            raise RuntimeError("this LLM was shut down")
        if self._failed is not None:
            if self._failed.startswith("ForwardError"):
                advice = (
                    "the ranks' tensor-parallel group may be broken too: shut it down, "
                    "close the topology and end the processes"
                )
            else:
                advice = "shut it down and create a new one"
            raise RuntimeError(
                f"this LLM is unusable after a failed step ({self._failed}); {advice}"
            )


def _empty(step: int) -> SchedulerOutput:
    return SchedulerOutput(step=step)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)
