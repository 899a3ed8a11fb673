"""RMSNorm, rotary embeddings (with Llama-3 scaling) and the SwiGLU activation.

Numerics follow HF transformers' Llama so float32 logits match it to ~1e-6: norms
accumulate in float32, rotary tables are built in float32 and cast to the activation
dtype just before use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvdist.engine.model.config import Llama3RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, src) -> None:
        param.data.copy_(src if isinstance(src, torch.Tensor) else src[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32, as HF does, then the weight in the activation dtype. On CUDA one
        # fused kernel instead of five launches; on the CPU torch composes it from the same
        # steps with more overhead, so they are written out.
        h = x.float()
        if h.is_cuda:
            h = F.rms_norm(h, (h.shape[-1],), eps=self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], computed exactly as HF's default / llama3 rope."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the pretraining context) are stretched by `factor`, short
    # ones kept, and the band in between interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half, as HF Llama) with a precomputed cos/sin table."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: Llama3RopeScaling | None,
        *,
        device,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # Not a parameter: derived from the config, never loaded from a checkpoint.
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        # sin with the sign rotate_half puts on the first half folded in (see apply_rotary).
        sin = emb.sin()
        half = head_dim // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.register_buffer("signed_sin", signed_sin.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, signed sin) rows for `positions`, shaped [T, 1, head_dim] to broadcast over
        heads; pass them to `apply_rotary`."""
        cos, sin = self.cos[positions], self.signed_sin[positions]
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, head_dim] (neox layout, as HF's rotate_half): x * cos +
    rotate_half(x) * sin. rotate_half(x) = [-x2, x1] is [x2, x1] with the first half's sign
    flipped, and that sign lives in `signed_sin`: one roll and a multiply-add, three
    kernels rather than six."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up, for [.., 2*I] laid out as [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
