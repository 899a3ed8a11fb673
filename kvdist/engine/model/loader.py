"""`load_model`: an HF checkpoint directory or a preset name -> this rank's model shard.

Only safetensors are read (never pickled `.bin`/`.pt` files). Every rank opens the files
itself and reads just its slices; shapes are checked against config.json from the file
headers before any tensor data is read.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvdist.engine.model.config import ModelConfig, parse_dtype
from kvdist.engine.model.fingerprint import file_digest
from kvdist.engine.model.llama import LlamaForCausalLM, hf_weight_shapes
from kvdist.engine.model.parallel import TPInfo
from kvdist.engine.model.presets import PRESETS, build_preset, preset_fingerprint
from kvdist.engine.model.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    generation_eos,
    load_tokenizer,
)

_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20
# Buffers some exporters store; they are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    source: str | Path,
    *,
    tp: TPInfo,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[LlamaForCausalLM, ModelConfig, Tokenizer | None, str]:
    """Build this rank's shard of `source` and return (model, config, tokenizer, fingerprint).

    `source`: an HF-format directory (config.json + model.safetensors, or shards listed in
    model.safetensors.index.json) or a preset name (`PRESETS`, seed 0). `dtype` defaults
    to the checkpoint's `torch_dtype`. The fingerprint (16 hex digits) namespaces KV
    caches: for a directory it hashes the config and each weight file's name and whole
    contents, so it changes when any weight does (a file's digest is computed once and
    cached: `kvdist.engine.model.fingerprint`).
    """
    path = Path(source)
    if isinstance(source, str) and source in PRESETS and not path.exists():
        model = build_preset(source, tp=tp, dtype=dtype, device=device)
        fingerprint = preset_fingerprint(source, seed=0, device=device)
        return model, PRESETS[source].config, ByteTokenizer(), fingerprint
    if not path.is_dir():
        raise ValueError(
            f"model {str(source)!r} is neither a checkpoint directory nor a preset "
            f"(presets: {', '.join(PRESETS)})"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{path} has no config.json; expected a Hugging Face-format checkpoint directory"
        )
    try:
        config = ModelConfig.from_hf_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_path}: {exc}") from None
    headers = _read_headers(path)
    locations = _check_tensors(config, headers)
    _check_tied_head(config, path, headers)
    model = LlamaForCausalLM(
        config, tp, dtype=parse_dtype(dtype) if dtype else config.dtype, device=device
    )
    _load_tensors(model, path, locations)
    tokenizer = load_tokenizer(
        path,
        vocab_size=config.vocab_size,
        bos_token_id=config.bos_token_id,
        eos_token_ids=config.eos_token_ids,
    )
    fingerprint = checkpoint_fingerprint(config, path, headers)  # of the files as they are
    extra_stops = [t for t in generation_eos(path) if t not in config.eos_token_ids]
    if extra_stops:  # generation stops at them too
        config = replace(config, eos_token_id=(*config.eos_token_ids, *extra_stops))
    return model, config, tokenizer, fingerprint


def _weight_files(directory: Path) -> list[str]:
    index = directory / _INDEX
    if index.is_file() and (directory / "model.safetensors").is_file():
        # transformers loads the single file, older tools the index: which one is left over
        # from an earlier save cannot be told from here.
        raise ValueError(
            f"{directory} holds both model.safetensors and {_INDEX}: one is left over from "
            "another save; remove it"
        )
    if index.is_file():
        weight_map = _json_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (directory / name).is_file():
                raise ValueError(f"{index} lists {name}, which is not in {directory}")
        return files
    if (directory / "model.safetensors").is_file():
        return ["model.safetensors"]
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory} has no *.safetensors weights (pickled .bin/.pt checkpoints are "
            "not loaded; convert them to safetensors)"
        )
    return files


def _json_file(path: Path) -> dict[str, Any]:
    """A JSON object read from `path`; a ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise ValueError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


# The dtypes a weight may be stored in (safetensors' names).
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _read_header(file: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw JSON header of a safetensors file and its parsed tensor entries, after
    checking the file holds every byte the header promises (a truncated download fails
    here, naming the file, rather than deep in the safetensors reader)."""
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER:
            raise ValueError(f"{file} is not a safetensors file (header of {size} bytes)")
        raw = f.read(size)
    if len(raw) < size:
        raise ValueError(f"{file} is truncated: its header needs {size} bytes, it has {len(raw)}")
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{file} is not a safetensors file (header: {exc})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{file} is not a safetensors file (header is not a JSON object)")
    entries.pop("__metadata__", None)
    data_size = file.stat().st_size - 8 - size
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and isinstance(entry.get("shape"), list)
        ):
            raise ValueError(f"{file}: the header entry of tensor {name!r} is malformed")
        if offsets[1] > data_size:
            raise ValueError(
                f"{file} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data, "
                f"which holds {data_size} (download it again)"
            )
    return raw, entries


def _read_headers(directory: Path) -> dict[str, tuple[bytes, dict[str, Any]]]:
    return {name: _read_header(directory / name) for name in _weight_files(directory)}


def _check_tensors(
    config: ModelConfig, headers: dict[str, tuple[bytes, dict[str, Any]]]
) -> dict[str, str]:
    """tensor name -> file, after checking every expected tensor is there with its shape."""
    where = {name: file for file, (_, entries) in headers.items() for name in entries}
    expected = hf_weight_shapes(config)
    for name, shape in expected.items():
        if name not in where:
            hint = (
                " (or set tie_word_embeddings=true if the head shares the embedding)"
                if name == "lm_head.weight"
                else ""
            )
            raise ValueError(f"checkpoint is missing tensor {name!r}{hint}")
        entry = headers[where[name]][1][name]
        actual = tuple(entry["shape"])
        if actual != shape:
            raise ValueError(
                f"tensor {name!r} in {where[name]} has shape {list(actual)}, but config.json "
                f"implies {list(shape)}"
            )
        if entry.get("dtype") not in _FLOAT_DTYPES:
            raise ValueError(
                f"tensor {name!r} in {where[name]} is stored as {entry.get('dtype')}; "
                f"weights must be one of {sorted(_FLOAT_DTYPES)}"
            )
    unexpected = [
        n
        for n in where
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if unexpected:
        warnings.warn(
            f"ignoring {len(unexpected)} checkpoint tensors the model has no place for, "
            f"e.g. {unexpected[:5]}",
            stacklevel=3,
        )
    return {name: where[name] for name in expected}


def _check_tied_head(
    config: ModelConfig, directory: Path, headers: dict[str, tuple[bytes, dict[str, Any]]]
) -> None:
    """A config with tied embeddings whose checkpoint stores an `lm_head.weight` as well
    (some exporters write both) loads only if the two tensors hold the same bytes:
    otherwise transformers 4 would use the embedding and transformers 5 the stored head,
    and kvdist refuses to pick one silently."""
    if not config.tie_word_embeddings:
        return
    spans = []
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        file = next((f for f, (_, entries) in headers.items() if name in entries), None)
        if file is None:
            return
        raw, entries = headers[file]
        begin, end = entries[name]["data_offsets"]
        spans.append((directory / file, 8 + len(raw) + begin, end - begin, entries[name]))
    (file_a, at_a, size_a, entry_a), (file_b, at_b, size_b, entry_b) = spans
    same_layout = (entry_a["dtype"], entry_a["shape"], size_a) == (
        entry_b["dtype"],
        entry_b["shape"],
        size_b,
    )
    if same_layout and _same_bytes(file_a, at_a, file_b, at_b, size_a):
        return
    raise ValueError(
        "config.json sets tie_word_embeddings=true, but the checkpoint also stores an "
        "lm_head.weight that differs from model.embed_tokens.weight: set "
        "tie_word_embeddings to false to use the stored head, or remove the tensor to use "
        "the embedding"
    )


def _same_bytes(file_a: Path, at_a: int, file_b: Path, at_b: int, size: int) -> bool:
    if (file_a, at_a) == (file_b, at_b):
        return True
    chunk = 16 * 2**20
    with file_a.open("rb") as fa, file_b.open("rb") as fb:
        fa.seek(at_a)
        fb.seek(at_b)
        for at in range(0, size, chunk):
            n = min(chunk, size - at)
            if fa.read(n) != fb.read(n):
                return False
    return True


def _load_tensors(model: LlamaForCausalLM, directory: Path, locations: dict[str, str]) -> None:
    from safetensors import SafetensorError, safe_open

    by_file: dict[str, list[str]] = {}
    for tensor, file in locations.items():
        by_file.setdefault(file, []).append(tensor)
    for file, names in by_file.items():
        name = None
        try:
            with safe_open(str(directory / file), framework="pt", device="cpu") as f:
                for name in names:
                    # A lazy slice: the weight_loader indexes it, reading only this rank's part.
                    model.load_hf_tensor(name, f.get_slice(name))
        except (SafetensorError, OSError) as exc:
            # The file could not be read (its header was checked): name it. Anything else
            # (a device out of memory, a bug) keeps its own type and traceback.
            what = f"tensor {name!r}" if name else "the file"
            raise ValueError(
                f"{directory / file}: cannot read {what} ({type(exc).__name__}: {exc})"
            ) from exc


def checkpoint_fingerprint(
    config: ModelConfig, directory: Path, headers: dict[str, tuple[bytes, dict[str, Any]]]
) -> str:
    """16 hex digits from the config and every byte of the weight files (see `load_model`
    and `kvdist.engine.model.fingerprint`)."""
    h = hashlib.sha256(config.fingerprint().encode())
    for file in sorted(headers):
        h.update(f"\0{file}\0{file_digest(directory / file)}".encode())
    return h.hexdigest()[:16]
