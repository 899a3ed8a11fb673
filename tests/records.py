"""Disk records changed in place, as the record and cache tests need them: a version
field damaged, and a record of a newer format (a newer kvdist sharing the directory)."""

import zlib

import msgpack

from kvdist.connectors.disk.record import FORMAT_VERSION, MAGIC, PREFIX


def flip_version_bit(path) -> None:
    """Flip one bit of the format version (it follows the 8-byte magic): the rest of the
    record stays a sound record of this version."""
    with open(path, "r+b") as f:
        f.seek(len(MAGIC))
        b = f.read(1)
        f.seek(len(MAGIC))
        f.write(bytes([b[0] ^ 0x04]))


def make_newer_format(path, **changes) -> None:
    """Rewrite the record as a newer format would write it: the next version number, in
    front of a header with a field this version does not know (its checksum right).
    `changes`: instead, fields of this version's header given values of other types
    (`head_start=None`): a header this version decodes, then cannot compute with."""
    with open(path, "rb") as f:
        data = f.read()
    _, _, _, hlen, _ = PREFIX.unpack_from(data)
    header = msgpack.unpackb(data[PREFIX.size : PREFIX.size + hlen], raw=False)
    body = msgpack.packb({**header, **(changes or {"layout": "tokens-major"})}, use_bin_type=True)
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION + 1, 0, len(body), zlib.crc32(body))
    with open(path, "wb") as f:
        f.write(prefix + body + data[PREFIX.size + hlen :])
