"""User-caused model problems end in a ValueError that says what is wrong and where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvdist.engine.model import (
    PRESETS,
    SUPPORTED_ARCHITECTURES,
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
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 1024,
            },
            "sliding_window",
        ),
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
        d = {**_hf("MistralForCausalLM"), "sliding_window": window}
        assert ModelConfig.from_hf_dict(d).architecture == "MistralForCausalLM"


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_an_absent_sliding_window_is_transformers_default_of_4096(arch):
    """Without a `sliding_window` key, transformers gives these architectures a
    4096-token window (Qwen's only with use_sliding_window, on the layers that slide): a
    context past it is refused, as an explicit window is (it used to load as full
    attention, and differ from transformers past 4096 tokens); one within it loads. With
    use_sliding_window false, Qwen has no window, whatever layer_types says."""
    layers = TINY.num_layers
    qwen = {"use_sliding_window": True, "max_window_layers": layers - 1}
    changes = qwen if arch != "MistralForCausalLM" else {}
    long = {"max_position_embeddings": 8192, "rope_scaling": None, **changes}
    d = _hf(arch, **long)
    d.pop("sliding_window", None)
    with pytest.raises(ValueError, match="sliding_window=4096 < max_position_embeddings=8192"):
        ModelConfig.from_hf_dict(d)
    d["max_position_embeddings"] = 4096
    assert ModelConfig.from_hf_dict(d).architecture == arch
    if arch != "MistralForCausalLM":
        off = {**long, "use_sliding_window": False, "sliding_window": 8}
        off["layer_types"] = ["full_attention"] * (layers - 1) + ["sliding_attention"]
        assert ModelConfig.from_hf_dict(_hf(arch, **off)).architecture == arch


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


def test_tied_config_with_a_different_stored_head_is_refused(tiny_ckpt):
    """tie_word_embeddings=true with an lm_head.weight that differs from the embedding is
    refused (transformers 4 and 5 would each pick a different one); the same head stored
    twice loads. A failure means the model silently used the embedding as its head."""
    _edit_config(tiny_ckpt, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tie_word_embeddings.*lm_head.weight.*differs"):
        load_model(tiny_ckpt, tp=TPInfo())
    _edit_tensors(
        tiny_ckpt,
        lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}),
    )
    model, config, _, _ = load_model(tiny_ckpt, tp=TPInfo(), dtype="float32")
    assert config.tie_word_embeddings
    embed = load_file(tiny_ckpt / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight.float(), embed.float())


def test_two_rope_forms_that_disagree_are_refused():
    """A config carrying transformers 5's rope_parameters and 4.x's rope_scaling must
    have them agree (which one wins depends on the version); agreeing copies load. A
    failure means the llama3 scaling was silently dropped."""
    d = TINY.to_hf_dict()
    assert d["rope_scaling"]["rope_type"] == "llama3"
    same = {**d, "rope_parameters": {**d["rope_scaling"], "rope_theta": d["rope_theta"]}}
    assert ModelConfig.from_hf_dict(same) == TINY
    plain = {**d, "rope_parameters": {"rope_type": "default", "rope_theta": d["rope_theta"]}}
    with pytest.raises(ValueError, match="two different rope scalings"):
        ModelConfig.from_hf_dict(plain)
    other_theta = {**same, "rope_theta": 500000.0}
    with pytest.raises(ValueError, match="two different rope thetas"):
        ModelConfig.from_hf_dict(other_theta)


def test_truncated_and_malformed_weight_files_are_named(tiny_ckpt):
    """A weight file cut short (a partial download), a header that is not JSON, and an
    index that is not JSON each fail naming the file, before any tensor is read. A
    failure means a raw safetensors traceback, or a misleading 'missing tensor'."""
    weights = tiny_ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated: tensor"):
        load_model(tiny_ckpt, tp=TPInfo())
    weights.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a safetensors file"):
        load_model(tiny_ckpt, tp=TPInfo())
    weights.write_bytes(data)
    weights.rename(tiny_ckpt / "model-00001-of-00001.safetensors")  # a sharded checkpoint
    (tiny_ckpt / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"index\.json: cannot read it as JSON"):
        load_model(tiny_ckpt, tp=TPInfo())


def test_bad_generation_config_is_named(tiny_ckpt):
    """A generation_config.json that is not JSON, or whose eos_token_id is a string, is
    named. A failure means a bare JSONDecodeError, or a stop id that never matches."""
    gen = tiny_ckpt / "generation_config.json"
    gen.write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config\.json: cannot read"):
        load_model(tiny_ckpt, tp=TPInfo())
    gen.write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: 'eos_token_id'"):
        load_model(tiny_ckpt, tp=TPInfo())


def test_integer_weights_are_refused(tiny_ckpt):
    """A weight stored as integers is refused by name rather than cast. A failure means
    a quantised or corrupt tensor is loaded as if it were the float weight."""
    name = "model.norm.weight"
    _edit_tensors(tiny_ckpt, lambda t: t.update({name: t[name].to(torch.int64)}))
    with pytest.raises(ValueError, match=rf"{name}.*stored as I64"):
        load_model(tiny_ckpt, tp=TPInfo())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"num_attention_heads": None}, "'num_attention_heads' must be a positive integer"),
        ({"num_hidden_layers": 2.0}, "'num_hidden_layers' must be a positive integer"),
        ({"rms_norm_eps": "abc"}, "'rms_norm_eps' must be a positive number"),
        ({"eos_token_id": "</s>"}, "'eos_token_id' must be a token id or a list"),
        ({"bos_token_id": [1, 2]}, "'bos_token_id' must be a token id"),
        ({"rope_theta": "big"}, "'rope_theta' must be a positive number"),
        ({"head_dim": 0}, "'head_dim' must be a positive integer"),
    ],
)
def test_bad_config_values_name_the_config_key(changes, match):
    """A malformed config.json value is named by its config.json key. A failure means an
    internal field name, a bare conversion error, or a silently wrong eos id."""
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict({**TINY.to_hf_dict(), **changes})
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelConfig.from_hf_dict([TINY.to_hf_dict()])  # type: ignore[arg-type]


def _hf(arch: str, **changes) -> dict:
    model_type = SUPPORTED_ARCHITECTURES[arch]
    d = {**TINY.to_hf_dict(), "architectures": [arch], "model_type": model_type, **changes}
    return {k: v for k, v in d.items() if v is not _ABSENT}


_ABSENT = object()


def test_per_architecture_defaults_follow_transformers():
    """Keys config.json leaves out take the architecture's transformers default: Qwen3's
    head_dim is 128, Mistral's and Qwen's KV head counts 8 and 32; Mistral never has an
    attention bias (transformers ignores the key). A failure means kvdist reads such a
    config differently from the model it was trained as."""
    qwen3 = ModelConfig.from_hf_dict(
        _hf(
            "Qwen3ForCausalLM",
            head_dim=_ABSENT,
            num_key_value_heads=_ABSENT,
            num_attention_heads=32,
            hidden_size=64,
            rope_scaling=None,
        )  # fmt: skip
    )
    assert (qwen3.head_dim, qwen3.num_kv_heads) == (128, 32)
    mistral = ModelConfig.from_hf_dict(
        _hf("MistralForCausalLM", num_key_value_heads=_ABSENT, attention_bias=True)
    )
    assert (mistral.num_kv_heads, mistral.attention_bias) == (8, False)
    llama = ModelConfig.from_hf_dict(_hf("LlamaForCausalLM", num_key_value_heads=_ABSENT))
    assert llama.num_kv_heads == TINY.num_heads


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_qwen_sliding_window_counts_only_layers_that_slide(arch):
    """Qwen2/3 with use_sliding_window slide only from max_window_layers on (or on the
    layers layer_types names): a window no layer uses loads as full attention, one that
    some layer uses is refused. A failure means a loadable checkpoint is refused, or a
    sliding one computed with full attention."""
    layers = TINY.num_layers
    window = {"use_sliding_window": True, "sliding_window": 8, "rope_scaling": None}
    ok = [
        {**window, "max_window_layers": layers},
        {**window, "layer_types": ["full_attention"] * layers},
    ]
    for changes in ok:
        assert ModelConfig.from_hf_dict(_hf(arch, **changes)).architecture == arch
    bad = [
        {**window, "max_window_layers": layers - 1},
        {**window, "layer_types": ["full_attention"] * (layers - 1) + ["sliding_attention"]},
    ]
    for changes in bad:
        with pytest.raises(ValueError, match="sliding_window=8"):
            ModelConfig.from_hf_dict(_hf(arch, **changes))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        # transformers builds the model from model_type: labelled Llama, a Qwen3 would
        # run without its q/k norms (their tensors dropped with a warning).
        (
            {"model_type": "qwen3", "architectures": ["LlamaForCausalLM"]},
            r"model_type 'qwen3' and architectures \['LlamaForCausalLM'\] name different",
        ),
        # transformers 5 reads rope_scaling first, with no theta: the default, not 500000.
        (
            {
                "rope_theta": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                "rope_scaling": {"rope_type": "default"},
            },
            r"two different rope thetas: rope_parameters.rope_theta 500000.0, rope_scaling",
        ),
        (
            {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "default", "rope_theta": 5e5}},
            "two different rope thetas",
        ),
        (
            {"original_max_position_embeddings": 16},
            r"original_max_position_embeddings 16 at the top level and 256 in rope_scaling",
        ),
    ],
    ids=["model-type", "theta-scaling-vs-parameters", "theta-top-vs-scaling", "original-context"],
)
def test_config_forms_read_two_ways_are_refused(changes, match):
    """Where transformers' versions, or transformers and kvdist, would read a config two
    ways, it is refused by name (each of these was run one way by kvdist and the other
    by transformers, serving other tokens without a warning)."""
    d = {**TINY.to_hf_dict(), **changes}
    d = {k: v for k, v in d.items() if v is not None or k != "rope_theta"}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(d)


def test_a_single_weight_file_beside_an_index_is_refused(tiny_ckpt):
    """model.safetensors beside an index and its shards: transformers loads the single
    file, kvdist loaded the index; one is left over from another save (a stale copy was
    served)."""
    (tiny_ckpt / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ValueError, match="both model.safetensors and model.safetensors.index"):
        load_model(tiny_ckpt, tp=TPInfo())


def test_a_float64_checkpoint_loads_in_the_dtype_asked_for(tiny_ckpt):
    """A checkpoint stored in float64 loads converted to the dtype asked for, with the
    same weights as its float32 copy; without a dtype asked, the error names float64 and
    says to ask for one. A failure means such checkpoints are refused outright (as they
    were), or run in a dtype nobody asked for."""
    reference, _, _, _ = load_model(tiny_ckpt, tp=TPInfo(), dtype="float32")
    _edit_tensors(tiny_ckpt, lambda t: t.update({k: v.double() for k, v in t.items()}))
    _edit_config(tiny_ckpt, torch_dtype="float64")
    model, config, _, _ = load_model(tiny_ckpt, tp=TPInfo(), dtype="float32")
    assert config.torch_dtype == "float64"
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference.state_dict()[name]), name
    with pytest.raises(ValueError, match=r"stores float64.*ask for a dtype"):
        load_model(tiny_ckpt, tp=TPInfo())
    _edit_config(tiny_ckpt, torch_dtype="complex64")
    with pytest.raises(ValueError, match="torch_dtype 'complex64' is not supported"):
        load_model(tiny_ckpt, tp=TPInfo(), dtype="float32")
