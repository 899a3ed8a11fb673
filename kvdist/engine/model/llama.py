"""Tensor-parallel Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameter names mirror HF's, except that q/k/v and gate/up are fused (`qkv_proj`,
`gate_up_proj`); `load_hf_tensor` routes an HF tensor to its fused slot.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from kvdist.engine.model.attention import AttentionMetadata, PagedAttention, attention_kernels
from kvdist.engine.model.config import ModelConfig
from kvdist.engine.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, silu_and_mul
from kvdist.engine.model.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedEmbedding,
    RowParallelLinear,
    TPInfo,
)
from kvdist.kv.layout import kv_head_shard

# HF tensor name part -> (our fused module, shard id within it)
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LayerHooks(Protocol):
    """Called by `LlamaForCausalLM.forward` around each decoder layer (e.g. the connector's
    per-layer load wait before, and its per-layer save after)."""

    def before_layer(self, layer_idx: int) -> None: ...

    def after_layer(self, layer_idx: int) -> None: ...


def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `config` must hold, with its full (unsharded) shape."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _check_tp_size(config: ModelConfig, tp: TPInfo) -> None:
    # Checked before any weight is allocated. Query heads and the MLP split evenly; KV
    # heads split evenly or, with more ranks than KV heads, are replicated evenly.
    def fits(n: int) -> bool:
        kv = config.num_kv_heads
        return (
            config.num_heads % n == 0
            and config.intermediate_size % n == 0
            and (kv % n == 0 or n % kv == 0)
        )

    if not fits(tp.size):
        valid = [n for n in range(1, config.num_heads + 1) if fits(n)]
        raise ValueError(
            f"the tensor-parallel size {tp.size} does not fit this model (num_attention_heads "
            f"{config.num_heads}, num_key_value_heads {config.num_kv_heads}, intermediate_size "
            f"{config.intermediate_size}); tensor-parallel sizes it supports: "
            f"{', '.join(map(str, valid))}"
        )


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, *, dtype, device) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
            bias=config.attention_bias,
            tp=tp,
            dtype=dtype,
            device=device,
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim,
            config.hidden_size,
            bias=config.o_proj_bias,
            tp=tp,
            dtype=dtype,
            device=device,
        )
        qkv = self.qkv_proj
        self.split = (qkv.q_size + qkv.kv_size, qkv.kv_size)
        self.attn = PagedAttention(qkv.num_local_heads, qkv.num_local_kv_heads, config.head_dim)
        # Qwen3: every query and key head RMS-normalised (one weight per head dim) before RoPE.
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            eps, d = config.rms_norm_eps, config.head_dim
            self.q_norm = RMSNorm(d, eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(d, eps, dtype=dtype, device=device)

    def forward(self, h, cos, signed_sin, kv_layer, meta: AttentionMetadata) -> torch.Tensor:
        hd, heads = self.attn.head_dim, self.attn.num_heads
        qk, v = self.qkv_proj(h).split(self.split, dim=-1)
        qk = qk.unflatten(-1, (-1, hd))
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        # q and k rotated together: half the kernel launches, which is what decode waits on.
        q, k = apply_rotary(qk, cos, signed_sin).split([heads, self.attn.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v.unflatten(-1, (-1, hd)), kv_layer, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, *, dtype, device) -> None:
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [i, i], bias=False, tp=tp, dtype=dtype, device=device
        )
        self.down_proj = RowParallelLinear(
            i, config.hidden_size, bias=False, tp=tp, dtype=dtype, device=device
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(h)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, *, dtype, device) -> None:
        super().__init__()
        eps, h = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(h, eps, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(config, tp, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype=dtype, device=device)
        self.mlp = LlamaMLP(config, tp, dtype=dtype, device=device)

    def forward(self, h, cos, signed_sin, kv_layer, meta) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, signed_sin, kv_layer, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPInfo, *, dtype, device) -> None:
        super().__init__()
        self.embed_tokens = ReplicatedEmbedding(
            config.vocab_size, config.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp, dtype=dtype, device=device)
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)


class LlamaForCausalLM(nn.Module):
    """This rank's shard of the model; every rank calls `forward` with the same inputs."""

    def __init__(self, config: ModelConfig, tp: TPInfo, *, dtype: torch.dtype, device) -> None:
        super().__init__()
        _check_tp_size(config, tp)
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, tp, dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, tp=tp, dtype=dtype, device=device
        )
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device=device,
        )
        kv = kv_head_shard(tp.rank, tp.size, config.num_kv_heads)
        self.kv_head_start, self.kv_head_end = kv.start, kv.end

    @property
    def num_local_kv_heads(self) -> int:
        return self.kv_head_end - self.kv_head_start

    @torch.no_grad()  # not inference_mode: connector buffers made in hooks must stay normal tensors
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,
        hooks: LayerHooks | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T] -> final-normed hidden states [T, hidden].

        `kv_cache` is this rank's `(layers, 2, blocks, block_size, local_kv_heads, head_dim)`
        cache; layer i reads and writes `kv_cache[i]` between `hooks.before_layer(i)` and
        `hooks.after_layer(i)`.
        """
        h = self.model.embed_tokens(input_ids)
        cos, signed_sin = self.rotary(positions, h.dtype)
        with attention_kernels():
            for i, layer in enumerate(self.model.layers):
                if hooks is not None:
                    hooks.before_layer(i)
                h = layer(h, cos, signed_sin, kv_cache[i], attn)
                if hooks is not None:
                    hooks.after_layer(i)
        return self.model.norm(h)

    @torch.no_grad()  # not inference_mode: connector buffers made in hooks must stay normal tensors
    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> float32 logits [N, vocab] on TP rank 0, None on the others.

        A collective: every rank must call it with the same N.
        """
        return self.lm_head(hidden_rows)

    def load_hf_tensor(self, name: str, src: Any) -> None:
        """Load one HF checkpoint tensor (a full tensor or a safetensors slice) into this
        rank's shard of the matching parameter."""
        for hf_part, (ours, shard_id) in _FUSED.items():
            if f".{hf_part}." in name:
                param = self.get_parameter(name.replace(hf_part, ours))
                param.weight_loader(param, src, shard_id)  # type: ignore[attr-defined]
                return
        param = self.get_parameter(name)
        param.weight_loader(param, src)  # type: ignore[attr-defined]
        if name == "model.embed_tokens.weight" and self.config.tie_word_embeddings:
            self.lm_head.weight.weight_loader(self.lm_head.weight, src)  # type: ignore[attr-defined]
