"""Tokenizers: a checkpoint's `tokenizer.json` (via the `tokenizers` library), or a
built-in byte-level one for the seeded-random presets, whose vocabularies mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

BYTE_BOS = 256
BYTE_EOS = 257
BYTE_PAD = 258
BYTE_VOCAB_MIN = 259


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256/257/258 are BOS/EOS/PAD. Needs vocab >= 259.

    `encode` adds no BOS; `decode` drops ids that are not bytes (specials, and the ids
    above 258 a random-weight model may well produce) and replaces invalid UTF-8.
    """

    bos_token_id: int | None = BYTE_BOS
    eos_token_id: int | None = BYTE_EOS
    eos_token_ids: tuple[int, ...] = (BYTE_EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json`, loaded with the `tokenizers` library (no transformers needed)."""

    def __init__(
        self, path: str | Path, *, bos_token_id: int | None, eos_token_ids: tuple[int, ...]
    ) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            self._tok = _RustTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a bad file
            raise ValueError(f"{path}: not a usable tokenizer.json ({exc})") from None
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None

    def encode(self, text: str) -> list[int]:
        # Special tokens (e.g. Llama-3's BOS) come from the tokenizer's own post-processor.
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(
    directory: Path, *, vocab_size: int, bos_token_id: int | None, eos_token_ids: tuple[int, ...]
) -> Tokenizer | None:
    """The checkpoint's tokenizer; the byte tokenizer for a checkpoint written from a
    preset (no tokenizer.json, byte-tokenizer special ids); None otherwise, so that a
    real model without a tokenizer is never fed byte ids it was not trained on."""
    eos = generation_eos(directory) or eos_token_ids
    path = directory / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path, bos_token_id=bos_token_id, eos_token_ids=eos)
    if vocab_size >= BYTE_VOCAB_MIN and bos_token_id == BYTE_BOS and eos == (BYTE_EOS,):
        return ByteTokenizer()
    return None


def generation_eos(directory: Path) -> tuple[int, ...]:
    """The stop ids of the checkpoint's generation_config.json (empty if none): instruct
    checkpoints list extra ones there only (Llama 3's <|eot_id|>)."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        eos = json.loads(path.read_bytes()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:  # not JSON, or not an object
        raise ValueError(f"{path}: cannot read it as a JSON object ({exc})") from None
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(
            f"{path}: 'eos_token_id' must be a token id or a list of them, got {eos!r}"
        )
    return tuple(ids)
