"""The reference engine's model: a tensor-parallel Llama-family decoder over a paged KV
cache, its HF checkpoint loader, tokenizers and seeded-random presets."""

from kvdist.engine.model.attention import AttentionMetadata, PagedAttention
from kvdist.engine.model.config import (
    SUPPORTED_ARCHITECTURES,
    Llama3RopeScaling,
    ModelConfig,
    parse_dtype,
)
from kvdist.engine.model.llama import LayerHooks, LlamaForCausalLM, hf_weight_shapes
from kvdist.engine.model.loader import checkpoint_fingerprint, load_model
from kvdist.engine.model.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedEmbedding,
    RowParallelLinear,
    TPInfo,
)
from kvdist.engine.model.presets import (
    PRESETS,
    Preset,
    build_preset,
    get_preset,
    preset_fingerprint,
    write_checkpoint,
)
from kvdist.engine.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "AttentionMetadata",
    "ByteTokenizer",
    "ColumnParallelLinear",
    "HFTokenizer",
    "LayerHooks",
    "Llama3RopeScaling",
    "LlamaForCausalLM",
    "MergedColumnParallelLinear",
    "ModelConfig",
    "PagedAttention",
    "ParallelLMHead",
    "Preset",
    "QKVParallelLinear",
    "ReplicatedEmbedding",
    "RowParallelLinear",
    "TPInfo",
    "Tokenizer",
    "build_preset",
    "checkpoint_fingerprint",
    "get_preset",
    "hf_weight_shapes",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "preset_fingerprint",
    "write_checkpoint",
]
