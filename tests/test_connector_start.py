"""Comparing the ranks' `ConnectorWorker.agreed_settings` and `shared_storage` when a
connector starts (`kvdist.coordination.connector_start`), on what each rank sends."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest
import torch
from test_coordinator import run_threads

from kvdist.api.connector import ConnectorScheduler, ConnectorWorker
from kvdist.connectors.testing import tp_context
from kvdist.coordination.connector_start import (
    _checked_storage,
    _kind_of,
    _settings_mismatch,
    _storage_mismatch,
    start_connector,
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


def test_numpy_integers_in_a_connectors_own_kwargs_compare_by_value():
    """A connector of its own compares its raw kwargs by default: a numpy integer there is
    compared as the integer, not as its type. A failure means ranks given 1 and 2 as
    np.int64 pass as equal."""
    import numpy as np

    assert _settings_mismatch(packed({"n": np.int64(2)}, {"n": 2}), "m") is None
    got = _settings_mismatch(packed({"n": np.int64(1)}, {"n": np.int64(2)}), "m")
    assert got is not None and "n is 2 there and 1 on rank 0" in got


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


class Quiet(ConnectorScheduler):
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        pass

    def build_connector_meta(self, scheduler_output):
        return None


class FailsOnRank1(ConnectorWorker):
    def register_kv_caches(self, kv_cache):
        if self.ctx.rank == 1:
            raise ValueError("cannot use /cache/\udcff")  # a path's undecodable byte

    def start_load_kv(self, stream):
        pass

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        return set(), set()


_HERE = {"module": __name__, "scheduler_class": "Quiet", "worker_class": "FailsOnRank1"}


def _start_on_two_ranks(configs: list) -> list[str]:
    """start_connector on two ranks (threads), rank r with configs[r]: each rank's error."""

    def body(comm) -> str:
        try:
            start_connector(configs[comm.rank], tp_context(comm.rank, 2), torch.zeros(1), comm, 10)
        except Exception as exc:
            return str(exc)
        return ""

    return run_threads(2, body)


def test_an_error_naming_an_undecodable_path_on_one_rank_fails_every_rank() -> None:
    """A worker failing on one rank with an error naming a path of undecodable bytes (kept
    by Python as surrogates, which msgpack refuses): the text is escaped, every rank
    raises naming it. Before, that rank raised alone packing it and the others waited out
    the deadline."""
    seen = _start_on_two_ranks([_HERE, _HERE])
    assert "\\udcff" in seen[0] and "did not start on rank(s) [1]" in seen[0], seen
    assert seen[1] == "cannot use /cache/\udcff", seen


def test_a_config_refused_on_one_rank_fails_every_rank() -> None:
    """A connector config that does not parse on one rank (a misspelt field) fails every
    rank together, not that rank at once and the others after the deadline."""
    seen = _start_on_two_ranks([_HERE, {**_HERE, "kwarg": {}}])
    assert "did not start on rank(s) [1]" in seen[0] and "unknown ConnectorConfig" in seen[0]
    assert "unknown ConnectorConfig fields: ['kwarg']" in seen[1], seen
