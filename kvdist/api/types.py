"""Plain data types shared by the engine and connectors.

Everything here is a value: no tensors, no communicators. `ConnectorContext` is the one
exception that carries torch types (dtype, device) because workers allocate with them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from kvdist.api.numbers import as_int, type_name


def positive_int(value: Any, name: str) -> int:
    """`value` as a plain int of at least 1 (numpy integers too): TypeError, naming the
    type, for what is not an integer (a bool, a float, a str), ValueError for one below 1;
    `name` says which."""
    number = as_int(value)
    if number is None:
        raise TypeError(f"{name} must be a positive int, got {value!r} (type {type_name(value)})")
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


@dataclass
class Request:
    """A request as the connector scheduler sees it (rank 0 only).

    `block_hashes[i]` is the chained hash of the first `(i + 1) * block_size` tokens of
    `all_token_ids`, namespaced by model, dtype, block size and `cache_salt`; only full
    blocks have a hash.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    cache_salt: str | None = None
    max_tokens: int = 16

    def __post_init__(self) -> None:
        # Cheap checks only: the engine builds one per request.
        if not isinstance(self.request_id, str):
            raise TypeError(f"Request.request_id must be a str, got {self.request_id!r}")
        for name in ("prompt_token_ids", "output_token_ids", "block_hashes"):
            if not isinstance(getattr(self, name), list):
                raise TypeError(f"Request.{name} must be a list, got {getattr(self, name)!r:.60}")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True, kw_only=True)
class ConnectorContext:
    """What a connector learns about the engine and this rank when it is built."""

    rank: int
    """This process's rank in the tensor-parallel group."""
    world_size: int
    """Number of tensor-parallel ranks."""
    num_layers: int
    """Decoder layers in the model."""
    block_size: int
    """Tokens per KV block."""
    num_kv_heads: int
    """KV heads of the whole model (all ranks together)."""
    kv_head_start: int
    """First KV head held by this rank."""
    kv_head_end: int
    """One past the last KV head held by this rank."""
    kv_replicas: int = 1
    """Ranks holding these same KV heads: above 1 when there are more ranks than KV heads
    and each head is replicated (`kvdist.kv.layout.kv_head_shard`). Replicas hold
    bit-identical KV."""
    kv_replica: int = 0
    """This rank's index among its `kv_replicas`. Storage the ranks share (a directory, a
    remote store) needs only replica 0 to write the heads; every replica still reports
    its saves, so a request completes when the writer's save is done."""
    head_dim: int
    """Size of one attention head."""
    dtype: torch.dtype
    """Element type of the KV cache."""
    device: torch.device
    """Device of the KV cache (cpu or cuda:N)."""
    model_namespace: str
    """Fingerprint of the model, dtype, block size and layout: caches keyed by it never mix."""
    num_blocks: int = 0
    """Blocks in this rank's paged KV cache (0 when not yet known)."""
    ranks_on_host: int = 1
    """Ranks of this engine on this rank's host (the launcher's local world size), which
    share its memory: a per-rank pool of host memory takes this many times its size."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The connector's own settings (`ConnectorConfig.kwargs`)."""

    def __post_init__(self) -> None:
        for name in (
            "world_size", "num_layers", "block_size", "num_kv_heads", "head_dim", "ranks_on_host"
        ):  # fmt: skip
            object.__setattr__(
                self, name, positive_int(getattr(self, name), f"ConnectorContext.{name}")
            )
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world_size):
            raise ValueError(
                f"ConnectorContext.rank must be in [0, world_size={self.world_size}), "
                f"got {self.rank!r}"
            )
        if not isinstance(self.model_namespace, str):
            raise TypeError(
                f"ConnectorContext.model_namespace must be a str, got {self.model_namespace!r}"
            )
        if not 0 <= self.kv_head_start < self.kv_head_end <= self.num_kv_heads:
            raise ValueError(
                f"KV heads [{self.kv_head_start}, {self.kv_head_end}) are not a non-empty "
                f"range within the model's {self.num_kv_heads}"
            )
        if not 0 <= self.kv_replica < self.kv_replicas:
            raise ValueError(
                f"kv_replica must be in [0, kv_replicas={self.kv_replicas}), got {self.kv_replica}"
            )

    @classmethod
    def for_rank(
        cls, *, rank: int, world_size: int, num_kv_heads: int, **fields: Any
    ) -> ConnectorContext:
        """The context of `rank` in a tensor-parallel split of `num_kv_heads` heads, with
        this rank's KV heads and replica filled in (`kvdist.kv.layout.kv_head_shard`);
        `fields` are the others."""
        from kvdist.kv.layout import kv_head_shard

        heads = kv_head_shard(rank, world_size, num_kv_heads)
        return cls(
            rank=rank,
            world_size=world_size,
            num_kv_heads=num_kv_heads,
            kv_head_start=heads.start,
            kv_head_end=heads.end,
            kv_replicas=heads.replicas,
            kv_replica=heads.replica,
            **fields,
        )

    @property
    def num_local_kv_heads(self) -> int:
        return self.kv_head_end - self.kv_head_start

    @property
    def writes_shared_kv(self) -> bool:
        """Whether this rank writes its heads to storage the ranks share: False on every
        replica but the first, whose writes would only repeat replica 0's bytes."""
        return self.kv_replica == 0

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_shard_bytes(self) -> int:
        """Bytes of one block of this rank's shard, K and V, all layers."""
        return (
            self.num_layers * 2 * self.block_size * self.num_local_kv_heads * self.head_dim
        ) * self.element_size

    def with_kwargs(self, kwargs: dict[str, Any]) -> ConnectorContext:
        """The same context with other connector settings (used by stacking connectors)."""
        from dataclasses import replace

        return replace(self, kwargs=dict(kwargs))


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """Which connector to run and its settings.

    Either `name` of a registered connector (`"disk"`, `"cpu"`, `"tiered"`, or one added
    with `kvdist.register_connector`), or `module` + `scheduler_class` + `worker_class`
    for a user connector.
    """

    name: str | None = None
    """A registered connector name."""
    module: str | None = None
    """Dotted module path of a user connector."""
    scheduler_class: str | None = None
    """Class name in `module` implementing `ConnectorScheduler`."""
    worker_class: str | None = None
    """Class name in `module` implementing `ConnectorWorker`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The connector's settings, passed as `ConnectorContext.kwargs`."""

    def __post_init__(self) -> None:
        if (self.name is None) == (self.module is None):
            raise ValueError("ConnectorConfig needs exactly one of name= or module=")
        if self.module is not None and not (self.scheduler_class and self.worker_class):
            raise ValueError("ConnectorConfig(module=...) needs scheduler_class= and worker_class=")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"ConnectorConfig.kwargs must be a dict, got {type(self.kwargs)}")

    @classmethod
    def from_any(cls, value: ConnectorConfig | str | dict[str, Any]) -> ConnectorConfig:
        """Accept a config, a registered name, or a dict with the same fields."""
        if isinstance(value, ConnectorConfig):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict):
            unknown = set(value) - {"name", "module", "scheduler_class", "worker_class", "kwargs"}
            if unknown:
                raise ValueError(f"unknown ConnectorConfig fields: {sorted(unknown)}")
            return cls(**value)
        raise TypeError(f"connector must be a ConnectorConfig, str or dict, got {type(value)}")


def import_attr(module: str, name: str) -> Any:
    """Import `module` and return its attribute `name`, with an error naming both."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import connector module {module!r}: {exc}") from exc
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ValueError(f"module {module!r} has no attribute {name!r}") from None


# The step types live in kvdist.api.step; they are part of this module's public names.
from kvdist.api.step import RequestBatch, RequestData, SchedulerOutput  # noqa: E402

__all__ = [
    "ConnectorConfig",
    "ConnectorContext",
    "Request",
    "RequestBatch",
    "RequestData",
    "SchedulerOutput",
    "import_attr",
]
