"""Built-in models with seeded random weights: "tiny", "tiny-qwen2" and "tiny-qwen3" for
CPU tests, "llama3-8b" (Llama-3-8B shapes) for GPU benchmarks.

Every tensor is drawn from its own generator, seeded by hash(seed, HF tensor name), as the
*full* tensor, and then sharded through the same `weight_loader`s as a checkpoint. So
the weights do not depend on the tensor-parallel size, and `write_checkpoint` writes
exactly the weights `build_preset` builds.

Scales keep activations O(1) at any size, so greedy outputs are not degenerate: linear
weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights 1 + N(0, 0.1) and biases
N(0, 0.1) (not exactly 1 and 0, so that a mis-routed norm or bias shows in parity tests).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvdist.engine.model.config import Llama3RopeScaling, ModelConfig, parse_dtype
from kvdist.engine.model.llama import LlamaForCausalLM, hf_weight_shapes
from kvdist.engine.model.parallel import TPInfo
from kvdist.engine.model.tokenizer import BYTE_BOS, BYTE_EOS


@dataclass(frozen=True, kw_only=True)
class Preset:
    config: ModelConfig
    """The model's shape."""
    init_on_device: bool = False
    """Draw the weights on the target device rather than the CPU. Drawing the 8B preset
    on the CPU takes minutes per rank; on a GPU it takes about a second. CUDA and CPU
    generators give different numbers, so such a preset's weights (and fingerprint)
    depend on the device type, never on the device index or the TP size."""


_TINY = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    # Wavelengths here span 6..20000 positions, so with a 256-token original context all
    # three llama3 bands (kept, smoothed, stretched) are exercised.
    rope_scaling=Llama3RopeScaling(
        factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
    ),
    torch_dtype="float32",
    bos_token_id=BYTE_BOS,
    eos_token_id=BYTE_EOS,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(config=_TINY),
    # Qwen2 flavour: q/k/v bias, plain RoPE with Qwen2's large base.
    "tiny-qwen2": Preset(
        config=replace(
            _TINY,
            architecture="Qwen2ForCausalLM",
            attention_bias=True,
            rope_scaling=None,
            rope_theta=1000000.0,
        )
    ),
    # Qwen3 flavour: q/k norms, plain RoPE, and a head_dim (32) that is not
    # hidden_size / num_heads (16), as in Qwen3's small models.
    "tiny-qwen3": Preset(
        config=replace(
            _TINY,
            architecture="Qwen3ForCausalLM",
            head_dim=32,
            rope_scaling=None,
            rope_theta=1000000.0,
        )
    ),
    "llama3-8b": Preset(
        config=ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=Llama3RopeScaling(
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            torch_dtype="bfloat16",
            bos_token_id=BYTE_BOS,
            eos_token_id=BYTE_EOS,
        ),
        init_on_device=True,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _init_device(preset: Preset, device) -> torch.device:
    return torch.device(device) if preset.init_on_device else torch.device("cpu")


def preset_fingerprint(name: str, *, seed: int = 0, device="cpu") -> str:
    """16 hex digits naming a preset's weights: config, seed and generator device type."""
    preset = get_preset(name)
    init = _init_device(preset, device).type
    blob = f"{preset.config.fingerprint()}/preset={name}/seed={seed}/init={init}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def preset_tensor(name: str, shape: tuple[int, ...], *, seed: int, device) -> torch.Tensor:
    """The full float32 tensor `name` of any preset with this shape and seed."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    x = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    if name.endswith("norm.weight"):
        return x.mul_(0.1).add_(1.0)
    if name.endswith(".bias"):
        return x.mul_(0.1)
    if name == "model.embed_tokens.weight":
        return x
    return x.mul_(shape[1] ** -0.5)


def build_preset(
    name: str, *, tp: TPInfo, dtype: torch.dtype | str | None = None, device="cpu", seed: int = 0
) -> LlamaForCausalLM:
    """This rank's shard of preset `name`, weights drawn from `seed` (TP-size invariant)."""
    preset = get_preset(name)
    config = preset.config
    model = LlamaForCausalLM(
        config, tp, dtype=parse_dtype(dtype) if dtype else config.dtype, device=device
    )
    init = _init_device(preset, device)
    for tensor_name, shape in hf_weight_shapes(config).items():
        model.load_hf_tensor(tensor_name, preset_tensor(tensor_name, shape, seed=seed, device=init))
    return model


def write_checkpoint(
    name: str,
    path: str | Path,
    *,
    seed: int = 0,
    shard_size_bytes: int | None = None,
    device="cpu",
) -> Path:
    """Write preset `name` as an HF checkpoint directory that transformers can load.

    With `shard_size_bytes`, tensors are packed in order into `model-0000i-of-0000n`
    files of at most that size (a bigger tensor gets a file of its own) plus
    `model.safetensors.index.json`. `device` is where the weights are drawn for a preset
    with `init_on_device` ("cuda" to match what `build_preset` builds on a GPU).
    """
    from safetensors.torch import save_file

    preset = get_preset(name)
    config = preset.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    shapes = hf_weight_shapes(config)
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for tensor_name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shard_size_bytes and groups[-1] and group_bytes + nbytes > shard_size_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(tensor_name)
        group_bytes += nbytes

    init = _init_device(preset, device)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file = (
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            if shard_size_bytes
            else "model.safetensors"
        )
        tensors = {
            n: preset_tensor(n, shapes[n], seed=seed, device=init).to("cpu", config.dtype)
            for n in group
        }
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    if shard_size_bytes:
        total = sum(itemsize * int(torch.Size(s).numel()) for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
