"""Integer settings (the connectors', the engine's, `ConnectorContext`'s) take an integer of
any type, numpy's included, kept as the plain `int`; what is no integer is refused naming
its type."""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest

import kvdist
from kvdist.api.types import positive_int
from kvdist.connectors.cpu.settings import CpuSettings
from kvdist.connectors.disk.settings import DiskSettings
from kvdist.engine.config import EngineConfig

# (build settings from {name: value}, the setting, a value it takes)
SETTINGS = [
    (lambda kw: kvdist.parse_settings(CpuSettings, kw, "cpu"), "capacity_bytes", 1 << 20),
    (lambda kw: kvdist.parse_settings(DiskSettings, {"path": "/x", **kw}, "disk"),
     "capacity_bytes", 1 << 20),
    (lambda kw: kvdist.parse_settings(DiskSettings, {"path": "/x", **kw}, "disk"),
     "io_threads", 2),
    (lambda kw: kvdist.parse_settings(DiskSettings, {"path": "/x", **kw}, "disk"),
     "max_save_backlog_bytes", 1 << 20),
    (lambda kw: kvdist.parse_settings(DiskSettings, {"path": "/x", **kw}, "disk"),
     "staging_bytes", 0),
    (lambda kw: EngineConfig(**kw), "num_blocks", 64),
    (lambda kw: EngineConfig(**kw), "max_num_seqs", 8),
    (lambda kw: EngineConfig(**kw), "seed", 0),
]  # fmt: skip
IDS = [f"{i}-{name}" for i, (_, name, _) in enumerate(SETTINGS)]


@pytest.mark.parametrize("build, name, value", SETTINGS, ids=IDS)
@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint32, int])
def test_an_integer_of_any_type_is_kept_as_a_plain_int(build, name, value, kind) -> None:
    """A numpy integer is an integer: taken, and kept as the `int` (which msgpack encodes,
    and compares by value across ranks). A failure means a user's config built with numpy
    is refused as "not a positive integer", or carries a numpy scalar on."""
    got = getattr(build({name: kind(value)}), name)
    assert type(got) is int and got == value


@pytest.mark.parametrize("build, name, value", SETTINGS, ids=IDS)
@pytest.mark.parametrize(
    "wrong, shown",
    [(1.0, "1.0 (type float)"), (np.float64(2.0), "(type numpy.float64)"),
     (True, "True (type bool)"), ("8", "'8' (type str)")],
)  # fmt: skip
def test_what_is_no_integer_is_refused_naming_its_type(build, name, value, wrong, shown) -> None:
    """A float, a bool or a string (a `*_bytes` string that is no byte count aside) is
    refused, the message naming the setting and the type given. A failure means 2.0
    threads or True bytes are taken, or the message hides why the value is wrong."""
    if name.endswith("_bytes") and isinstance(wrong, str):
        wrong, shown = [8], "[8] (type list)"  # a *_bytes string is read as a byte count
    with pytest.raises(ValueError, match=rf"{name} must be .*, got .*{re.escape(shown)}"):
        build({name: wrong})


def test_a_value_out_of_range_is_refused_as_it_was_given() -> None:
    with pytest.raises(ValueError, match=r"capacity_bytes must be a positive integer, got "):
        kvdist.parse_settings(CpuSettings, {"capacity_bytes": np.int64(0)}, "cpu")
    with pytest.raises(ValueError, match=r"staging_bytes must be an integer >= 0, got -1$"):
        kvdist.parse_settings(DiskSettings, {"path": "/x", "staging_bytes": -1}, "disk")


def test_the_disk_connectors_seconds_are_kept_as_plain_floats() -> None:
    """Its float settings too are msgpack data once read (a numpy scalar that is no float
    subclass would be compared across ranks by its type alone)."""
    disk = kvdist.parse_settings(
        DiskSettings,
        {"path": "/x", "rescan_s": np.int64(5), "pending_timeout_s": np.float32(2.0)},
        "disk",
    )
    assert (type(disk.rescan_s), type(disk.pending_timeout_s)) == (float, float)
    assert (disk.rescan_s, disk.pending_timeout_s) == (5.0, 2.0)


def test_positive_int_names_the_type_it_refuses() -> None:
    assert type(positive_int(np.int64(3), "n")) is int
    with pytest.raises(TypeError, match=r"n must be a positive int, got 2.5 \(type float\)"):
        positive_int(2.5, "n")
    with pytest.raises(TypeError, match=r"got False \(type bool\)"):
        positive_int(False, "n")


def test_numpy_settings_through_an_engine() -> None:
    """`ConnectorConfig(name="cpu", kwargs={"capacity_bytes": np.int64(...)})` and an
    engine setting as numpy integers: the engine starts (the connector's agreed settings
    are msgpack data, as every rank's start exchanges them), and a repeated prompt loads
    from the pool. A failure means numpy-built configs cannot run a connector."""
    config = kvdist.ConnectorConfig(name="cpu", kwargs={"capacity_bytes": np.int64(1 << 20)})
    llm = kvdist.LLM("tiny", connector=config, num_blocks=np.int64(8), enable_prefix_caching=False)
    try:
        agreed = llm.connector_worker.agreed_settings()
        assert type(agreed["capacity_bytes"]) is int
        msgpack.packb(agreed)  # plain data: no `default=` needed to encode it
        # Six blocks with its tokens: the second runs after the first, from the pool.
        prompt = list(range(94))
        params = kvdist.SamplingParams(max_tokens=2, temperature=0.0)
        first, second = llm.generate([prompt, prompt], params)
        assert first.num_external_tokens == 0 and second.num_external_tokens == 80
        assert first.output_token_ids == second.output_token_ids
    finally:
        llm.shutdown()
