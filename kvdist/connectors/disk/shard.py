"""One rank's side of the disk cache: where its records live, what their headers must say,
and the transfers and IO process its loads and saves share."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvdist.api.types import ConnectorContext
from kvdist.connectors.disk.record import RecordHeader, dtype_name
from kvdist.connectors.disk.staging import LoadBuffers
from kvdist.connectors.disk.store import block_dir, namespace_id, record_name
from kvdist.connectors.disk.writer_process import WriterProcess
from kvdist.kv.pinned import SharedBuffer
from kvdist.kv.transfer import BlockTransfer


@dataclass
class RankShard:
    """The records of one rank's heads under one namespace directory."""

    ctx: ConnectorContext
    ns_dir: str
    name: str
    """This rank's record name in a block directory (its head range)."""
    ns: bytes
    """The namespace id every record's header carries."""
    xfer: BlockTransfer | None = None
    """Set by `register_kv_caches`."""
    loads: LoadBuffers | None = None
    """The buffers loads read through; set by `register_kv_caches`."""
    process: WriterProcess | None = None
    """The rank's IO process, when it has one (`writer_process`) and it started."""
    read_only: bool = False
    """Loads keep unusable records and set no file times (the `read_only` setting)."""

    @classmethod
    def of(cls, ctx: ConnectorContext, ns_dir: str, *, read_only: bool = False) -> RankShard:
        return cls(
            ctx,
            ns_dir,
            record_name(ctx.kv_head_start, ctx.kv_head_end, ctx.num_kv_heads),
            bytes.fromhex(namespace_id(ctx.model_namespace)),
            read_only=read_only,
        )

    def own_path(self, key: bytes) -> str:
        """Where this rank's record of block `key` is (or would be)."""
        return os.path.join(block_dir(self.ns_dir, key), self.name)

    def transfers(self) -> BlockTransfer:
        if self.xfer is None:
            raise RuntimeError("disk connector: register_kv_caches() must come before transfers")
        return self.xfer

    def load_buffers(self) -> LoadBuffers:
        if self.loads is None:
            raise RuntimeError("disk connector: register_kv_caches() must come before loads")
        return self.loads

    def header(self, key: bytes, head_start: int, head_end: int) -> RecordHeader:
        """The header a record of block `key`, heads `[head_start, head_end)`, must have."""
        ctx = self.ctx
        return RecordHeader(
            key=key,
            ns=self.ns,
            dtype=dtype_name(ctx.dtype),
            num_layers=ctx.num_layers,
            block_size=ctx.block_size,
            num_kv_heads=ctx.num_kv_heads,
            head_start=head_start,
            head_end=head_end,
            head_dim=ctx.head_dim,
        )

    def own_header(self) -> RecordHeader:
        """The header of this rank's heads, without a key (the IO process sets it)."""
        return self.header(b"", self.ctx.kv_head_start, self.ctx.kv_head_end)

    def usable_process(self, shared: SharedBuffer | None) -> WriterProcess | None:
        """The IO process, when it is alive and `shared` (a lease's shared memory) is set:
        tasks on that buffer can go to it. None: they run on this process's threads."""
        p = self.process
        return p if p is not None and shared is not None and p.alive else None
