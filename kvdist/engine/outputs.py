"""What `LLM.generate` returns for each prompt."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The result of one request (the same on every rank)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_cached_tokens: int = 0
    """Prompt tokens found in the on-device prefix cache (for its first prefill, the one
    its first token waited for: a preempted request may find others when re-admitted);
    `stats["prefix_hit_tokens"]` is the sum over requests (each counted once)."""
    num_external_tokens: int = 0
    """Prompt tokens loaded by the connector for its first prefill (and kept: failed
    loads are recomputed); `stats["external_tokens"]` counts loads after preemptions too."""
    ttft_s: float = 0.0
    """Seconds from the request's arrival (its `generate` call) to its first output token."""
    finish_reason: str = ""
    """"stop" (end-of-sequence or stop token), "length", "abort" or "error"."""
    error: str | None = None
    """Why the request failed, when finish_reason is "error"."""
    queue_s: float = 0.0
    """Seconds from arrival until the engine admitted it (gave it blocks, so its load or
    prefill could start): `ttft_s - queue_s` is the time the first token took from there."""

    def to_wire(self) -> list:
        return [
            self.request_id,
            self.prompt_token_ids,
            self.output_token_ids,
            self.text,
            self.num_cached_tokens,
            self.num_external_tokens,
            self.ttft_s,
            self.finish_reason,
            self.error,
            self.queue_s,
        ]

    @classmethod
    def from_wire(cls, item: list) -> RequestOutput:
        return cls(*item)
