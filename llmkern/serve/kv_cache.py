"""The KV cache's block bookkeeping: reference counts, a free queue, prefix caching and copy-on-write.

The cache tensors themselves (one [num_blocks, block_size, kv_heads, head_dim] pair per layer) are the
engine's; this class hands out their block ids. Every block is either referenced (ref_count > 0, owned by
one or more sequences) or in the free queue. Blocks leave the queue from its front, so the queue order is the
eviction order: a freed block goes to the back, and a sequence's blocks are freed last block first, so the
ends of prompts are evicted before their beginnings (which more requests share).

Prefix caching (vLLM's automatic prefix caching): a full block whose tokens are all computed gets a key, the
SHA-256 of its tokens chained with the key of the block before it, so equal keys mean equal prefixes (Python's
hash() is not enough: a client could craft token blocks whose hashes collide and read another request's cache,
vLLM's CVE-2025-25183). A freed
block keeps its key and stays findable until it is handed out again (LRU eviction of unreferenced blocks).
A new sequence takes the cached blocks of its longest cached prefix, leaving at least its last token to be
computed (its logits pick the next token). Sequences share blocks by reference count (prefix hits, and the n
samples of one prompt); writing into a shared block first copies it (copy_on_write).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks, block_size: expected positive ints, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block id
        self.prefix_queries = 0  # prompt tokens looked up, and how many of them were found (the hit rate)
        self.prefix_hits = 0

    # ---- counts ----

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of the blocks referenced by sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix keys ----

    def block_keys(self, token_ids: Sequence[int], num_blocks: int, known: Sequence[bytes] = ()) -> list[bytes]:
        """The keys of the first num_blocks full blocks of token_ids; `known`: keys already computed for a prefix."""
        keys = list(known[:num_blocks])
        bs = self.block_size
        for b in range(len(keys), num_blocks):
            h = hashlib.sha256(keys[-1] if keys else b"")
            h.update(array("q", token_ids[b * bs : (b + 1) * bs]).tobytes())
            keys.append(h.digest())
        return keys

    def find_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """(block ids, keys) of the longest cached prefix of token_ids, whole blocks only, leaving the last token
        out. Nothing is acquired yet: pass the ids to acquire()."""
        if not self.enable_prefix_caching:
            return [], []
        blocks, keys = [], []
        for key in self.block_keys(token_ids, (len(token_ids) - 1) // self.block_size):
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        return blocks, keys

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_blocks(self, blocks: Sequence[int], keys: Sequence[bytes]) -> None:
        """Make full, computed blocks findable under their keys (a key already cached keeps its block)."""
        if not self.enable_prefix_caching:
            return
        for block, key in zip(blocks, keys):
            if self.block_key[block] is None and key not in self.cached:
                self.block_key[block] = key
                self.cached[key] = block

    # ---- references ----

    def can_allocate(self, num_new: int, reused: Sequence[int] = ()) -> bool:
        """Whether num_new fresh blocks remain after acquiring `reused` (some of which may sit in the free queue)."""
        return num_new <= len(self.free_queue) - sum(self.ref_count[b] == 0 for b in reused)

    def acquire(self, blocks: Sequence[int]) -> None:
        """One more reference to each block (a prefix hit, or a sample sharing its prompt's blocks)."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self.free_queue[b]
            self.ref_count[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """num_blocks fresh blocks (check can_allocate first), evicting the least recently freed cached ones."""
        if num_blocks > len(self.free_queue):
            raise RuntimeError(f"KV cache: {num_blocks} blocks wanted, {len(self.free_queue)} free")
        out = []
        for _ in range(num_blocks):
            block, _ = self.free_queue.popitem(last=False)
            key = self.block_key[block]
            if key is not None:  # evicted from the prefix cache
                del self.cached[key]
                self.block_key[block] = None
            self.ref_count[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue, the last block first."""
        for b in reversed(blocks):
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"KV cache: block {b} released more often than acquired")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free_queue[b] = None

    def copy_on_write(self, block: int) -> int | None:
        """Before writing into `block`: None if the caller holds the only reference, else a fresh block that
        replaces it for the caller (the caller copies the contents over). Check can_allocate(1) first."""
        if self.ref_count[block] == 1:
            return None
        (fresh,) = self.allocate(1)
        self.release([block])
        return fresh
