"""Integer checks shared by settings and plain data types, without torch: the `kvdist
cache` commands import the settings and must start without it."""

from __future__ import annotations

import operator
from typing import Any


def as_int(value: Any) -> int | None:
    """`value` as a plain `int` when it is an integer of any type (numpy's too: whatever
    `operator.index` takes), but a bool; else None. Settings keep the plain int, which
    msgpack encodes and which compares by value across ranks."""
    if isinstance(value, bool):
        return None
    try:
        return int(operator.index(value))
    except TypeError:
        return None


def type_name(value: Any) -> str:
    """`value`'s type for messages: `float`, `numpy.float64`."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
