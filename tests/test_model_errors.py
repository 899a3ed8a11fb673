"""User-caused model problems end in a ValueError that says what is wrong and where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvdist.engine.model import (
    PRESETS,
    AttentionMetadata,
    LlamaForCausalLM,
    ModelConfig,
    TPInfo,
    build_preset,
    load_model,
    write_checkpoint,
)

TINY = PRESETS["tiny"].config


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    return write_checkpoint("tiny", tmp_path / "tiny")


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture_is_named(tiny_ckpt):
    """A GPT-2 config is refused, naming it and what is supported. A failure means an
    unsupported model could be loaded into the wrong layer structure."""
    _edit_config(tiny_ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tiny_ckpt, tp=TPInfo())


def test_missing_config_key_is_named():
    """A config.json without intermediate_size names that key. A failure means users get
    a bare KeyError (or a default) instead of being told what the config lacks."""
    d = TINY.to_hf_dict()
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf_dict(d)


def test_config_round_trips_and_reads_transformers5_rope():
    """to_hf_dict/from_hf_dict round-trip, and transformers 5's `rope_parameters` form
    reads the same as the 4.x form. A failure means checkpoints saved by newer
    transformers would silently lose their rope scaling."""
    d = TINY.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == TINY
    v5 = dict(d)
    v5["rope_parameters"] = {**v5.pop("rope_scaling"), "rope_theta": v5.pop("rope_theta")}
    assert ModelConfig.from_hf_dict(v5) == TINY
    assert ModelConfig.from_hf_dict(v5).fingerprint() == TINY.fingerprint()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 1024}, "sliding_window"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(8\).*num_key_value_heads \(3\)"),
        ({"torch_dtype": "float8_e4m3fn"}, "float8_e4m3fn"),
    ],
)
def test_unsupported_config_features_are_refused(changes, match):
    """Rope types, sliding windows, activations and head layouts the engine cannot run
    are refused by name. A failure means such a model would load and compute garbage."""
    d = {**TINY.to_hf_dict(), **changes}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(d)


def test_mistral_without_window_is_accepted():
    """A Mistral config whose window is None or covers all positions loads as full
    attention. A failure means valid Mistral checkpoints are refused."""
    for window in (None, TINY.max_position_embeddings):
        d = {**TINY.to_hf_dict(), "architectures": ["MistralForCausalLM"], "sliding_window": window}
        assert ModelConfig.from_hf_dict(d).architecture == "MistralForCausalLM"


def test_shape_mismatch_names_tensor_and_shapes(tiny_ckpt):
    """A tensor whose shape disagrees with config.json is named with both shapes. A
    failure means a mismatched checkpoint loads (or dies with an opaque copy error)."""
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(tiny_ckpt, lambda t: t.update({name: torch.zeros(255, 128)}))
    with pytest.raises(ValueError, match=rf"{name}.*\[255, 128\].*\[256, 128\]"):
        load_model(tiny_ckpt, tp=TPInfo())


def test_missing_tensor_is_named(tiny_ckpt):
    """A checkpoint lacking one layer's k_proj names it. A failure means the model would
    run with uninitialised weights."""
    name = "model.layers.2.self_attn.k_proj.weight"
    _edit_tensors(tiny_ckpt, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name):
        load_model(tiny_ckpt, tp=TPInfo())


def test_missing_lm_head_points_at_tie_word_embeddings(tiny_ckpt):
    """An untied config without lm_head.weight says so and mentions tie_word_embeddings.
    A failure means the user is not told how a tied checkpoint must be declared."""
    _edit_tensors(tiny_ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        load_model(tiny_ckpt, tp=TPInfo())


@pytest.mark.parametrize("size", [3, 16])
def test_tp_size_must_fit_the_heads(size):
    """TP 3 (divides neither head count) and TP 16 (more ranks than the 8 query heads)
    are refused, naming the head counts and the sizes that fit. A failure means ranks
    would get unequal or empty head shards."""
    with pytest.raises(
        ValueError,
        match=rf"size {size} does not fit.*num_key_value_heads 4.*supports: 1, 2, 4, 8$",
    ):
        LlamaForCausalLM(TINY, TPInfo(rank=0, size=size), dtype=torch.float32, device="cpu")


def test_missing_config_json_and_unknown_source(tmp_path):
    """A directory without config.json, an unknown preset and a directory with only
    pickled weights are refused with what was expected. A failure means bad paths give
    tracebacks, or a pickle gets loaded."""
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path, tp=TPInfo())
    with pytest.raises(ValueError, match="preset"):
        load_model("no-such-model", tp=TPInfo())
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path, tp=TPInfo())


def test_bad_tp_info_and_unknown_preset():
    """A rank outside the group and an unknown preset name are refused. A failure means
    a misconfigured launch builds a wrong shard instead of stopping."""
    with pytest.raises(ValueError, match="rank"):
        TPInfo(rank=2, size=2)
    with pytest.raises(ValueError, match="tiny"):
        build_preset("huge", tp=TPInfo())


def test_attention_metadata_rejects_short_block_table():
    """Building a step whose block table cannot hold its tokens is refused. A failure
    means K/V would be written to slots of blocks the sequence does not own."""
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        AttentionMetadata.build([([0, 1], 4, 5)], block_size=4)
    with pytest.raises(ValueError, match="num_new_tokens"):
        AttentionMetadata.build([([0, 1], 4, 0)], block_size=4)


def test_unreadable_checkpoint_files_are_named(tiny_ckpt):
    """A config.json that is not JSON, and a tokenizer.json that is not a tokenizer: the
    error names the file (the libraries' own messages do not)."""
    (tiny_ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: Expecting property name"):
        load_model(tiny_ckpt, tp=TPInfo())
    from kvdist.engine.model.tokenizer import HFTokenizer

    bad = tiny_ckpt / "tokenizer.json"
    bad.write_text('{"version": 1}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a usable tokenizer"):
        HFTokenizer(bad, bos_token_id=None, eos_token_ids=())
