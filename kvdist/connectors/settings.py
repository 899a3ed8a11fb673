"""Connector settings: kwargs checked into frozen dataclasses, and the shared stats counters."""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, TypeVar

from kvdist.api.numbers import as_int, type_name

T = TypeVar("T")

STAT_KEYS = (
    "blocks_loaded",
    "bytes_loaded",
    "blocks_saved",
    "bytes_saved",
    "hits",
    "misses",
    "load_failures",
    "save_failures",
    "evictions",
    "io_seconds",
)
"""Keys of every built-in connector's `stats` dict, so an engine can sum them.

`hits` / `misses`: blocks found / not found beyond the on-device prefix when a request is
admitted; `bytes_saved` / `bytes_loaded`: what was written / read (`disk` counts a saved
record whole, header included, and a loaded one by its KV payload);
`load_failures` / `save_failures`: blocks; `io_seconds`: time spent in IO
threads (summed over threads; `disk` adds `load_io_seconds`, the part spent reading for
loads)."""


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """`123`, `64K`, `512M`, `10G`, `1T` (powers of 1024; a trailing B or iB is allowed).
    ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a byte count: {text!r} (e.g. 1000000, 512M, 10G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not value.is_integer() and not m.group(2):  # "0.1" is no byte count; "1.1K" is 1126
        raise ValueError(f"not a whole number of bytes: {text!r} (e.g. 1000000, 512M, 10G)")
    return int(value)


def parse_settings(cls: type[T], kwargs: dict[str, Any], connector: str) -> T:
    """Build settings dataclass `cls` from a connector's kwargs, rejecting unknown names.
    A setting named `*_bytes` may be given as a string with a unit (`"512M"`, `"10G"`)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for the {connector!r} connector; "
            f"valid settings: {sorted(fields)}"
        )
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"the {connector!r} connector needs setting(s) {missing}")
    kwargs = dict(kwargs)
    for name, value in kwargs.items():
        if name.endswith("_bytes") and isinstance(value, str):
            try:
                kwargs[name] = parse_bytes(value)
            except ValueError as exc:
                raise ValueError(f"{connector} connector: {name}: {exc}") from None
    return cls(**kwargs)


def int_setting(
    connector: str, name: str, value: Any, *, minimum: int = 1, allow_none: bool = False
) -> int | None:
    """Setting `name` as a plain int of at least `minimum`: any integer type is one (numpy's
    too), stored as the `int` (settings are msgpack data, compared across ranks); a
    ValueError naming the setting otherwise, and the type of what is no integer (a bool, a
    float, a str). None stays None where `allow_none`."""
    if value is None and allow_none:
        return None
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    number = as_int(value)
    if number is None:
        raise ValueError(
            f"{connector} connector: {name} must be {what}, got {value!r} (type {type_name(value)})"
        )
    if number < minimum:
        raise ValueError(f"{connector} connector: {name} must be {what}, got {value!r}")
    return number


class Counters:
    """Thread-safe counters behind a connector's `stats` dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._values[k] = self._values.get(k, 0) + v

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


def sum_stats(dicts: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
