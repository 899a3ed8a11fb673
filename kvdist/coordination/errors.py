"""Errors of the step protocol."""

from __future__ import annotations

import operator
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvdist.api.connector import ConnectorScheduler
    from kvdist.api.types import Request


class ProtocolError(RuntimeError):
    """A connector or rank broke the step protocol (e.g. reported an id it was never given)."""


class RemoteError(RuntimeError):
    """Another rank (or rank 0's planner) failed during this step; every rank raises this."""

    one_line = True
    """Its message is the failing rank's error: reported without this rank's traceback
    (`kvdist.comm.abort_on_error`), which would add only where the step noticed it."""

    def __init__(self, rank: int, step: int, message: str):
        """`step` -1: the rank failed before it knew the step (its plan did not decode)."""
        self.rank = rank
        self.step = step
        when = f"in step {step}" if step >= 0 else "reading a plan"
        super().__init__(f"rank {rank} failed {when}: {message}")


class ConnectorError(RuntimeError):
    """A connector hook raised: the message names the connector class, the hook and the
    error (`call_hook` makes the original the `__cause__`), so that the `RemoteError`
    every rank raises says where to look."""

    def __init__(self, owner: object, hook: str, error: BaseException | str):
        """`error`: what the hook raised, or what is wrong with what it returned."""
        self.hook = hook
        what = error if isinstance(error, str) else f"raised {type(error).__name__}: {error}"
        super().__init__(f"{type(owner).__name__}.{hook} {what}")


def call_hook(owner: Any, hook: str, *args: Any) -> Any:
    """`owner.hook(*args)`, an exception from it raised as a `ConnectorError`."""
    try:
        return getattr(owner, hook)(*args)
    except Exception as exc:
        raise ConnectorError(owner, hook, exc) from exc


def call_bool_hook(owner: Any, hook: str, *args: Any) -> bool:
    """`call_hook` for a hook that answers True or False (a numpy bool too): anything else,
    None from a stub's `...` included, is a `ConnectorError` rather than a guess."""
    raw = call_hook(owner, hook, *args)
    answer = as_bool(raw)
    if answer is None:
        raise ConnectorError(owner, hook, f"returned {raw!r:.80}; it must return True or False")
    return answer


def as_index(value: Any) -> int | None:
    """`value` as an int when it is an integer (Python's or numpy's, not a bool), else
    None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_bool(value: object) -> bool | None:
    """`value` as a bool when it is one (Python's or numpy's), else None."""
    if isinstance(value, bool):
        return value
    np = sys.modules.get("numpy")  # not imported: the value cannot be a numpy bool
    if np is not None and isinstance(value, np.bool_):
        return bool(value)
    return None


def check_match_answer(owner: object, answer: object, request_id: str) -> tuple[int, bool]:
    """A `get_num_new_matched_tokens` answer of `owner` as `(tokens, async)`: two values,
    an integer >= 0 and a bool (numpy's pass too), and not an async load of 0 tokens.
    Anything else is a `ProtocolError` naming the connector and the answer."""
    checked = _match_answer(answer, request_id)
    if isinstance(checked, str):
        raise ProtocolError(f"{type(owner).__name__}.get_num_new_matched_tokens {checked}")
    return checked


def matched_tokens(
    connector: ConnectorScheduler, request: Request, num_computed_tokens: int
) -> tuple[int, bool]:
    """`connector.get_num_new_matched_tokens(request, num_computed_tokens)` as `(tokens,
    async)`, checked as `check_match_answer` checks it. The hook raising, or answering
    anything else, raises a `ConnectorError` naming the connector class and the hook: an
    engine fails that request alone (nothing is allocated for it yet), and still owes it
    one `request_finished(request, [])`."""
    hook = "get_num_new_matched_tokens"
    answer = call_hook(connector, hook, request, num_computed_tokens)
    checked = _match_answer(answer, request.request_id)
    if isinstance(checked, str):
        raise ConnectorError(connector, hook, checked)
    return checked


def _match_answer(answer: object, request_id: str) -> tuple[int, bool] | str:
    """The answer as `(tokens, async)`, or what is wrong with it."""
    ext = is_async = None
    if isinstance(answer, tuple) and len(answer) == 2:
        ext, is_async = as_index(answer[0]), as_bool(answer[1])
    if ext is None or is_async is None:
        return f"must return (int, bool), got {answer!r:.80}"
    if ext < 0:
        return f"returned {ext} tokens (< 0)"
    if ext == 0 and is_async:
        return (
            f"answered (0, True) for request {request_id!r}: an async load of 0 tokens is "
            "not allowed"
        )
    return ext, is_async
