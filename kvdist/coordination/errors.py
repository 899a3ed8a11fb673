"""Errors of the step protocol."""

from __future__ import annotations

from typing import Any


class ProtocolError(RuntimeError):
    """A connector or rank broke the step protocol (e.g. reported an id it was never given)."""


class RemoteError(RuntimeError):
    """Another rank (or rank 0's planner) failed during this step; every rank raises this."""

    def __init__(self, rank: int, step: int, message: str):
        self.rank = rank
        self.step = step
        super().__init__(f"rank {rank} failed in step {step}: {message}")


class ConnectorError(RuntimeError):
    """A connector hook raised: the message names the connector class, the hook and the
    error (`call_hook` makes the original the `__cause__`), so that the `RemoteError`
    every rank raises says where to look."""

    def __init__(self, owner: object, hook: str, error: BaseException):
        self.hook = hook
        super().__init__(f"{type(owner).__name__}.{hook} raised {type(error).__name__}: {error}")


def call_hook(owner: Any, hook: str, *args: Any) -> Any:
    """`owner.hook(*args)`, an exception from it raised as a `ConnectorError`."""
    try:
        return getattr(owner, hook)(*args)
    except Exception as exc:
        raise ConnectorError(owner, hook, exc) from exc
