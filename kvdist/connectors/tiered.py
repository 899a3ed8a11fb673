"""The `tiered` connector: stacks any connectors, fastest first (e.g. cpu in front of disk).

Loads: every tier is asked for a hit; the request loads from the tier with the most tokens,
the fastest among equals. The other tiers are told 0 external tokens (each tier sees the
hooks in the order a connector of its own would: asked, then told, then finished). Saves: every tier plans and writes its own (write
through), so a block served by a slow tier is also saved by the faster tiers that lack it
(promotion: a disk hit lands in the cpu pool). A request's save counts as done when every
tier that held its blocks (`request_finished` True) reported it; its load when the chosen
tier did; load errors are the union over tiers.

Meta sent to every rank each step (plain msgpack data):

    {"v": 1,
     "tiers": [meta of tier 0, meta of tier 1, ...],
     "load_tier": {request id: tier index of its async load started this step},
     "held": {request id: [indices of the tiers that hold its blocks]}}

What a rank's tiers tell their schedulers travels as `{"v": 1, "tiers": [worker meta of
tier 0, ...]}` (None when every tier's is None), and each tier's scheduler gets its own.

`held` names the requests whose blocks some tier held since the last meta; the engine gives
workers every finished id, and only held ones may be reported. `request_finished(r)` comes
before the meta of the step whose `finished_req_ids` hold `r`, so `held` is never late.

The hooks that end something, hand the tiers something once, or take a tier's report
reach every tier even when one raises: `request_finished`, `shutdown`, `get_finished` (the
ids it hands on, the ones it takes back), the reports `update_from_workers` passes on, and
the worker's load errors and metas. A tier left out would keep a request's state, or its
threads, for good, or never hear (or give) a report. The first error is raised once every
tier has been called, naming its tier, and the others are logged (`_TierErrors`). What
the other tiers reported in a call that raised is returned by the next one (done ids,
failed blocks, so that none is taken for a good load); worker metas are lost with the
step instead, which fails on every rank, and logged. The hooks that plan or run a step
(lookup, allocation, metadata, loads and saves) stop at the first error: the step fails,
and telling the later tiers would only plan work that never runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.api.types import ConnectorConfig, ConnectorContext, Request, SchedulerOutput
from kvdist.connectors.registry import resolve_connector
from kvdist.connectors.settings import parse_settings, sum_stats
from kvdist.connectors.tracking import META_VERSION, check_meta, check_report
from kvdist.coordination.errors import ProtocolError, check_match_answer

log = logging.getLogger(__name__)

_MESSAGE_ONLY = (ValueError, TypeError, RuntimeError, ImportError, ProtocolError)
"""Error types built from a message alone: a tier's is raised as the same type, its
message naming the tier."""


def _check_disk_paths(configs: list[ConnectorConfig]) -> None:
    """Two `disk` tiers on one directory would each evict what the other saved, by its
    own count of the bytes there: refused, in nested `tiered` tiers too, and for a disk
    connector named by its module."""
    seen: dict[str, str] = {}
    for where, c in _leaf_tiers(configs, ""):
        path = c.kwargs.get("path") if _is_disk(c) else None
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            continue  # the disk connector's own settings check names what is wrong
        key = os.path.realpath(os.path.expanduser(os.fspath(path)))
        if key in seen:
            raise ValueError(
                f"tiered connector: tiers {seen[key]} and {where} are disk connectors on one "
                f"directory ({path!r}); give each its own"
            )
        seen[key] = where


def _leaf_tiers(configs: list[ConnectorConfig], prefix: str):
    """`(index path, config)` of every tier, those of nested `tiered` tiers by their path
    ("1.0": tier 0 of tier 1); malformed nested tiers are left to their own check."""
    for i, c in enumerate(configs):
        where = f"{prefix}{i}"
        nested = c.kwargs.get("tiers") if c.name == "tiered" else None
        if isinstance(nested, (list, tuple)):
            inner = []
            for t in nested:
                try:
                    inner.append(ConnectorConfig.from_any(t))
                except (TypeError, ValueError):
                    continue
            yield from _leaf_tiers(inner, f"{where}.")
        else:
            yield where, c


def _is_disk(c: ConnectorConfig) -> bool:
    if c.name == "disk":
        return True
    try:  # another name or a module path: a disk connector if its scheduler is one
        from kvdist.connectors.disk.scheduler import DiskConnectorScheduler

        scheduler = resolve_connector(c)[0]
    except Exception:
        return False  # building it names what is wrong
    return isinstance(scheduler, type) and issubclass(scheduler, DiskConnectorScheduler)


@dataclass(frozen=True, kw_only=True)
class TieredSettings:
    tiers: tuple[ConnectorConfig, ...]
    """Connector configs (ConnectorConfig, registered name, or dict), fastest first."""

    def __post_init__(self) -> None:
        tiers = self.tiers
        if not isinstance(tiers, (list, tuple)):
            raise ValueError(
                f"tiered connector: tiers must be a list of connector configs, got {tiers!r:.80}"
            )
        configs = []
        for i, t in enumerate(tiers):
            try:
                configs.append(ConnectorConfig.from_any(t))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"tiered connector: tier {i} ({t!r}): {exc}") from None
        if not configs:
            raise ValueError("tiered connector: tiers must name at least one connector")
        _check_disk_paths(configs)
        object.__setattr__(self, "tiers", tuple(configs))


def _build(ctx: ConnectorContext, role: int) -> list[Any]:
    """Every tier's scheduler (role 0) or worker (role 1); a tier that fails names its
    index, and the tiers built before it are shut down (their threads must not leak)."""
    settings = parse_settings(TieredSettings, ctx.kwargs, "tiered")
    out: list[Any] = []
    try:
        for i, cfg in enumerate(settings.tiers):
            try:
                cls = resolve_connector(cfg)[role]
                out.append(cls(ctx.with_kwargs(cfg.kwargs)))
            except (ValueError, TypeError, RuntimeError, ImportError) as exc:
                what = cfg.name or cfg.module
                if type(exc) not in (ValueError, TypeError, RuntimeError, ImportError):
                    raise  # its own type, with its own constructor: left as it is
                raise type(exc)(f"tiered connector, tier {i} ({what}): {exc}") from exc
    except BaseException:
        try:
            _shutdown_each(out)
        except Exception as exc:  # the start's own error is the one to report
            log.error("%s", exc)
        raise
    return out


class _TierErrors:
    """The errors of one hook run on every tier in turn (`with errors.of(i, tier): ...`),
    so that an error leaves none of the later tiers out. `raise_first` raises the first,
    naming its tier, and logs the others."""

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.errors: list[Exception] = []
        self._at: tuple[int, object] = (0, None)

    def of(self, index: int, tier: object) -> _TierErrors:
        # A plain context manager, not a generator's: get_finished enters one per tier on
        # every step.
        self._at = (index, tier)
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, Exception):  # Ctrl-C and SystemExit go on at once
            self.errors.append(_naming_tier(exc, *self._at, self.hook))
            return True
        return False

    def raise_first(self) -> None:
        for later in self.errors[1:]:
            log.error("also %s", later)
        if self.errors:
            raise self.errors[0]


def _naming_tier(exc: Exception, index: int, tier: object, hook: str) -> Exception:
    """`exc` again, its message naming the tier: of its own type where that takes a message
    alone, else a RuntimeError naming the type. `exc` is the cause."""
    where = f"tiered connector, tier {index} ({type(tier).__name__}) in {hook}"
    if type(exc) in _MESSAGE_ONLY:
        named = type(exc)(f"{where}: {exc}")
    else:
        named = RuntimeError(f"{where}: {type(exc).__name__}: {exc}")
    named.__cause__ = exc
    return named


def _shutdown_each(tiers: list[Any]) -> None:
    errors = _TierErrors("shutdown")
    for i, t in enumerate(tiers):
        with errors.of(i, t):
            t.shutdown()
    errors.raise_first()


class TieredConnectorScheduler(ConnectorScheduler):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.tiers: list[ConnectorScheduler] = _build(ctx, 0)
        self._choice: dict[str, tuple[int, bool]] = {}
        self._lookup_start: dict[str, int] = {}
        self._load_tier: dict[str, int] = {}
        self._held: dict[str, list[int]] = {}
        self._hits = self._misses = 0

    @property
    def stats(self) -> dict[str, float]:
        """The tiers' counters summed (a block written to two tiers counts twice: these
        are the tiers' traffic), with hits and misses of the stack as a whole."""
        s = sum_stats([getattr(t, "stats", {}) for t in self.tiers])
        s["hits"], s["misses"] = self._hits, self._misses
        return s

    @property
    def tier_stats(self) -> list[dict[str, float]]:
        """Each tier's own counters, fastest first."""
        return [dict(getattr(t, "stats", {})) for t in self.tiers]

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        best, best_answer = None, (0, False)
        # Every tier, even after one has every block: update_state_after_alloc and
        # request_finished follow for each, and a tier may keep state from its lookup.
        for i, tier in enumerate(self.tiers):
            # Each tier's answer is checked here: the engine sees only the one that wins.
            answer = check_match_answer(
                tier,
                tier.get_num_new_matched_tokens(request, num_computed_tokens),
                request.request_id,
            )
            if answer[0] > best_answer[0]:
                best, best_answer = i, answer
        self._choice.pop(request.request_id, None)
        self._lookup_start[request.request_id] = num_computed_tokens // self.ctx.block_size
        if best is not None:
            self._choice[request.request_id] = (best, best_answer[1])
        return best_answer

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        choice = self._choice.pop(request.request_id, None)
        if num_external_tokens > 0 and choice is None:
            raise RuntimeError(
                f"tiered connector: {num_external_tokens} external tokens for "
                f"{request.request_id!r}, which no tier matched"
            )
        chosen = choice[0] if num_external_tokens > 0 and choice else None
        for i, tier in enumerate(self.tiers):
            tier.update_state_after_alloc(
                request, block_ids, num_external_tokens if i == chosen else 0
            )
        if chosen is not None and choice and choice[1]:
            self._load_tier[request.request_id] = chosen
        found = -(-num_external_tokens // self.ctx.block_size)
        start = self._lookup_start.pop(request.request_id, 0)
        self._hits += found
        self._misses += max(0, request.num_prompt_tokens // self.ctx.block_size - start - found)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> dict[str, Any]:
        metas = [t.build_connector_meta(scheduler_output) for t in self.tiers]
        load_tier, self._load_tier = self._load_tier, {}
        held, self._held = self._held, {}
        return {"v": META_VERSION, "tiers": metas, "load_tier": load_tier, "held": held}

    def update_from_workers(self, worker_metas: list[Any]) -> None:
        per_rank: list[list[Any] | None] = []
        for rank, meta in enumerate(worker_metas):
            if meta is None:
                per_rank.append(None)
                continue
            metas = check_report(meta, "tiered", rank).get("tiers")
            if not isinstance(metas, list) or len(metas) != len(self.tiers):
                raise ValueError(
                    f"tiered connector: rank {rank} reported {metas!r:.60} for its tiers, "
                    f"not a list of {len(self.tiers)}; every rank must use the same tiers"
                )
            per_rank.append(metas)
        errors = _TierErrors("update_from_workers")
        for i, tier in enumerate(self.tiers):
            mine = [None if metas is None else metas[i] for metas in per_rank]
            if any(m is not None for m in mine):
                with errors.of(i, tier):
                    tier.update_from_workers(mine)
        errors.raise_first()

    def request_finished(self, request: Request, block_ids: list[int]) -> bool:
        """True when some tier holds the blocks. Every tier is told, whatever an earlier one
        raised; then the first error is raised rather than an answer. True would hide it;
        False would free blocks a tier that answered True may still be saving from. The
        engine frees nothing for a request whose `request_finished` raised. The tiers that
        answered True go into `held` as always, so their workers are given the finished
        id and can report the save and forget the request."""
        self._choice.pop(request.request_id, None)
        self._lookup_start.pop(request.request_id, None)
        held: list[int] = []
        errors = _TierErrors("request_finished")
        for i, t in enumerate(self.tiers):
            with errors.of(i, t):
                if t.request_finished(request, block_ids):
                    held.append(i)
        if held:
            self._held[request.request_id] = held
        errors.raise_first()
        return bool(held)

    def shutdown(self) -> None:
        _shutdown_each(self.tiers)


class TieredConnectorWorker(ConnectorWorker):
    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.tiers: list[ConnectorWorker] = _build(ctx, 1)
        self._held: dict[str, list[int]] = {}  # from metas, until the id is given
        self._load_tier: dict[str, int] = {}
        self._saving: dict[str, set[int]] = {}  # id -> tiers yet to report its save
        self._loading: dict[str, int] = {}  # id -> tier that loads it
        # Done, but not yet returned: a tier raised in the get_finished that found them.
        self._saved: set[str] = set()
        self._loaded: set[str] = set()
        # Failed blocks not yet returned: a tier raised in the call that found them.
        self._load_errors: set[int] = set()

    @property
    def stats(self) -> dict[str, float]:
        """The tiers' counters summed: a block written to two tiers counts twice (a disk
        hit copied into the cpu tier in front counts as saved there)."""
        return sum_stats([getattr(t, "stats", {}) for t in self.tiers])

    @property
    def tier_stats(self) -> list[dict[str, float]]:
        """Each tier's own counters, fastest first."""
        return [dict(getattr(t, "stats", {})) for t in self.tiers]

    def register_kv_caches(self, kv_cache: torch.Tensor) -> None:
        for t in self.tiers:
            t.register_kv_caches(kv_cache)

    def agreed_settings(self) -> dict[str, Any]:
        """Each tier's, in order, with its kind."""
        return {
            "tiers": [
                {"kind": type(t).__name__, "settings": t.agreed_settings()} for t in self.tiers
            ]
        }

    def shared_storage(self) -> dict[str, str]:
        """Each tier's, its name prefixed with the tier's place and kind."""
        return {
            f"tier {i} ({type(t).__name__}): {name}": ident
            for i, t in enumerate(self.tiers)
            for name, ident in t.shared_storage().items()
        }

    def bind_connector_meta(self, meta: Any) -> None:
        meta = check_meta(meta, "tiered")
        if len(meta["tiers"]) != len(self.tiers):
            raise ValueError(
                f"tiered connector: metadata for {len(meta['tiers'])} tiers, this rank has "
                f"{len(self.tiers)}; every rank must use the same tiers"
            )
        super().bind_connector_meta(meta)
        for t, m in zip(self.tiers, meta["tiers"]):
            t.bind_connector_meta(m)
        self._held.update(meta["held"])
        self._load_tier.update(meta["load_tier"])

    def start_load_kv(self, stream: torch.cuda.Stream | None) -> None:
        for t in self.tiers:
            t.start_load_kv(stream)

    def needs_layer_hooks(self) -> bool:
        return any(t.needs_layer_hooks() for t in self.tiers)

    def wait_for_layer_load(self, layer_idx: int, stream: torch.cuda.Stream | None) -> None:
        for t in self.tiers:
            t.wait_for_layer_load(layer_idx, stream)

    def save_kv_layer(self, layer_idx: int, stream: torch.cuda.Stream | None) -> None:
        for t in self.tiers:
            t.save_kv_layer(layer_idx, stream)

    def wait_for_save(self, stream: torch.cuda.Stream | None) -> None:
        for t in self.tiers:
            t.wait_for_save(stream)

    def get_finished(
        self, finished_gen_req_ids: set[str], started_loading_req_ids: set[str]
    ) -> tuple[set[str], set[str]]:
        """Every tier is given its ids, whatever an earlier one raised: each id comes once.
        What the tiers that answered reported is returned by the next call when one
        raised."""
        n = len(self.tiers)
        to_tier_f: list[set[str]] = [set() for _ in range(n)]
        to_tier_s: list[set[str]] = [set() for _ in range(n)]
        saved, loaded = self._saved, self._loaded
        for r in finished_gen_req_ids:
            tiers = self._held.pop(r, None)
            if not tiers:
                continue  # not held by any tier: not an async save
            self._saving[r] = set(tiers)
            for i in tiers:
                to_tier_f[i].add(r)
        for r in started_loading_req_ids:
            tier = self._load_tier.pop(r, None)
            if tier is None:
                loaded.add(r)  # no tier loads it: nothing to wait for
            else:
                self._loading[r] = tier
                to_tier_s[tier].add(r)
        errors = _TierErrors("get_finished")
        for i, t in enumerate(self.tiers):
            with errors.of(i, t):
                s, ld = t.get_finished(to_tier_f[i], to_tier_s[i])
                for r in s:
                    waiting = self._saving.get(r)
                    if waiting is not None:
                        waiting.discard(i)
                        if not waiting:
                            del self._saving[r]
                            saved.add(r)
                for r in ld:
                    if self._loading.get(r) == i:
                        del self._loading[r]
                        loaded.add(r)
        errors.raise_first()
        self._saved, self._loaded = set(), set()
        return saved, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        """The union over the tiers. Every tier is asked, whatever an earlier one raised:
        a tier hands each failed block over once. When one raised, its error is raised
        (every rank then fails the step, whose loads are never served) and the blocks the
        other tiers returned are kept, logged, and returned by the next call with its
        own: no failed block is taken for a good load."""
        failed, self._load_errors = self._load_errors, set()
        errors = _TierErrors("get_block_ids_with_load_errors")
        for i, t in enumerate(self.tiers):
            with errors.of(i, t):
                failed.update(t.get_block_ids_with_load_errors())
        if errors.errors:
            self._load_errors = failed
            if failed:
                log.error(
                    "tiered connector (rank %d): the load errors of blocks %s are kept for "
                    "the next call, after a tier raised",
                    self.ctx.rank,
                    sorted(failed),
                )
        errors.raise_first()
        return failed

    def build_worker_meta(self) -> dict[str, Any] | None:
        """Every tier's, whatever an earlier one raised (each tier's hook runs once a
        step, as it expects). When one raised, its error is raised: the step fails on
        every rank and no scheduler hears from its workers in it; the tiers whose metas
        are lost with it are logged."""
        metas: list[Any] = [None] * len(self.tiers)
        errors = _TierErrors("build_worker_meta")
        for i, t in enumerate(self.tiers):
            with errors.of(i, t):
                metas[i] = t.build_worker_meta()
        lost = [i for i, m in enumerate(metas) if m is not None]
        if errors.errors and lost:
            log.error(
                "tiered connector (rank %d): the worker metas of tier(s) %s are not sent, "
                "after a tier raised in build_worker_meta",
                self.ctx.rank,
                lost,
            )
        errors.raise_first()
        if all(m is None for m in metas):
            return None
        return {"v": META_VERSION, "tiers": metas}

    def shutdown(self) -> None:
        _shutdown_each(self.tiers)
