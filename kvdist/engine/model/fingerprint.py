"""The fingerprint of a checkpoint's weights: every byte of every weight file, hashed once.

A KV cache is namespaced by the model's fingerprint, so the fingerprint must change when
any weight does: a fine-tune that retrains a few rows of the embeddings gives other KV
for the same tokens, and a cache filled by the original must not serve it. So each weight
file is hashed whole: as SHA-256 of the SHA-256 digests of its 16 MiB chunks, computed on
parallel threads (hashlib and `os.pread` release the GIL), a few GB/s on a server.

The digest of a file is kept in a small cache (`$KVDIST_FINGERPRINT_CACHE`, else
`$XDG_CACHE_HOME/kvdist/fingerprints`, else `~/.cache/kvdist/fingerprints`; `off` keeps
none), keyed by the file's path, device, inode, size, modification and change times: any
write to the file changes its change time, which no tool can set back, so a cached digest
is reused only for the same unmodified file. Ranks of one host that load a model at once
take turns on a lock: one hashes, the others read its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK_BYTES = 16 * 2**20
_SCHEME = "kvdist-file"
"""Names the digest scheme, in every digest and cache key: a new scheme gets a new name."""
_THREADS = max(1, min(16, os.cpu_count() or 1))


def file_digest(path: Path, *, cache_dir: Path | None = None) -> str:
    """Hex SHA-256 of `path`'s chunk digests (see the module docstring), from the cache
    when this very file was hashed before."""
    st = os.stat(path)
    key = f"{_SCHEME}\0{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
    key += f"{st.st_mtime_ns}\0{st.st_ctime_ns}"
    where = fingerprint_cache_dir() if cache_dir is None else cache_dir
    if where is None:
        return _hash_file(path, st.st_size)
    entry = where / hashlib.sha256(key.encode()).hexdigest()
    try:
        where.mkdir(parents=True, exist_ok=True)
        lock = open(f"{entry}.lock", "a")  # noqa: SIM115 (held across the hashing below)
    except OSError:  # a read-only home: no cache
        return _hash_file(path, st.st_size)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank of this host may be hashing it
        except OSError:  # no locks here (ENOLCK on some NFS): hash without the cache
            return _hash_file(path, st.st_size)
        cached = _read_entry(entry)
        if cached is not None:
            return cached
        digest = _hash_file(path, st.st_size)
        try:
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, entry)
        except OSError:
            pass
        return digest


def fingerprint_cache_dir() -> Path | None:
    """Where file digests are kept (see the module docstring); None when switched off."""
    env = os.environ.get("KVDIST_FINGERPRINT_CACHE", "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvdist" / "fingerprints"


def _read_entry(entry: Path) -> str | None:
    try:
        text = entry.read_text().strip()
    except OSError:
        return None
    # A torn or foreign file is not a digest: hash again.
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _hash_file(path: Path, size: int) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:

        def chunk(i: int) -> bytes:
            data = os.pread(fd, min(CHUNK_BYTES, size - i * CHUNK_BYTES), i * CHUNK_BYTES)
            return hashlib.sha256(data).digest()

        n = -(-size // CHUNK_BYTES)
        if n <= 1:
            digests = [chunk(0)] if n else []
        else:
            with ThreadPoolExecutor(min(_THREADS, n)) as pool:
                digests = list(pool.map(chunk, range(n)))
    finally:
        os.close(fd)
    h = hashlib.sha256(f"{_SCHEME}/{CHUNK_BYTES}/{size}\0".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()
