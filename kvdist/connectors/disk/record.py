"""The file format of one block shard: a self-describing header, then the raw payload.

    prefix   struct "<8sHHII": magic, format version, reserved (0), header length,
             crc32 of the header bytes
    header   msgpack map: key (16-byte block hash), ns (8-byte namespace id), dtype,
             num_layers, block_size, num_kv_heads, head_start, head_end, head_dim,
             payload_bytes, crc32 (of the payload)
    payload  the shard, shape (num_layers, 2, block_size, head_end - head_start, head_dim),
             C order, native little-endian `dtype`

The header has its own checksum because a flipped bit in, say, `head_start` would
otherwise hand a reader the right bytes for the wrong heads. The prefix has none: its
reserved field must be 0 in this version (so that every byte of a record is checked), and a
version other than this one is another format's record only if what follows is not a
sound header of this version (one that is, checksum and all, is this version's record
with its version field damaged; a new format must change its header, or better, its file
name). crc32 because it runs at ~4 GB/s here against ~0.7 GB/s for blake2b (1 MB
buffers), well above disk bandwidth; it guards against corruption, not tampering. Records
are written to a temporary name in the same directory and moved into place, so a reader
never sees a partial record.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import stat
import struct
import zlib
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import msgpack

MAGIC = b"KVDBLK\r\n"
FORMAT_VERSION = 1
"""A new format must change the header's layout (or better, the file name's suffix), not
only this number: a version other than this one in front of a header this version reads
whole, checksum and all, is taken for a damaged version field, and the record deleted as
corrupt (`_decode_header`)."""
PREFIX = struct.Struct("<8sHHII")
MAX_HEADER_BYTES = 4096
SUFFIX = ".kvb"


class RecordError(Exception):
    """A record that cannot be used: missing, truncated, corrupt, or of another layout."""


class CorruptRecord(RecordError):
    """The file is there and was read, but its bytes are not a valid record of the block
    asked for (truncated, checksum mismatch, another layout or key), or it is not a
    regular file. Not raised for a file that cannot be opened or read (`RecordIOError`),
    nor for another format version (a newer kvdist sharing the directory): those may be
    fine for someone else. Another version number in front of a sound header of this
    version is a damaged version field, and corrupt."""


class RecordIOError(RecordError):
    """The file is there but opening or reading it failed. Most such errors say nothing
    about the record (EACCES on another user's file, EMFILE, ESTALE on NFS, a lease): the
    file is kept, and the block is a load failure this time."""


class UnreadableRecord(RecordIOError):
    """EIO: the file's bytes cannot be read (a bad sector). An engine that meets it
    removes it, so the block misses and is saved again elsewhere on the disk, rather than
    being found, and failing to load, at every lookup. `kvdist cache verify` lists it as
    not checked."""


def _io_error(what: str, exc: OSError) -> RecordError:
    if exc.errno == errno.ENOENT:
        return RecordError(f"{what}: {exc.strerror}")  # vanished: another engine evicted it
    kind = UnreadableRecord if exc.errno == errno.EIO else RecordIOError
    return kind(f"{what}: {exc.strerror}")


@dataclass(frozen=True, kw_only=True)
class RecordHeader:
    key: bytes
    ns: bytes
    dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_start: int
    head_end: int
    head_dim: int
    payload_bytes: int = 0
    crc32: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        heads = self.head_end - self.head_start
        return (self.num_layers, 2, self.block_size, heads, self.head_dim)

    def expected_payload_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_itemsize(self.dtype)


# Bytes per element of the dtypes a KV cache may hold, by torch's name for them (written
# out so that this module, which the writer process imports, needs no torch).
_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "int8": 1,
    "uint8": 1,
}


def dtype_name(dtype: object) -> str:
    """The name a record stores for a torch dtype (`torch.bfloat16` -> "bfloat16")."""
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(name: str) -> int:
    try:
        return _ITEMSIZE[name]
    except KeyError:
        raise RecordError(f"unknown dtype {name!r}") from None


_HEADER_FIELDS = tuple(f.name for f in fields(RecordHeader))


def encode_header(header: RecordHeader) -> bytes:
    # The fields by hand, not `asdict`: its deep copies were most of a save's Python time
    # per block, and that time holds the GIL the engine's thread needs.
    body = msgpack.packb({k: getattr(header, k) for k in _HEADER_FIELDS}, use_bin_type=True)
    return PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body)) + body


def _decode_header(head: bytes) -> tuple[RecordHeader, int]:
    """Parse the prefix and header at the start of `head`; returns (header, payload offset)."""
    if len(head) < PREFIX.size:
        raise CorruptRecord("truncated prefix")
    magic, version, reserved, hlen, hcrc = PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise CorruptRecord("bad magic: not a kvdist block record")
    if version != FORMAT_VERSION:
        try:
            _parse_header(head, hlen, hcrc)
        except RecordError:  # not this format's header: another format's record
            raise RecordError(
                f"format version {version}, this kvdist reads {FORMAT_VERSION}"
            ) from None
        # The prefix has no checksum, but the header after it does: a sound header of
        # this version is this version's record, its version field damaged.
        raise CorruptRecord(
            f"format version {version} before a sound version-{FORMAT_VERSION} header: "
            "the version field is damaged"
        )
    if reserved:  # this version writes 0 there: the only bytes no checksum covers
        raise CorruptRecord(f"reserved field is {reserved}, not 0: the prefix is damaged")
    return _parse_header(head, hlen, hcrc), PREFIX.size + hlen


def _parse_header(head: bytes, hlen: int, hcrc: int) -> RecordHeader:
    """The header that follows the prefix, checked as this format version's."""
    if hlen > MAX_HEADER_BYTES:
        raise CorruptRecord(f"header length {hlen} is implausible")
    body = head[PREFIX.size : PREFIX.size + hlen]
    if len(body) != hlen:
        raise CorruptRecord("truncated header")
    if zlib.crc32(body) != hcrc:
        raise CorruptRecord("header checksum mismatch")
    try:
        fields = msgpack.unpackb(body, raw=False)
        header = RecordHeader(**fields)
        # In the try: a field of another type (None, a list: another format's header,
        # its checksum sound) fails here with a TypeError, which must not escape a read.
        expected = header.expected_payload_bytes()
    except RecordError:
        raise  # a dtype this kvdist does not know
    except Exception as exc:  # any malformed map is corruption, whatever the decoder raises
        raise CorruptRecord(f"malformed header: {exc}") from None
    if header.payload_bytes != expected:
        raise CorruptRecord("payload size does not match the header's shape and dtype")
    return header


def check_header(header: RecordHeader, want: RecordHeader) -> None:
    """Raise RecordError unless `header` matches `want` in every field but the checksums."""
    for name in (
        "key",
        "ns",
        "dtype",
        "num_layers",
        "block_size",
        "num_kv_heads",
        "head_start",
        "head_end",
        "head_dim",
    ):
        if getattr(header, name) != getattr(want, name):
            raise CorruptRecord(
                f"{name} is {getattr(header, name)!r}, expected {getattr(want, name)!r}"
            )


class Written(NamedTuple):
    """A record written (`write_record`)."""

    nbytes: int
    created: bool
    """False: a record of that name was there already (another writer's, saving the same
    block; or one found unusable), and this one replaced it: the directory gained none of
    its bytes."""


def write_record(
    directory: str, name: str, header: RecordHeader, payload: memoryview, *, fsync: bool
) -> Written:
    """Atomically create `directory/name`; returns the bytes written, and whether this
    write created the record.

    On any error the temporary file is removed and the error re-raised."""
    data = payload.cast("B")
    head = encode_header(replace(header, payload_bytes=data.nbytes, crc32=zlib.crc32(data)))
    tmp = os.path.join(directory, f".{name}.{_TMP_PREFIX}-{next(_TMP_COUNTER)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, [head, data])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        created = _move_into_place(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)
    return Written(len(head) + data.nbytes, created)


def _move_into_place(tmp: str, path: str) -> bool:
    """Give the written record its name; whether that created it. Two engines saving one
    block at once both succeed with `os.replace`, and the directory holds the bytes once:
    `os.link`, which fails where the name is taken, says which one created it (both count
    it in their ledgers otherwise). The other replaces the record all the same, as a
    record found unusable (another format's) must be. Where `link` fails otherwise (a
    filesystem without hard links: FAT, some network and FUSE ones, with EPERM, EACCES,
    EOPNOTSUPP...), `os.replace` alone, counted as created."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return _rename_into_place(tmp, path)  # created only where a directory was
    except OSError:
        _rename_into_place(tmp, path)
        return True
    with contextlib.suppress(OSError):  # left over, it goes as a dead write's file
        os.unlink(tmp)
    return True


def _rename_into_place(tmp: str, path: str) -> bool:
    """`os.replace`, past an empty directory under the record's name (nothing kvdist
    writes, but left by hand or by a tool, it would fail every save of the block); a
    directory with something in it is left alone, and the error says where it is.
    Whether a directory was in the way."""
    try:
        os.replace(tmp, path)
        return False
    except IsADirectoryError:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass  # another writer removed it first
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"a directory is in the way of record {path} ({exc.strerror}): remove it "
                "for the block to be saved",
            ) from None
        os.replace(tmp, path)
        return True


def fsync_dir(directory: str) -> None:
    """Make the entries of `directory` (a file renamed or a directory created in it)
    durable."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# Temporary names unique across the processes of every host sharing the directory (a random
# prefix per process, drawn again in a forked child) and across threads (a counter: `next`
# on it is atomic under the GIL).
_TMP_PREFIX = secrets.token_hex(6)
_TMP_COUNTER = itertools.count()


def _new_tmp_prefix() -> None:
    global _TMP_PREFIX
    _TMP_PREFIX = secrets.token_hex(6)


os.register_at_fork(after_in_child=_new_tmp_prefix)


def _write_all(fd: int, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def read_record(
    path: str, want: RecordHeader | None = None, into: memoryview | None = None
) -> tuple[RecordHeader, memoryview]:
    """Read and verify a record; returns its header and payload.

    `want`: fields the header must match. `into`: a buffer of exactly the payload size to
    read into (saves a copy); its contents are undefined if this raises. Raises RecordError
    for anything that makes the record unusable, including a vanished file."""
    try:
        # O_NONBLOCK: a FIFO in the cache directory must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _io_error("cannot open", exc) from None
    try:
        # Few system calls per record: size, prefix + header in one read, payload in place.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptRecord("not a regular file")
        size = st.st_size
        header, offset = _decode_header(os.pread(fd, PREFIX.size + MAX_HEADER_BYTES, 0))
        if want is not None:
            check_header(header, want)
        n = header.payload_bytes
        if size != offset + n:
            raise CorruptRecord(f"file is {size} bytes, its header says {offset + n}")
        buf = into.cast("B") if into is not None else memoryview(bytearray(n))
        if buf.nbytes != n:
            raise CorruptRecord(f"payload of {n} bytes does not fit a {buf.nbytes}-byte buffer")
        got = 0
        while got < n:
            k = os.preadv(fd, [buf[got:]], offset + got)
            if not k:
                raise CorruptRecord(f"truncated payload ({got} of {n} bytes)")
            got += k
    except OSError as exc:
        raise _io_error("read failed", exc) from None
    finally:
        os.close(fd)
    if zlib.crc32(buf) != header.crc32:
        raise CorruptRecord("payload checksum mismatch")
    return header, buf
