"""Errors of the step protocol."""

from __future__ import annotations


class ProtocolError(RuntimeError):
    """A connector or rank broke the step protocol (e.g. reported an id it was never given)."""


class RemoteError(RuntimeError):
    """Another rank (or rank 0's planner) failed during this step; every rank raises this."""

    def __init__(self, rank: int, step: int, message: str):
        self.rank = rank
        self.step = step
        super().__init__(f"rank {rank} failed in step {step}: {message}")
