"""The model fingerprint that namespaces KV caches: every weight byte counts, and a file's
digest is computed once."""

from __future__ import annotations

import hashlib
import os

import pytest
from safetensors.torch import load_file, save_file

from kvdist.engine.model import fingerprint, load_model, write_checkpoint
from kvdist.engine.model.parallel import TPInfo

TP1 = TPInfo(rank=0, size=1, group=None)


def _fp(path) -> str:
    return load_model(path, tp=TP1)[3]


def test_a_weight_changed_anywhere_changes_the_fingerprint(tmp_path) -> None:
    """A fine-tune that retrains a few embedding rows (past the start of the tensor), or
    the last value of one projection, is another model: its KV differs for the same
    tokens. A failure means a cache filled by one model serves the other as hits."""
    base = write_checkpoint("tiny", tmp_path / "base")
    seen = {_fp(base)}
    for name, index in [("model.embed_tokens.weight", (300, 5)),
                        ("model.layers.1.self_attn.k_proj.weight", (-1, -1))]:  # fmt: skip
        variant = write_checkpoint("tiny", tmp_path / name)
        tensors = load_file(variant / "model.safetensors")
        tensors[name][index] += 1.0
        save_file(tensors, variant / "model.safetensors", metadata={"format": "pt"})
        seen.add(_fp(variant))
    assert len(seen) == 3, seen
    assert _fp(base) in seen  # and the same files give the same fingerprint again


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch) -> None:
    """The digest of an unchanged file comes from the cache; a file rewritten in place
    with the same size and its old modification time is hashed again (its change time
    moved), and a torn cache entry is not taken for a digest. A failure means every load
    re-reads the weights, or a stale digest names new weights."""
    calls = []
    real = fingerprint._hash_file
    monkeypatch.setattr(fingerprint, "_hash_file", lambda p, n: calls.append(p) or real(p, n))
    cache = tmp_path / "cache"
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = fingerprint.file_digest(f, cache_dir=cache)
    assert fingerprint.file_digest(f, cache_dir=cache) == first and len(calls) == 1
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = fingerprint.file_digest(f, cache_dir=cache)
    assert second != first and len(calls) == 2
    for entry in cache.iterdir():
        if not entry.name.endswith(".lock"):
            entry.write_text("torn")
    assert fingerprint.file_digest(f, cache_dir=cache) == second and len(calls) == 3


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 4096 + 7])
def test_chunked_digest_is_the_documented_one(tmp_path, monkeypatch, size) -> None:
    """Chunks hashed on threads, in any order, give SHA-256 over the chunks' digests in
    file order (small chunks here, so a file has several). A failure means ranks, or
    hosts with another thread count, could disagree on a model's fingerprint."""
    monkeypatch.setattr(fingerprint, "CHUNK_BYTES", 4096)
    data = os.urandom(size)
    (tmp_path / "w").write_bytes(data)
    want = hashlib.sha256(f"kvdist-file/4096/{size}\0".encode())
    for i in range(0, size, 4096):
        want.update(hashlib.sha256(data[i : i + 4096]).digest())
    monkeypatch.setenv("KVDIST_FINGERPRINT_CACHE", "off")
    assert fingerprint.fingerprint_cache_dir() is None
    assert fingerprint.file_digest(tmp_path / "w") == want.hexdigest()


def test_a_filesystem_without_locks_hashes_without_the_cache(tmp_path, monkeypatch) -> None:
    """flock failing (ENOLCK on an NFS home) must not fail the model's load: the file is
    hashed as it would be with the cache. A failure means one node's rank raises while
    loading, and the others wait for it until their deadline."""
    import errno

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    (tmp_path / "w").write_bytes(b"x" * 100)
    want = fingerprint.file_digest(tmp_path / "w", cache_dir=tmp_path / "a")
    monkeypatch.setattr(fingerprint.fcntl, "flock", no_locks)
    assert fingerprint.file_digest(tmp_path / "w", cache_dir=tmp_path / "b") == want


def test_a_retrained_checkpoint_gets_no_hits_from_the_original_s_disk_cache(tmp_path) -> None:
    """End to end: the original checkpoint fills a disk cache; the same checkpoint, in a
    new engine, loads from it; a copy whose embedding rows 300-339 were retrained (past
    the first KiB of the tensor) loads nothing and answers as it does without a cache. A
    failure means the cache served one model's KV to another (it did, when the
    fingerprint sampled the start of each tensor)."""
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams

    base = write_checkpoint("tiny", tmp_path / "base")
    tuned = write_checkpoint("tiny", tmp_path / "tuned")
    tensors = load_file(tuned / "model.safetensors")
    tensors["model.embed_tokens.weight"][300:340] += 0.5
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    prompts = [[300 + (i * 7 + j) % 40 for j in range(48)] for i in range(3)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    disk = {"name": "disk", "kwargs": {"path": str(tmp_path / "kv")}}

    def run(model, connector=None):
        llm = LLM(str(model), connector=connector, num_blocks=64)
        try:
            return llm.generate(prompts, params)
        finally:
            llm.shutdown()

    run(base, disk)
    again = run(base, disk)
    assert all(o.num_external_tokens > 0 for o in again), again
    tuned_outs = run(tuned, disk)
    assert all(o.num_external_tokens == 0 for o in tuned_outs), tuned_outs
    alone = run(tuned)
    assert [o.output_token_ids for o in tuned_outs] == [o.output_token_ids for o in alone]
