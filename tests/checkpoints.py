"""Checkpoints the tests derive from the presets."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from kvdist.engine.model import write_checkpoint


def tiny_with_kv_heads(path: Path, heads: int) -> Path:
    """The tiny preset as a checkpoint at `path`, cut down to its first `heads` KV heads
    (k/v rows and config): its 8 query heads then share fewer KV heads than the TP sizes
    tested, which replicates them."""
    write_checkpoint("tiny", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = heads
    (path / "config.json").write_text(json.dumps(cfg))
    rows = heads * cfg["head_dim"]
    tensors = load_file(path / "model.safetensors")
    for name in list(tensors):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name][:rows].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
