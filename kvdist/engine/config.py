"""Engine settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvdist.api.numbers import as_int, type_name
from kvdist.comm.launch_env import check_timeout

LOAD_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Settings of the reference engine (model-independent)."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks per rank; None sizes the cache from `kv_cache_memory_bytes`."""
    kv_cache_memory_bytes: int | None = None
    """Bytes of KV cache per rank when `num_blocks` is None (default: 256 MiB on CPU,
    half the free GPU memory on CUDA)."""
    max_num_seqs: int = 256
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (chunked prefill splits longer prompts)."""
    max_model_len: int | None = None
    """Longest request (prompt + output); default, and at most (a larger value is lowered,
    with a warning), the model's context length. This is the value asked for; the engine's
    `LLM.max_model_len` is the one in effect."""
    enable_prefix_caching: bool = True
    """Reuse on-device KV blocks of identical prefixes."""
    load_failure_policy: str = "recompute"
    """What to do when a connector load fails: "recompute" the tokens from the first failed
    block, or "fail" the request with an error result."""
    cuda_graphs: bool = True
    """Replay decode-only steps from captured CUDA graphs (on CUDA, with NCCL between the
    ranks; see `kvdist.engine.decode_graphs`). False runs every step eagerly."""
    seed: int = 0
    """Seed of the samplers of requests that give none."""
    timeout_s: float | None = None
    """Deadline of every control-plane collective; default `KVDIST_TIMEOUT_S` or 300. When
    the engine starts the ranks' communication itself (no `topology` given), it is the
    tensor-parallel collectives' deadline too; a given topology keeps the one it was
    started with (`KVDIST_TIMEOUT_S`)."""
    load_timeout_s: float | None = None
    """An async load that some rank has not reported done this many seconds after it
    started fails its request (finish_reason "error"; the blocks stay held until every
    rank reports the load, so nothing reuses them under the transfer). Default: the
    collective deadline (`timeout_s`)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "kv_cache_memory_bytes", "max_num_seqs",
                     "max_num_batched_tokens", "max_model_len", "seed"):  # fmt: skip
            value = getattr(self, name)
            if value is None and name != "seed":
                continue
            number = as_int(value)  # numpy integers too, kept as the plain int
            if number is None:
                raise ValueError(f"{name} must be an int, got {value!r} (type {type_name(value)})")
            object.__setattr__(self, name, number)
        for name in ("enable_prefix_caching", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):  # "false" would be true
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes must be > 0 (or None), got {self.kv_cache_memory_bytes}"
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be > 1 (or None), got {self.max_model_len}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}"
            )
        for name in ("timeout_s", "load_timeout_s"):
            if getattr(self, name) is not None:
                check_timeout(getattr(self, name), name)
        if self.load_failure_policy not in LOAD_FAILURE_POLICIES:
            raise ValueError(
                f"load_failure_policy must be one of {LOAD_FAILURE_POLICIES}, "
                f"got {self.load_failure_policy!r}"
            )
