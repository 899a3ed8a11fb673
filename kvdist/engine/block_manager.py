"""Paged KV block allocation with reference counts and on-device prefix caching.

A block whose reference count drops to zero goes to the back of the free list but keeps
its hash, so a later request with the same prefix can take it back (a prefix hit) until
the block is handed out again, which evicts the hash. Free blocks are reused oldest first.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    """Block bookkeeping of rank 0 (the same table applies to every rank's cache shard)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, hashes: list[bytes], max_blocks: int) -> list[int]:
        """Device blocks holding the longest cached prefix of `hashes` (no references taken)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in hashes[:max_blocks]:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, hits: list[int], num_new: int) -> bool:
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)
        return self.num_free - reclaimed >= num_new

    def allocate(self, hits: list[int], num_new: int) -> list[int]:
        """Take references on `hits` and `num_new` fresh blocks; returns them in order."""
        assert self.can_allocate(hits, num_new), "caller must check can_allocate"
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free_blocks[b]
            self.ref_counts[b] += 1
        fresh = []
        for _ in range(num_new):
            b, _ = self.free_blocks.popitem(last=False)
            self._forget_hash(b)
            self.ref_counts[b] = 1
            fresh.append(b)
        return hits + fresh

    def free(self, block_ids: list[int]) -> None:
        # Free in reverse so a sequence's tail blocks are reused before its prefix.
        for b in reversed(block_ids):
            assert self.ref_counts[b] > 0, f"block {b} freed twice"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks[b] = None

    def cache_blocks(self, block_ids: list[int], hashes: list[bytes], num_full: int) -> None:
        """Publish the first `num_full` blocks (fully computed) as prefix-cache entries."""
        if not self.enable_prefix_caching:
            return
        for b, h in zip(block_ids[:num_full], hashes[:num_full]):
            if self.block_hash[b] == h:
                continue
            if h in self.hash_to_block:
                continue  # another block already holds this prefix; keep the first
            self._forget_hash(b)
            self.block_hash[b] = h
            self.hash_to_block[h] = b

    def uncache_blocks(self, block_ids: list[int]) -> None:
        """Withdraw blocks from the prefix cache (their content is not trusted)."""
        for b in block_ids:
            self._forget_hash(b)

    def _forget_hash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.block_hash[b] = None
