"""`ModelConfig`: the shape of a Llama-family model, read from and written to HF config.json.

Supported architectures: Llama (incl. Llama-3 rope scaling), Mistral without a sliding
window, Qwen2 (bias on q/k/v), Qwen3 (RMSNorm of each query and key head before RoPE).
Anything else is refused by name rather than loaded wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPE_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


@dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Llama-3 (3.1) rope scaling: long wavelengths are stretched by `factor`."""

    factor: float
    """Stretch applied to frequencies whose wavelength exceeds the low-frequency bound."""
    low_freq_factor: float
    """`original_max_position_embeddings / low_freq_factor` is the low-frequency wavelength."""
    high_freq_factor: float
    """`original_max_position_embeddings / high_freq_factor` is the high-frequency wavelength."""
    original_max_position_embeddings: int
    """Context length the model was pretrained with."""

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must be greater than "
                f"low_freq_factor ({self.low_freq_factor})"
            )
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling: factor must be >= 1, got {self.factor}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the reference engine needs to build and shard a Llama-family model."""

    architecture: str
    """HF architecture name, one of `SUPPORTED_ARCHITECTURES`."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP (gate and up projections each)."""
    num_layers: int
    """Decoder layers (`num_hidden_layers` in HF)."""
    num_heads: int
    """Query heads (`num_attention_heads` in HF)."""
    num_kv_heads: int
    """Key/value heads (`num_key_value_heads` in HF); divides `num_heads` (GQA)."""
    head_dim: int
    """Size of one attention head."""
    max_position_embeddings: int
    """Longest sequence the rotary table covers."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary base wavelength."""
    rope_scaling: Llama3RopeScaling | None = None
    """Llama-3 rope scaling, or None for plain RoPE. A dict with the same keys is accepted."""
    tie_word_embeddings: bool = False
    """The LM head reuses the embedding matrix (no `lm_head.weight` in the checkpoint)."""
    attention_bias: bool = False
    """Bias on q/k/v (Qwen2: q/k/v only; Llama: q/k/v and o)."""
    torch_dtype: str = "bfloat16"
    """Dtype the checkpoint stores (HF `torch_dtype`), e.g. "bfloat16" or "float32"."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if the model has one."""
    eos_token_id: int | tuple[int, ...] | None = None
    """End-of-sequence token(s); a list in config.json becomes a tuple here."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Unrecognised config.json keys, kept only so `to_hf_dict` can write them back."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported(self.architecture))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _parse_rope_scaling(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        name = self.torch_dtype.removeprefix("torch.")
        if name not in _DTYPES and name not in _STORED_ONLY:
            raise ValueError(
                f"torch_dtype {self.torch_dtype!r} is not supported: checkpoints stored in "
                f"{', '.join(sorted({*_DTYPES, *_STORED_ONLY}))} load"
            )

    @property
    def dtype(self) -> torch.dtype:
        """`torch_dtype` as a torch dtype (the default dtype to run the model in)."""
        if self.torch_dtype.removeprefix("torch.") in _STORED_ONLY:
            raise ValueError(
                f"the checkpoint stores {self.torch_dtype} (torch_dtype), which kvdist does "
                "not run in: ask for a dtype (float32, bfloat16 or float16) and its weights "
                "are converted on loading"
            )
        return parse_dtype(self.torch_dtype)

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def qk_norm(self) -> bool:
        """Each query and key head is RMS-normalised before RoPE (Qwen3)."""
        return self.architecture == "Qwen3ForCausalLM"

    @property
    def o_proj_bias(self) -> bool:
        # Qwen2 puts bias on q/k/v only; Llama's `attention_bias` covers o_proj too.
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse an HF config.json dict as transformers reads it (its per-architecture
        defaults included); raises ValueError, naming the config.json key, for anything
        malformed or not supported."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got a {type(d).__name__}")
        arch = _architecture(d)
        for key in _REQUIRED_KEYS:
            if key not in d:
                raise ValueError(f"config.json has no {key!r}, which {arch} requires")
            _positive_int(d, key)
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # one function, two names
            raise ValueError(
                f"hidden_act {d['hidden_act']!r} is not supported (only 'silu', also named 'swish')"
            )
        if arch == "LlamaForCausalLM" and d.get("mlp_bias", False):  # the others ignore it
            raise ValueError("mlp_bias=true is not supported (no Llama-family release uses it)")
        max_pos = d["max_position_embeddings"]
        _check_sliding_window(arch, d, max_pos)
        theta, scaling = _parse_rope(d)
        num_heads = d["num_attention_heads"]
        known = set(_REQUIRED_KEYS) | _CONSUMED_KEYS
        defaults = _ARCH_DEFAULTS.get(arch, {})
        # Absent: the architecture's default, as transformers has it; null: derived.
        kv_heads = d.get("num_key_value_heads", defaults.get("num_key_value_heads"))
        head_dim = d.get("head_dim", defaults.get("head_dim"))
        for key, value in (("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
            if value is not None:
                _positive_int({key: value}, key)
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=kv_heads or num_heads,
            head_dim=head_dim or d["hidden_size"] // num_heads,
            max_position_embeddings=max_pos,
            rms_norm_eps=_positive_float(d, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; transformers' Mistral has no attention bias at
            # all (it ignores the key); Llama and Qwen3 follow `attention_bias`.
            attention_bias=arch == "Qwen2ForCausalLM"
            or (arch != "MistralForCausalLM" and bool(d.get("attention_bias", False))),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            bos_token_id=_token_ids(d, "bos_token_id", single=True),
            eos_token_id=_token_ids(d, "eos_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content. Rope settings use the `rope_theta` + `rope_scaling` form
        that real Llama-3 checkpoints carry and transformers 4.x and 5.x both read."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None
            if self.rope_scaling is None
            else {"rope_type": "llama3", **asdict(self.rope_scaling)},
            tie_word_embeddings=self.tie_word_embeddings,
            torch_dtype=self.torch_dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
        )
        if self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            d.update(use_sliding_window=False, sliding_window=None)
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.attention_bias
        if self.architecture == "MistralForCausalLM":
            d["sliding_window"] = None
        return d

    def fingerprint(self) -> str:
        """16 hex digits identifying the model shape; equal configs give equal strings.

        Hashes the canonical JSON of every typed field (token ids included: they change
        what a request's tokens mean); the weights are fingerprinted by the loader.
        """
        # `extra` holds incidental keys (initializer_range, transformers_version, ...);
        # re-saving a checkpoint with another library version must not change the namespace.
        d = replace(self, extra={}).to_hf_dict()
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_CONSUMED_KEYS = {
    "architectures",
    "model_type",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "layer_types",
    "mlp_bias",
}


# What transformers' config classes default to when config.json lacks the key.
_ARCH_DEFAULTS: dict[str, dict[str, int]] = {
    "MistralForCausalLM": {"num_key_value_heads": 8},
    "Qwen2ForCausalLM": {"num_key_value_heads": 32},
    "Qwen3ForCausalLM": {"num_key_value_heads": 32, "head_dim": 128},
}
_QWEN_MAX_WINDOW_LAYERS = 28
_DEFAULT_WINDOW = 4096


def _positive_int(d: dict[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"key {key!r} must be a positive integer, got {value!r}")
    return value


def _positive_float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"key {key!r} must be a positive number, got {value!r}")
    return float(value)


def _token_ids(d: dict[str, Any], key: str, *, single: bool = False) -> Any:
    """`d[key]`: None, a token id, or (unless `single`) a list of them, as a tuple."""
    value = d.get(key)
    if value is None or _is_token_id(value):
        return value
    if not single and isinstance(value, list) and all(map(_is_token_id, value)):
        return tuple(value)
    kind = "a token id" if single else "a token id or a list of them"
    raise ValueError(f"key {key!r} must be {kind}, got {value!r}")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_STORED_ONLY = ("float64", "double")
"""Dtypes a checkpoint may store that the model does not run in: its weights load
converted to the dtype asked for (float8 and integer checkpoints hold quantised weights
that need scales, and are refused)."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype the model runs in, from a torch dtype or its name ("bfloat16",
    "torch.float32", "bf16", ...); others (integers, float8, float64) are refused."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            supported = ", ".join(sorted({str(t) for t in _DTYPES.values()}))
            raise ValueError(f"dtype {dtype} is not supported; use one of {supported}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _unsupported(arch: object) -> str:
    return (
        f"architecture {arch!r} is not supported; supported: "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
    )


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures")
    model_type = d.get("model_type")
    if archs:
        arch = archs[0] if isinstance(archs, list) else archs
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported(arch))
        if model_type is not None and _MODEL_TYPE_TO_ARCH.get(model_type) != arch:
            # transformers builds the model from model_type: another model than `arch`
            # (dropping, say, Qwen3's q/k norms with no more than a warning).
            raise ValueError(
                f"config.json's model_type {model_type!r} and architectures {archs!r} name "
                "different models (transformers builds the model_type's); make them agree"
            )
        return str(arch)
    if model_type is None:
        raise ValueError("config.json has neither 'architectures' nor 'model_type'")
    if model_type not in _MODEL_TYPE_TO_ARCH:
        raise ValueError(_unsupported(model_type))
    return _MODEL_TYPE_TO_ARCH[model_type]


def _check_sliding_window(arch: str, d: dict[str, Any], max_pos: int) -> None:
    if arch == "LlamaForCausalLM":
        return
    # Absent, transformers' Mistral and Qwen configs take a 4096-token window; null: none.
    window = d.get("sliding_window", _DEFAULT_WINDOW)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # Qwen2/3 have a window only with use_sliding_window set, and slide only on the
        # layers `layer_types` names (transformers 5), else from `max_window_layers` on.
        if not d.get("use_sliding_window"):
            return
        layer_types = d.get("layer_types")
        if isinstance(layer_types, list):
            sliding = any(t != "full_attention" for t in layer_types)
        else:
            first = d.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS)
            sliding = first < d["num_hidden_layers"]
        if not sliding:
            return
    if window is None or window >= max_pos:
        return
    raise ValueError(
        f"{arch} with sliding_window={window} < max_position_embeddings={max_pos} is not "
        "supported: the reference engine only does full attention"
    )


def _parse_rope(d: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside) and reads a `rope_scaling` in
    # its place, first; 4.x writes `rope_theta` and `rope_scaling` side by side. Accept
    # any of these; a value given in more than one place must be the same everywhere,
    # since which one wins depends on the transformers version.
    forms: dict[str, dict[str, Any]] = {}
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key)
        if params is None or params == {}:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"key {key!r} must be an object, got {params!r}")
        forms[key] = params
    top = d.get("rope_theta")
    thetas = {"rope_theta": _rope_theta(top, "rope_theta")} if top is not None else {}
    for key, params in forms.items():
        if params.get("rope_theta") is not None:
            thetas[f"{key}.rope_theta"] = _rope_theta(params["rope_theta"], f"{key}.rope_theta")
        elif top is None and len(forms) > 1:  # this form alone would run the default
            thetas[f"{key} (none: the default)"] = _DEFAULT_ROPE_THETA
    orig = d.get("original_max_position_embeddings")
    scalings = {}
    for key, params in forms.items():
        inner = params.get("original_max_position_embeddings")
        if orig is not None and inner is not None and inner != orig:
            raise ValueError(
                f"config.json gives original_max_position_embeddings {orig} at the top level "
                f"and {inner} in {key} (transformers 5 takes the first, 4.x the second); keep "
                "the one the checkpoint was trained with"
            )
        # As transformers 5 does: a missing original context is the top level's, else the
        # model's.
        default = orig if orig is not None else d["max_position_embeddings"]
        scalings[key] = _parse_rope_scaling({"original_max_position_embeddings": default, **params})
    for what, found in (("rope theta", thetas), ("rope scaling", scalings)):
        if len(set(found.values())) > 1:
            raise ValueError(
                f"config.json gives two different {what}s: "
                + ", ".join(f"{k} {v or 'none'}" for k, v in found.items())
                + "; keep the one the checkpoint was trained with"
            )
    theta = next(iter(thetas.values()), _DEFAULT_ROPE_THETA)
    return theta, next(iter(scalings.values()), None)


_DEFAULT_ROPE_THETA = 10000.0


def _rope_theta(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"key {where!r} must be a positive number, got {value!r}")
    return float(value)


def _parse_rope_scaling(params: dict[str, Any]) -> Llama3RopeScaling | None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: 'default', 'llama3'"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in keys:
        if key not in params:
            raise ValueError(f"llama3 rope scaling needs {key!r}; got {sorted(params)}")
    return Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
