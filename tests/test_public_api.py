"""The public names and the argument checks of the API's plain functions and types."""

from __future__ import annotations

import ast
from array import array
from pathlib import Path

import numpy as np
import pytest
import torch

import kvdist


def test_errors_and_topology_are_public() -> None:
    """The errors every rank raises together, and what init_distributed returns, are
    importable from `kvdist` and listed by dir(). A failure means engine authors must
    import them from internal modules to catch them."""
    for name in ("RemoteError", "ProtocolError", "ForwardError", "Topology"):
        assert name in kvdist.__all__ and name in dir(kvdist)
        assert isinstance(getattr(kvdist, name), type)
    assert issubclass(kvdist.RemoteError, RuntimeError)
    assert set(kvdist.__all__) <= set(dir(kvdist))
    for name in kvdist.__all__:  # each resolves (the lazy table names a real attribute)
        assert getattr(kvdist, name) is not None, name
    assert kvdist.start_connector.__module__ == "kvdist.coordination.connector_start"


def test_every_public_name_is_typed() -> None:
    """Every name in `kvdist.__all__` is also imported under TYPE_CHECKING, from the module
    the lazy table loads it from. A failure means a type checker sees that name as Any
    (it comes from the module's `__getattr__`), though the package ships `py.typed`."""
    tree = ast.parse(Path(kvdist.__file__).read_text())
    typed: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module is not None
                for alias in stmt.names:
                    typed[alias.asname or alias.name] = stmt.module
    lazy = {name: module for name, (module, _) in kvdist._LAZY.items()}
    assert {n: typed.get(n) for n in lazy} == lazy
    assert set(kvdist.__all__) == {*lazy, "__version__"}


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([1.5, 2.5], 2, "ns"), TypeError, "flat sequence of integers, got float64"),
        (([True, False], 2, "ns"), TypeError, "got bool"),
        (([[1, 2]], 2, "ns"), TypeError, r"shape \[1, 2\]"),
        (([1, 2], 0, "ns"), ValueError, "block_size must be a positive int"),
        (([1, 2], -1, "ns"), ValueError, "block_size must be a positive int"),
        (([1, 2], 2, None), TypeError, "namespace must be a str"),
        (([-1, 2], 2, "ns"), ValueError, "token ids must be >= 0"),
        (([2**63], 1, "ns"), ValueError, "token ids must fit in int64"),
        ((np.array([2**64 - 1, 1], dtype=np.uint64), 2, "ns"), ValueError, "fit in int64"),
        (([1, 2], 2.0, "ns"), TypeError, "block_size must be a positive int"),
    ],
)
def test_block_hashes_checks_its_arguments(args, error, match) -> None:
    """Tokens that are not integers, a block size below 1, a namespace that is not a str
    and negative ids are refused by name. A failure means [1.5, 2.5] hashes as [1, 2] (a
    false cache hit) or a bare ZeroDivisionError / empty result."""
    with pytest.raises(error, match=match):
        kvdist.block_hashes(*args)


def test_block_hashes_takes_every_integer_sequence() -> None:
    """Lists, int32 arrays, numpy arrays and tensors of the same ids hash the same. A
    failure means the check refuses the forms the engine itself holds tokens in."""
    want = kvdist.block_hashes(list(range(8)), 2, "ns")
    assert len(want) == 4
    for form in (array("i", range(8)), np.arange(8, dtype=np.int32), torch.arange(8)):
        assert kvdist.block_hashes(form, 2, "ns") == want
    assert kvdist.block_hashes([], 2, "ns") == []


def test_extend_block_hashes_follows_a_growing_request() -> None:
    """Tokens arriving one at a time (a decode), the chain extended after each: it equals
    the whole chain hashed at once at every length, salted or not, and the blocks it
    already holds are not read again (changing their tokens changes nothing). New tokens
    are checked as `block_hashes` checks them."""
    tokens = list(range(100, 123))
    for salt in (None, "tenant-a"):
        hashes: list[bytes] = []
        for n in range(len(tokens) + 1):
            got = kvdist.extend_block_hashes(hashes, tokens[:n], 4, "ns", salt)
            assert got is hashes
            assert hashes == kvdist.block_hashes(tokens[:n], 4, "ns", salt)
    held = list(hashes)
    assert kvdist.extend_block_hashes(hashes, [0] * 20 + tokens[20:], 4, "ns", "tenant-a") == held
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        kvdist.extend_block_hashes([], [1, -2], 2, "ns")
    with pytest.raises(TypeError, match="flat sequence of integers"):
        kvdist.extend_block_hashes(held, [*tokens, 1.5], 4, "ns", "tenant-a")
    with pytest.raises(TypeError, match="hashes must be a list"):
        kvdist.extend_block_hashes(tuple(held), tokens, 4, "ns")


def _ctx(**changes):
    fields = dict(
        rank=0, world_size=1, num_layers=1, block_size=4, num_kv_heads=1, kv_head_start=0,
        kv_head_end=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
        model_namespace="t",
    )  # fmt: skip
    return kvdist.ConnectorContext(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
        ({"num_layers": 0}, ValueError, "num_layers must be a positive int"),
        ({"head_dim": 2.0}, TypeError, "head_dim must be a positive int"),
        ({"rank": 1}, ValueError, r"rank must be in \[0, world_size=1\)"),
        ({"model_namespace": None}, TypeError, "model_namespace must be a str"),
    ],
)
def test_connector_context_checks_its_fields(changes, error, match) -> None:
    """A context a connector could not work with is refused when it is built (numpy
    integers are integers). A failure means a connector divides by a zero block size or
    writes under a None namespace."""
    with pytest.raises(error, match=match):
        _ctx(**changes)
    assert _ctx(head_dim=np.int64(4)).head_dim == 4


def test_request_checks_its_id_and_token_lists() -> None:
    """Request(5, "abc") is refused: the id must be a str and the token lists lists. A
    failure means a connector iterates the characters of a string as token ids, or
    `all_token_ids` adds a tuple to a list."""
    with pytest.raises(TypeError, match="request_id must be a str"):
        kvdist.Request(5, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt_token_ids must be a list"):
        kvdist.Request("r", "abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt_token_ids must be a list"):
        kvdist.Request("r", (1, 2))  # type: ignore[arg-type]
    assert kvdist.Request("r", [1, 2]).num_tokens == 2


def test_parse_settings_names_unknown_and_missing_settings() -> None:
    """A connector's settings as a dataclass from `ctx.kwargs`, as the built-ins read theirs."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Mine:
        root: str
        threads: int = 2
        derived: int = dataclasses.field(init=False, default=0)  # not a setting

    assert kvdist.parse_settings(Mine, {"root": "/x"}, "mine") == Mine("/x", 2)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['derived'\]"):
        kvdist.parse_settings(Mine, {"root": "/x", "derived": 1}, "mine")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['thread'\] for the 'mine' "
                       r"connector; valid settings: \['root', 'threads'\]"):  # fmt: skip
        kvdist.parse_settings(Mine, {"root": "/x", "thread": 4}, "mine")
    with pytest.raises(ValueError, match=r"the 'mine' connector needs setting\(s\) \['root'\]"):
        kvdist.parse_settings(Mine, {}, "mine")


def test_byte_settings_take_units() -> None:
    """A `*_bytes` setting given as `"512M"` or `"1G"` is read as bytes (the built-in
    connectors' capacity included: it was refused as "not a positive integer"); a string
    that is no byte count is named; other settings keep their strings."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Mine:
        name: str = "x"
        capacity_bytes: int | None = None

    got = kvdist.parse_settings(Mine, {"name": "10G", "capacity_bytes": "1G"}, "mine")
    assert got == Mine("10G", 1 << 30)
    with pytest.raises(
        ValueError, match=r"mine connector: capacity_bytes: not a byte count: 'lots'"
    ):
        kvdist.parse_settings(Mine, {"capacity_bytes": "lots"}, "mine")
    # A fraction of a byte is named, not truncated to a count of 0.
    with pytest.raises(ValueError, match=r"capacity_bytes: not a whole number of bytes: '0.1'"):
        kvdist.parse_settings(Mine, {"capacity_bytes": "0.1"}, "mine")
    assert kvdist.parse_settings(Mine, {"capacity_bytes": "1.5K"}, "mine").capacity_bytes == 1536
    from kvdist.connectors.cpu.settings import CpuSettings
    from kvdist.connectors.disk.settings import DiskSettings

    disk = kvdist.parse_settings(DiskSettings, {"path": "/x", "capacity_bytes": "512MiB"}, "disk")
    assert disk.capacity_bytes == 512 << 20
    assert (
        kvdist.parse_settings(CpuSettings, {"capacity_bytes": "2G"}, "cpu").capacity_bytes
        == 2 << 30
    )


def test_connector_stats_sums_both_halves() -> None:
    """Numbers of each half's `stats` are summed by name; bools, strings and a half
    without `stats` (or None) add nothing."""

    class Half:
        def __init__(self, stats):
            self.stats = stats

    sched = Half({"hits": 3, "bytes": 10.5, "dir": "/x", "ok": True})
    worker = Half({"hits": 2, "blocks_saved": 4})
    assert kvdist.connector_stats(sched, worker) == {"hits": 5, "bytes": 10.5, "blocks_saved": 4}
    assert kvdist.connector_stats(None, worker) == {"hits": 2, "blocks_saved": 4}
    assert kvdist.connector_stats(object(), None) == {}


def test_waiting_for_names_its_kind() -> None:
    from kvdist.comm.local import LocalCommunicator

    coord = kvdist.Coordinator(LocalCommunicator(), None, timeout_s=5)
    assert coord.waiting_for("a", "save") is None
    with pytest.raises(ValueError, match="kind must be 'save' or 'load'"):
        coord.waiting_for("a", "saves")
