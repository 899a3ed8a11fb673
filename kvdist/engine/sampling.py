"""Sampling parameters and the sampler (runs on rank 0, which alone holds full logits)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick output tokens for one request."""

    max_tokens: int = 16
    """Most tokens to generate (> 0)."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples from the softened distribution."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's generator; the same seed gives the same tokens."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    stop_token_ids: list[int] = field(default_factory=list)
    """More tokens that end the request (the stop token is kept in the output)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(
                f"SamplingParams.max_tokens must be a positive int, got {self.max_tokens!r}"
            )
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Picks one token per row of logits, each row with its request's params and generator."""

    def __init__(self, default_seed: int = 0):
        self.default_seed = default_seed

    def make_generator(self, params: SamplingParams, request_index: int) -> torch.Generator | None:
        if params.temperature == 0.0:
            return None
        gen = torch.Generator(device="cpu")
        seed = (
            params.seed
            if params.seed is not None
            else self.default_seed * 1_000_003 + request_index
        )
        gen.manual_seed(seed)
        return gen

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        out: list[int] = []
        for i, p in enumerate(params):
            if p.temperature == 0.0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1).cpu()
            if p.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p
                sorted_probs = sorted_probs * keep
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
        return out
