"""Chained, seeded, namespaced block hashes.

The hash of block i covers every token of blocks 0..i (it folds in the hash of block i-1),
so equal hashes mean equal prefixes. The chain starts from a root derived from a seed and a
namespace (model fingerprint, dtype, block size, layout version) and the request's cache
salt, so caches of different models or layouts never alias and salted requests never share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvdist.api.types import positive_int

HASH_BYTES = 16
_INT64_MAX = np.iinfo(np.int64).max
LAYOUT_VERSION = 1
DEFAULT_SEED = b"kvdist-block-hash-v1"


def make_namespace(model_fingerprint: str, dtype: str, block_size: int) -> str:
    """The namespace string for a model, KV dtype and block size under this layout."""
    return f"{model_fingerprint}|{dtype}|bs{block_size}|layout{LAYOUT_VERSION}"


def root_hash(namespace: str, cache_salt: str | None = None, seed: bytes = DEFAULT_SEED) -> bytes:
    h = hashlib.blake2b(seed, digest_size=HASH_BYTES)
    h.update(namespace.encode())
    h.update(b"\x00salt\x00")
    if cache_salt is not None:
        # A marker byte first: the empty salt is a salt, not the absence of one (the
        # unsalted root is unchanged, so caches written without salts stay valid).
        h.update(b"\x01" + cache_salt.encode())
    return h.digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def extend_from_root(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    root: bytes,
) -> list[bytes]:
    """Append the hashes of the full blocks of `token_ids` not yet in `hashes` (in place),
    the chain starting from `root` (`root_hash`). Unchecked: the engine's own use."""
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


def block_hashes(
    token_ids: Sequence[int], block_size: int, namespace: str, cache_salt: str | None = None
) -> list[bytes]:
    """Hashes of every full block of `token_ids` (a `Request`'s `block_hashes`): chained,
    so a block's hash names its whole prefix. `namespace` must be the connector context's
    `model_namespace` (the same on every engine that is to share blocks), and requests
    share blocks only under the same `cache_salt`.

    Raises TypeError for tokens that are not integers (a float would hash as the integer
    it truncates to), a namespace or salt that is not a str; ValueError for a block size
    below 1 or a negative token id."""
    return extend_block_hashes([], token_ids, block_size, namespace, cache_salt)


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    namespace: str,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Append to `hashes` (in place, and returned) the hashes of the full blocks of
    `token_ids` it does not hold yet: a request's `block_hashes` kept up to date as its
    tokens fill blocks, at the cost of the new blocks only. `hashes` must be this chain's
    own (from `block_hashes` or this function, with the same arguments); the tokens of
    the blocks it holds are not read again. Checks as `block_hashes` does, on the new
    tokens."""
    block_size = positive_int(block_size, "block_size")
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {namespace!r}")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise TypeError(f"cache_salt must be a str or None, got {cache_salt!r}")
    if not isinstance(hashes, list):
        raise TypeError(f"hashes must be a list of block hashes, got {type(hashes).__name__}")
    new = token_ids[len(hashes) * block_size :]
    if len(new):
        try:
            ids = np.asarray(new)
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"token ids must be int64 integers ({exc})") from None
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise TypeError(
                f"token ids must be a flat sequence of integers, got {ids.dtype} of shape "
                f"{list(ids.shape)}"
            )
        if ids.min() < 0:
            raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
        if ids.max() > _INT64_MAX:  # an unsigned array would wrap when hashed as int64
            raise ValueError(f"token ids must fit in int64, got {int(ids.max())}")
    root = b"" if hashes else root_hash(namespace, cache_salt)
    return extend_from_root(hashes, token_ids, block_size, root)
