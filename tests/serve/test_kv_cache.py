"""KVCacheManager: reference counts, the free queue's eviction order, prefix keys and hits, copy-on-write."""

import pytest

from llmkern.serve.kv_cache import KVCacheManager

BS = 4


def test_allocate_release_and_usage():
    kv = KVCacheManager(8, BS)
    a = kv.allocate(3)
    assert a == [0, 1, 2] and kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)
    kv.acquire(a[:1])  # shared by a second sequence
    kv.release(a)
    assert kv.ref_count[:3] == [1, 0, 0] and kv.num_free_blocks == 7
    kv.release(a[:1])
    assert kv.usage == 0.0
    with pytest.raises(RuntimeError, match="released more often"):
        kv.release([0])
    with pytest.raises(RuntimeError, match="9 blocks wanted, 8 free"):
        kv.allocate(9)


def test_freed_blocks_are_reused_last_block_of_a_sequence_first():
    kv = KVCacheManager(4, BS)
    blocks = kv.allocate(4)
    kv.release(blocks)  # the free queue: 3, 2, 1, 0 (the end of the sequence is evicted first)
    assert kv.allocate(2) == [3, 2]


def test_prefix_keys_chain_and_hits_leave_the_last_token_out():
    kv = KVCacheManager(8, BS)
    tokens = list(range(10, 22))  # 3 full blocks
    blocks = kv.allocate(3)
    keys = kv.block_keys(tokens, 3)
    kv.cache_blocks(blocks, keys)
    assert kv.block_keys(tokens, 3, keys[:1]) == keys
    # Same first block, different second: only the first matches (keys chain over everything before them).
    assert kv.find_prefix(tokens[:4] + [0] * 8 + [1])[0] == blocks[:1]
    # The whole prompt cached: its last block is left out, so at least one token is computed.
    assert kv.find_prefix(tokens)[0] == blocks[:2]
    assert kv.find_prefix(tokens + [5])[0] == blocks
    assert kv.find_prefix([0] + tokens)[0] == []


def test_cached_blocks_survive_release_until_evicted_lru():
    kv = KVCacheManager(3, BS)
    a, b = kv.allocate(1), kv.allocate(1)
    kv.cache_blocks(a, kv.block_keys([1, 2, 3, 4], 1))
    kv.cache_blocks(b, kv.block_keys([5, 6, 7, 8], 1))
    kv.release(a)
    kv.release(b)
    assert kv.find_prefix([1, 2, 3, 4, 0])[0] == a  # freed, still findable
    hit = kv.find_prefix([5, 6, 7, 8, 0])[0]
    assert kv.can_allocate(2, hit) and not kv.can_allocate(3, hit)
    kv.acquire(hit)  # a hit takes the block back out of the free queue
    assert kv.allocate(2) == [2, *a]  # the never-used block, then the least recently freed cached one
    assert kv.find_prefix([1, 2, 3, 4, 0])[0] == []  # evicted
    assert kv.find_prefix([5, 6, 7, 8, 0])[0] == b


def test_duplicate_keys_keep_the_first_block_and_disabled_cache_finds_nothing():
    kv = KVCacheManager(4, BS)
    keys = kv.block_keys([1, 2, 3, 4], 1)
    kv.cache_blocks([0], keys)
    kv.cache_blocks([1], keys)
    assert kv.cached == {keys[0]: 0} and kv.block_key[1] is None
    off = KVCacheManager(4, BS, enable_prefix_caching=False)
    off.cache_blocks([0], keys)
    assert off.find_prefix([1, 2, 3, 4, 5]) == ([], [])


def test_copy_on_write_only_for_shared_blocks():
    kv = KVCacheManager(4, BS)
    (block,) = kv.allocate(1)
    assert kv.copy_on_write(block) is None
    kv.acquire([block])
    fresh = kv.copy_on_write(block)
    assert fresh != block and kv.ref_count[block] == 1 and kv.ref_count[fresh] == 1
