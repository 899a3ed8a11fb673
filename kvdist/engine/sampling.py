"""Sampling parameters and the sampler (runs on rank 0, which alone holds full logits)."""

from __future__ import annotations

import math
import numbers
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

        def number(x: object) -> bool:  # numpy floats too (generate makes them floats)
            if not isinstance(x, numbers.Real) or isinstance(x, bool):
                return False
            try:
                return math.isfinite(float(x))
            except OverflowError:  # an int or Fraction past float's range: not finite
                return False

        def integer(x: object) -> bool:  # numpy integers too (generate makes them ints)
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        mt = self.max_tokens
        if not integer(mt) or mt <= 0:
            raise ValueError(f"SamplingParams.max_tokens must be a positive int, got {mt!r}")
        t = self.temperature
        if not number(t) or t < 0 or 0 < t < _MIN_TEMPERATURE:
            raise ValueError(
                f"SamplingParams.temperature must be 0 (greedy) or a finite number >= "
                f"{_MIN_TEMPERATURE:g}, got {t!r}"
            )
        if not number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        seed = self.seed
        if seed is not None and (not integer(seed) or not 0 <= seed < 2**63):
            raise ValueError(
                f"SamplingParams.seed must be None or an int in [0, 2**63), got {seed!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(
                f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}"
            )
        stops = self.stop_token_ids
        if not isinstance(stops, (list, tuple)) or not all(integer(x) and x >= 0 for x in stops):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be a list of token ids (ints >= 0), "
                f"got {stops!r}"
            )


# Smaller positive temperatures are greedy in all but name, and drive logits / temperature
# towards float32 overflow (inf, then NaN probabilities): an error naming the field.
_MIN_TEMPERATURE = 1e-5


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
            else (self.default_seed * 1_000_003 + request_index) % (1 << 63)
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
                # A top_p below float32's smallest number compares as 0, keeping none
                # (multinomial then fails the step for the whole batch): keep the top one.
                keep[0] = True
                sorted_probs = sorted_probs * keep
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
        return out
