"""Comparing the ranks' `ConnectorWorker.agreed_settings` and `shared_storage` when a
connector starts (`kvdist.coordination.connector_start`), on what each rank sends."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest

from kvdist.coordination.connector_start import (
    _checked_storage,
    _kind_of,
    _settings_mismatch,
    _storage_mismatch,
)


def packed(*values) -> list[bytes]:
    return [msgpack.packb(v, use_bin_type=True, default=_kind_of) for v in values]


def test_equal_settings_pass_whatever_their_key_order_or_nan():
    assert _settings_mismatch(packed({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}), "m") is None
    assert _settings_mismatch(packed({"x": math.nan}, {"x": math.nan}), "m") is None
    # Map keys of any kind decode (a tuple key arrives as a tuple, not as an unhashable list).
    assert _settings_mismatch(packed({"m": {(0, 1): 2}}, {"m": {(0, 1): 2}}), "m") is None


def test_the_first_difference_is_named_with_both_values():
    got = _settings_mismatch(packed({"t": [{"c": 1}]}, {"t": [{"c": 1}]}, {"t": [{"c": 2}]}), "m")
    assert got is not None and got.startswith(
        "the connector 'm' has other settings on rank 2 than on rank 0: t[0].c is 2 there and "
        "1 on rank 0"
    )
    got = _settings_mismatch(packed({"a": 1}, {"a": 1, "b": 0}), "m")
    assert got is not None and "b is 0 there and '(not set)' on rank 0" in got


def test_values_that_are_not_plain_data_compare_by_kind_paths_by_text():
    assert _settings_mismatch(packed({"o": object()}, {"o": object()}), "m") is None
    got = _settings_mismatch(packed({"p": Path("/a")}, {"p": Path("/b")}), "m")
    assert got is not None and "p is '/b' there and '/a' on rank 0" in got


def test_ranks_finding_one_store_under_a_name_pass():
    same = [("n0", {"cache directory /c": "x"}), ("n0", {"cache directory /c": "x"})]
    assert _storage_mismatch(same, "m") is None
    # A rank that could not identify a store (no id) is not compared; nor are other names.
    assert (
        _storage_mismatch([("n0", {"d /c": "x"}), ("n1", {}), ("n1", {"d /e": "y"})], "m") is None
    )


def test_a_store_each_node_has_its_own_of_fails_naming_it_and_the_hosts():
    got = _storage_mismatch(
        [("n0", {"d /c": "x"}), ("n0", {"d /c": "x"}), ("n1", {"d /c": "y"})], "disk"
    )
    assert got is not None and got.startswith(
        "the connector 'disk' needs every rank to use one and the same d /c, but rank 2 (on n1) "
        "finds another one than rank 0 (on n0); on several nodes it must be on a filesystem "
        "that every node mounts"
    ), got
    got = _storage_mismatch([("n0", {}), ("n0", {"d /c": "x"}), ("n0", {"d /c": "y"})], "m")
    assert got is not None and "but rank 2 finds another one than rank 1 (both on n0); " in got


def test_shared_storage_must_name_strings():
    assert _checked_storage({"a": "b"}) == {"a": "b"}
    for bad in (None, {"a": 1}, {1: "b"}, [("a", "b")]):
        with pytest.raises(TypeError, match="shared_storage\\(\\) must return a dict of str"):
            _checked_storage(bad)
