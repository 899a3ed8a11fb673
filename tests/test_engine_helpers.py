"""The helpers for an engine of its own: `kvdist.matched_tokens` (the lookup, checked)."""

from __future__ import annotations

import numpy as np
import pytest

import kvdist
from kvdist.connectors.testing import tp_context


class _Lookup(kvdist.ConnectorScheduler):
    def __init__(self, answer):
        super().__init__(tp_context(0, 1))
        self.answer = answer

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        pass

    def build_connector_meta(self, scheduler_output):
        return None


@pytest.mark.parametrize(
    "answer, want",
    [
        ((8, False), (8, False)),
        ((np.int64(4), np.bool_(True)), (4, True)),
        ((0, False), (0, False)),
    ],
)
def test_matched_tokens_returns_a_valid_answer_as_python_values(answer, want) -> None:
    got = kvdist.matched_tokens(_Lookup(answer), kvdist.Request("r", [1, 2, 3]), 0)
    assert got == want and type(got[0]) is int and type(got[1]) is bool


@pytest.mark.parametrize(
    "answer, message",
    [
        (OSError("index unreadable"), "raised OSError: index unreadable"),
        ("many", "must return (int, bool), got 'many'"),
        ((1.5, False), "must return (int, bool), got (1.5, False)"),
        ((-1, False), "returned -1 tokens (< 0)"),
        ((0, True), "answered (0, True) for request 'r'"),
    ],
)
def test_matched_tokens_raises_one_error_type_naming_the_connector(answer, message) -> None:
    """Whatever is wrong with the lookup, a ConnectorError naming the connector class and
    the hook, so that an engine fails that request alone with one `except`. A failure
    means an engine must tell a raised error from a malformed answer itself (or copy
    kvdist's internal checks)."""
    with pytest.raises(kvdist.ConnectorError) as info:
        kvdist.matched_tokens(_Lookup(answer), kvdist.Request("r", [1, 2, 3]), 0)
    assert str(info.value).startswith("_Lookup.get_num_new_matched_tokens "), info.value
    assert message in str(info.value), info.value
    assert info.value.hook == "get_num_new_matched_tokens"
