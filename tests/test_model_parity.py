"""The kvdist model against Hugging Face transformers, at tensor-parallel sizes 1, 2 and 4.

Checkpoints are written from the tiny presets; every TP size runs in subprocesses of
tests/mp/model_worker.py (gloo over a FileStore) and rank 0's results are compared here
with transformers' float32 eager implementation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_with_kv_heads
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvdist.engine.model import (
    ByteTokenizer,
    HFTokenizer,
    TPInfo,
    load_model,
    write_checkpoint,
)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mp" / "model_worker.py"
ATOL = 1e-4
GEN = 16
WORKER_TIMEOUT_S = 150

_g = torch.Generator().manual_seed(1234)
PROMPTS = [torch.randint(0, 512, (n,), generator=_g).tolist() for n in (23, 9, 14)]
PREFIX_SUFFIX = torch.randint(0, 512, (7,), generator=_g).tolist()
PROMPT_B = PROMPTS[0][:12] + PREFIX_SUFFIX

# job key -> (checkpoint key or preset source, HF reference key)
JOBS = {
    "tiny": "tiny",
    "tiny-qwen2": "tiny-qwen2",
    "tiny-qwen3": "tiny-qwen3",
    "tiny-sharded": "tiny",
    "tiny-tied": "tiny-tied",
    "preset-tiny": "tiny",
    # Fewer KV heads than ranks at TP 4 (2 heads) and at TP 2 and 4 (1 head): replicated.
    "tiny-kv2": "tiny-kv2",
    "tiny-kv1": "tiny-kv1",
}
TP_SIZES = [
    1,
    pytest.param(2, marks=pytest.mark.multirank),
    pytest.param(4, marks=pytest.mark.multirank),
]
REF_MODELS = ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-tied", "tiny-kv2", "tiny-kv1"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {
        "tiny": write_checkpoint("tiny", root / "tiny"),
        "tiny-qwen2": write_checkpoint("tiny-qwen2", root / "tiny-qwen2"),
        "tiny-qwen3": write_checkpoint("tiny-qwen3", root / "tiny-qwen3"),
        "tiny-sharded": write_checkpoint("tiny", root / "tiny-sharded", shard_size_bytes=400_000),
    }
    # A tied-embedding model: config says so and the checkpoint has no lm_head.
    tied = write_checkpoint("tiny", root / "tiny-tied")
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tied / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    paths["tiny-tied"] = tied
    for heads in (2, 1):
        paths[f"tiny-kv{heads}"] = tiny_with_kv_heads(root / f"tiny-kv{heads}", heads)
    return paths


@pytest.fixture(scope="module")
def hf_refs(checkpoints) -> dict[str, dict]:
    refs = {}
    for key in REF_MODELS:
        cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}.get(
            key.removeprefix("tiny-"), transformers.LlamaForCausalLM
        )
        hf = cls.from_pretrained(checkpoints[key], dtype=torch.float32, attn_implementation="eager")
        hf.eval()
        hf.generation_config.eos_token_id = None  # compare all 16 tokens, even past an EOS
        hf.generation_config.pad_token_id = 0
        with torch.no_grad():
            ref = {
                "full": hf(torch.tensor([PROMPTS[0]])).logits[0],
                "prefix": hf(torch.tensor([PROMPT_B])).logits[0, 12:],
                "batch": torch.stack([_generate(hf, p) for p in PROMPTS]),
                "rope_type": hf.model.rotary_emb.rope_type,
                "tied": hf.lm_head.weight is hf.model.embed_tokens.weight,
                # Qwen3's per-head q/k norm weights, drawn away from 1 so they matter.
                "qk_norm_spread": float(
                    getattr(hf.model.layers[0].self_attn, "q_norm", torch.nn.Identity())
                    .state_dict()
                    .get("weight", torch.ones(2))
                    .std()
                ),
            }
        ref["greedy"] = ref["batch"][0]
        refs[key] = ref
    return refs


def _generate(hf, prompt: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=GEN,
        min_new_tokens=GEN,
        do_sample=False,
    )
    return out[0, len(prompt) :]


@pytest.fixture(scope="module")
def tp_results(checkpoints, tmp_path_factory):
    """tp size -> job key -> (tensors, fingerprint); each TP size is launched once, lazily."""
    cache: dict[int, dict] = {}

    def get(tp: int) -> dict:
        if tp not in cache:
            cache[tp] = _run_workers(tp, checkpoints, tmp_path_factory.mktemp(f"tp{tp}"))
        return cache[tp]

    return get


def _run_workers(tp: int, checkpoints: dict[str, Path], out: Path) -> dict:
    jobs = [
        {"key": key, "source": "tiny" if key == "preset-tiny" else str(checkpoints[key])}
        for key in JOBS
    ]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "prompts": PROMPTS, "prefix_suffix": PREFIX_SUFFIX}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    store = out / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(spec), str(out), str(r), str(tp), str(store)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(tp)
    ]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs) or len(logs) < tp:
        detail = "\n".join(
            f"--- rank {r} (rc={p.returncode}) ---\n{log[-3000:]}"
            for r, (p, log) in enumerate(zip(procs, logs))
        )
        pytest.fail(f"TP={tp} workers failed or timed out after {WORKER_TIMEOUT_S}s\n{detail}")
    results = {}
    for key in JOBS:
        path = out / f"{key}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            fingerprint = f.metadata()["fingerprint"]
        results[key] = (load_file(path), fingerprint)
    return results


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # The reference must have real spread, or a 1e-4 tolerance would prove nothing.
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    err = (actual - expected).abs().max().item()
    assert actual.shape == expected.shape and err <= ATOL, f"{what}: max |diff| {err:.2e}"


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize(
    "job", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-tied", "tiny-kv2", "tiny-kv1"]
)
def test_full_prompt_logits_match_transformers(tp_results, hf_refs, tp, job):
    """Every position's logits of a one-shot prefill equal transformers' within 1e-4.
    A failure means the forward pass (weights sharding, RoPE/llama3 scaling, GQA, KV heads
    replicated over more ranks than heads, q/k/v bias, Qwen3's q/k norms and head_dim,
    tied head, all-reduce or logits gather) computes a different model."""
    tensors, _ = tp_results(tp)[job]
    _assert_close(tensors["full"], hf_refs[JOBS[job]]["full"], f"{job} TP={tp}")


def test_reference_exercises_what_it_should(hf_refs):
    """The references really use llama3 rope scaling, a tied head and Qwen3's q/k norms,
    and Qwen2 differs from Llama. A failure means the parity tests above could pass
    without covering them."""
    assert hf_refs["tiny"]["rope_type"] == "llama3"
    assert hf_refs["tiny-qwen3"]["qk_norm_spread"] > 0.01
    assert hf_refs["tiny"]["qk_norm_spread"] == 0.0
    assert hf_refs["tiny-tied"]["tied"] and not hf_refs["tiny"]["tied"]
    assert not torch.allclose(hf_refs["tiny"]["full"], hf_refs["tiny-tied"]["full"], atol=1e-2)
    assert not torch.allclose(hf_refs["tiny"]["full"], hf_refs["tiny-qwen2"]["full"], atol=1e-2)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("job", ["tiny", "tiny-qwen2", "tiny-qwen3"])
def test_chunked_prefill_matches_one_prefill(tp_results, hf_refs, tp, job):
    """Prefilling in 5-token chunks that straddle 4-token blocks gives the same logits as
    one prefill (and as transformers). A failure means chunks attend to the wrong cached
    keys: bad slot mapping, block gather, or causal offset for computed_position > 0."""
    tensors, _ = tp_results(tp)[job]
    assert torch.allclose(tensors["chunked"], tensors["full"], atol=1e-5, rtol=0)
    _assert_close(tensors["chunked"], hf_refs[job]["full"], f"{job} chunked TP={tp}")


@pytest.mark.parametrize("tp", TP_SIZES)
def test_prefill_after_prefix_hit_matches_transformers(tp_results, hf_refs, tp):
    """A prompt sharing three cached blocks with an earlier one, prefilled from position
    12 on top of those blocks, gets transformers' logits for its own full prompt. A
    failure means a prefix-cache hit would change the model's output."""
    tensors, _ = tp_results(tp)["tiny"]
    _assert_close(tensors["prefix"], hf_refs["tiny"]["prefix"], f"prefix TP={tp}")


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("job", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-kv2", "tiny-kv1"])
def test_greedy_decode_matches_generate(tp_results, hf_refs, tp, job):
    """16 greedy tokens decoded one step at a time through the paged cache equal
    transformers' generate(do_sample=False). A failure means decode reads or writes the
    paged KV cache wrongly, or positions drift."""
    tensors, _ = tp_results(tp)[job]
    assert tensors["greedy"].tolist() == hf_refs[job]["greedy"].tolist()


@pytest.mark.parametrize("tp", TP_SIZES)
def test_mixed_and_batched_steps_match_generate(tp_results, hf_refs, tp):
    """Three prompts run together - a prefill beside a first chunk, a decode beside a
    chunk and a new prefill, then batched decodes of different context lengths - each
    produce transformers' greedy tokens. A failure means sequences in one step interfere
    (the batched decode path's padding/mask, or per-sequence offsets in mixed batches)."""
    tensors, _ = tp_results(tp)["tiny"]
    assert tensors["batch"].tolist() == hf_refs["tiny"]["batch"].tolist()


@pytest.mark.parametrize("tp", TP_SIZES)
def test_sharded_checkpoint_loads_identically(tp_results, checkpoints, tp):
    """A checkpoint split over several files with an index json gives bit-identical
    logits. A failure means the index is misread or some tensor comes from the wrong file."""
    assert len(list(checkpoints["tiny-sharded"].glob("model-*-of-*.safetensors"))) > 2
    results = tp_results(tp)
    assert torch.equal(results["tiny-sharded"][0]["full"], results["tiny"][0]["full"])


@pytest.mark.parametrize("tp", TP_SIZES)
def test_preset_equals_its_checkpoint(tp_results, hf_refs, tp):
    """build_preset("tiny") at this TP size computes what transformers computes from the
    checkpoint write_checkpoint("tiny") wrote. A failure means preset weights depend on
    the TP size, or the written checkpoint is not the preset."""
    tensors, _ = tp_results(tp)["preset-tiny"]
    _assert_close(tensors["full"], hf_refs["tiny"]["full"], f"preset TP={tp}")


@pytest.mark.multirank
def test_fingerprints_stable_across_tp_and_distinct(tp_results):
    """Every rank count computes the same fingerprint for a source, and different
    sources get different ones. A failure means KV caches would not be shared between TP
    sizes of one model, or could be mixed between different models."""
    by_tp = [{k: fp for k, (_, fp) in tp_results(tp).items()} for tp in (1, 2, 4)]
    assert by_tp[0] == by_tp[1] == by_tp[2]
    assert len(set(by_tp[0].values())) == len(by_tp[0])


def test_greedy_output_is_not_degenerate(tp_results):
    """The tiny preset's greedy continuation uses many distinct tokens. A failure means
    the random init collapsed (e.g. one token forever), which would let tests that compare
    outputs pass without checking anything."""
    tensors, _ = tp_results(1)["preset-tiny"]
    assert len(set(tensors["greedy"].tolist())) >= 8
    assert len(set(tensors["batch"].flatten().tolist())) >= 16


def test_tokenizers(tmp_path, checkpoints):
    """A preset gets the byte tokenizer; a checkpoint with tokenizer.json gets it through
    the tokenizers library, with generation_config's EOS ids. A failure means prompts
    would be tokenized with the wrong vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, _, tok, _ = load_model("tiny", tp=TPInfo())
    assert isinstance(tok, ByteTokenizer)
    assert tok.decode(tok.encode("héllo") + [257, 300]) == "héllo"

    _, _, tok, _ = load_model(checkpoints["tiny"], tp=TPInfo())
    assert isinstance(tok, ByteTokenizer)  # written from a preset: byte special ids

    vocab = {"[UNK]": 0, "hello": 5, "world": 7}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    d = write_checkpoint("tiny", tmp_path / "with-tok")
    rust.save(str(d / "tokenizer.json"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 9]}))
    _, _, tok, _ = load_model(d, tp=TPInfo())
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [5, 7]
    assert tok.eos_token_ids == (257, 9) and tok.eos_token_id == 257


def test_lm_head_pads_an_uneven_vocab():
    """With a vocabulary not divisible by the TP size (512 over 3 ranks), the per-rank
    head shards, concatenated, are exactly the full head plus zero padding. A failure
    means some token ids would be scored by the wrong rows, or not at all."""
    from kvdist.engine.model import ParallelLMHead

    full = torch.randn(512, 16)
    shards = []
    for rank in range(3):
        head = ParallelLMHead(
            512, 16, tp=TPInfo(rank=rank, size=3), dtype=torch.float32, device="cpu"
        )
        head.weight_loader(head.weight, full)
        shards.append(head.weight.data)
    joined = torch.cat(shards)
    assert joined.shape == (513, 16)
    assert torch.equal(joined[:512], full) and not joined[512:].any()


def _theta_inside_rope_scaling(cfg: dict) -> None:
    cfg["rope_scaling"] = {"rope_type": "default", "rope_theta": 500000.0}
    del cfg["rope_theta"]


def _original_context_at_the_top_level(cfg: dict) -> None:
    cfg["original_max_position_embeddings"] = 16
    del cfg["rope_scaling"]["original_max_position_embeddings"]


@pytest.mark.parametrize(
    ("preset", "edit"),
    [
        # transformers 5 reads rope_scaling as rope_parameters, its theta included (kvdist
        # ran the default 10000 in its place).
        ("tiny", _theta_inside_rope_scaling),
        # ... and takes llama3's original context from the top level (kvdist took the
        # model's context).
        ("tiny", _original_context_at_the_top_level),
        ("tiny", lambda cfg: cfg.update(hidden_act="swish")),  # SiLU's other name
        ("tiny-qwen2", lambda cfg: cfg.update(mlp_bias=True)),  # which Qwen2 ignores
    ],
    ids=["theta-in-rope_scaling", "top-level-original-context", "swish", "qwen2-mlp_bias"],
)
def test_config_forms_are_read_as_transformers_reads_them(tmp_path, preset, edit):
    """Config keys kvdist read otherwise than transformers (wrong tokens, served without
    a warning), or refused though transformers runs them as kvdist does: greedy tokens of
    the engine and of transformers' generate agree."""
    import kvdist

    path = write_checkpoint(preset, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    cls = transformers.Qwen2ForCausalLM if preset == "tiny-qwen2" else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = [_generate(hf, p).tolist() for p in PROMPTS]
    llm = kvdist.LLM(str(path), dtype="float32")
    try:
        params = kvdist.SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)
        got = [o.output_token_ids for o in llm.generate(PROMPTS, params)]
    finally:
        llm.shutdown()
    assert got == want
