"""The helpers for an engine of its own: `kvdist.matched_tokens` (the lookup, checked)
and `kvdist.WorkerHooks` (a step's worker hooks, a failing one leaving the forward to
run)."""

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


class _Worker(kvdist.ConnectorWorker):
    def __init__(self, fail: str = "", layer_hooks=True):
        super().__init__(tp_context(0, 1))
        self.fail = fail
        self.layer_hooks = layer_hooks
        self.calls: list[str] = []

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise OSError(f"{name} broke")

    def start_load_kv(self, stream):
        self._hook("start_load_kv")

    def needs_layer_hooks(self):
        self.calls.append("needs_layer_hooks")
        return self.layer_hooks

    def wait_for_layer_load(self, layer_idx, stream):
        self._hook(f"wait_for_layer_load({layer_idx})")

    def save_kv_layer(self, layer_idx, stream):
        self._hook(f"save_kv_layer({layer_idx})")

    def wait_for_save(self, stream):
        self._hook("wait_for_save")


def _step(hooks: kvdist.WorkerHooks, layers: int = 2, bind_error=None) -> None:
    """An engine's step as the README gives it (the forward itself left out)."""
    hooks.begin(bind_error)
    hooks.start_load_kv()
    per_layer = hooks.needs_layer_hooks()
    for i in range(layers):
        if per_layer:
            hooks.wait_for_layer_load(i)
        if per_layer:
            hooks.save_kv_layer(i)
    hooks.wait_for_save()


def test_worker_hooks_call_every_hook_in_a_good_step() -> None:
    worker = _Worker()
    hooks = kvdist.WorkerHooks(worker)
    _step(hooks)
    assert hooks.error is None
    assert worker.calls == [
        "start_load_kv",
        "needs_layer_hooks",
        "wait_for_layer_load(0)",
        "save_kv_layer(0)",
        "wait_for_layer_load(1)",
        "save_kv_layer(1)",
        "wait_for_save",
    ]


@pytest.mark.parametrize("fail", ["start_load_kv", "wait_for_layer_load(0)", "save_kv_layer(1)"])
def test_a_hook_that_raises_leaves_the_worker_out_of_the_step_without_raising(fail) -> None:
    """The first hook that raises is kept as a ConnectorError naming the hook, nothing is
    raised (the engine's forward, whose tensor-parallel collectives the other ranks wait
    in, goes on), the worker is not called again in the step, and the next step calls it
    again. A failure here means an engine's rank leaves its forward and every rank times
    out instead of raising the hook's error together."""
    worker = _Worker(fail=fail)
    hooks = kvdist.WorkerHooks(worker)
    _step(hooks)
    assert isinstance(hooks.error, kvdist.ConnectorError), hooks.error
    assert f"_Worker.{fail.split('(')[0]} raised OSError: {fail} broke" in str(hooks.error)
    assert worker.calls[-1] == fail and "wait_for_save" not in worker.calls, worker.calls
    worker.calls, worker.fail = [], ""
    _step(hooks)
    assert hooks.error is None and worker.calls[-1] == "wait_for_save", worker.calls


def test_a_bind_error_or_no_worker_calls_nothing() -> None:
    worker = _Worker()
    hooks = kvdist.WorkerHooks(worker)
    refused = kvdist.ConnectorError(worker, "bind_connector_meta", "refused")
    _step(hooks, bind_error=refused)
    assert worker.calls == [] and hooks.error is refused
    nothing = kvdist.WorkerHooks(None)
    _step(nothing)
    assert nothing.error is None and nothing.needs_layer_hooks() is False


def test_needs_layer_hooks_must_answer_a_bool() -> None:
    """None (a stub's `...`) is an error of the step, not a guess."""
    worker = _Worker(layer_hooks=None)
    hooks = kvdist.WorkerHooks(worker)
    _step(hooks)
    assert "needs_layer_hooks returned None" in str(hooks.error)
    assert "wait_for_save" not in worker.calls
