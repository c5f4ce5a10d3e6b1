"""The block manager on its own: block tables, the prefix cache's keys and hits, LRU eviction, the watermark."""

import pytest

from serve.engine.block_manager import SCRATCH_BLOCK, BlockManager


def tokens(count: int, start: int = 100) -> list[int]:
    return list(range(start, start + count))


def test_a_sequence_gets_the_blocks_its_tokens_need_and_never_the_scratch_block():
    blocks = BlockManager(num_blocks=8, block_size=4)
    table, cached = blocks.allocate(tokens(9), None, reuse=True)
    assert len(table) == 3 and cached == 0 and SCRATCH_BLOCK not in table
    assert blocks.used_blocks == 3 and blocks.free_blocks == 4 and blocks.usable_blocks == 7
    assert blocks.append_block(table) and len(table) == 4
    blocks.free(table)
    assert table == [] and blocks.used_blocks == 0 and blocks.free_blocks == 7


def test_allocation_refuses_what_does_not_fit_with_the_watermark():
    blocks = BlockManager(num_blocks=5, block_size=4)
    assert blocks.allocate(tokens(16), None, reuse=True) is not None  # all 4 usable blocks
    assert blocks.allocate(tokens(1, 500), None, reuse=True) is None
    assert not blocks.append_block([])
    fresh = BlockManager(num_blocks=5, block_size=4)
    assert fresh.allocate(tokens(12), None, reuse=True, watermark=2) is None  # 3 blocks + 2 kept free > 4
    assert fresh.allocate(tokens(12), None, reuse=True, watermark=1) is not None


def test_a_registered_prefix_is_reused_and_the_last_token_is_always_computed():
    blocks = BlockManager(num_blocks=16, block_size=4)
    prompt = tokens(12)
    first, _ = blocks.allocate(prompt, None, reuse=True)
    assert blocks.register_full_blocks(first, prompt, None, known=0) == 3
    again, cached = blocks.allocate(prompt, None, reuse=True)  # same 12 tokens: 2 blocks reused, the 3rd recomputed
    assert cached == 8 and again[:2] == first[:2] and again[2] != first[2]
    longer, cached = blocks.allocate(prompt + [7, 8], None, reuse=True)
    assert cached == 12 and longer[:3] == first[:3]
    assert blocks.stats.queried_tokens == 12 + 12 + 14 and blocks.stats.hit_tokens == 8 + 12


def test_a_hit_that_ends_mid_prompt_shares_only_the_common_blocks():
    blocks = BlockManager(num_blocks=16, block_size=4)
    prompt = tokens(12)
    table, _ = blocks.allocate(prompt, None, reuse=True)
    blocks.register_full_blocks(table, prompt, None, known=0)
    other = prompt[:6] + [1, 2, 3, 4, 5, 6]  # agrees on block 0 and half of block 1
    shared, cached = blocks.allocate(other, None, reuse=True)
    assert cached == 4 and shared[0] == table[0] and shared[1] != table[1]


def test_keys_depend_on_the_adapter_and_on_everything_before_the_block():
    blocks = BlockManager(num_blocks=32, block_size=4)
    prompt = tokens(9)
    table, _ = blocks.allocate(prompt, "sql", reuse=True)
    blocks.register_full_blocks(table, prompt, "sql", known=0)
    assert blocks.allocate(prompt, None, reuse=True)[1] == 0  # base model: its own keys
    assert blocks.allocate(prompt, "chat", reuse=True)[1] == 0
    shifted = [1] + prompt[1:]  # block 1's tokens equal, block 0's not: no hit for block 1 either
    assert blocks.allocate(shifted, "sql", reuse=True)[1] == 0
    assert blocks.allocate(prompt, "sql", reuse=True)[1] == 8
    assert blocks.allocate(prompt, "sql", reuse=False)[1] == 0  # prompt scoring computes every position


def test_freed_keyed_blocks_stay_cached_until_fresh_blocks_run_out_then_lru_first():
    blocks = BlockManager(num_blocks=7, block_size=2)  # 6 usable
    old, new = tokens(5, 100), tokens(5, 200)
    for prompt in (old, new):
        table, _ = blocks.allocate(prompt, None, reuse=True)
        blocks.register_full_blocks(table, prompt, None, known=0)
        blocks.free(table)  # 2 keyed blocks cached, the partial one fresh again
    assert blocks.free_blocks == 6 and blocks.used_blocks == 0
    hog, _ = blocks.allocate(tokens(8, 900), None, reuse=True)  # 2 fresh blocks, then the 2 least recently freed
    blocks.free(hog)
    assert blocks.allocate(old, None, reuse=True)[1] == 0  # `old` was freed first: evicted
    assert blocks.allocate(new, None, reuse=True)[1] == 4  # `new` survived


def test_an_evicted_block_is_never_served_for_its_old_key():
    blocks = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    prompt = tokens(5)
    table, _ = blocks.allocate(prompt, None, reuse=True)
    blocks.register_full_blocks(table, prompt, None, known=0)
    blocks.free(table)
    hog, _ = blocks.allocate(tokens(6, 300), None, reuse=True)  # needs all 3 blocks: both cached ones evicted
    assert len(hog) == 3
    blocks.free(hog)
    assert blocks.allocate(prompt, None, reuse=True)[1] == 0


def test_a_block_already_keyed_elsewhere_stays_unkeyed_and_is_freed_fresh():
    blocks = BlockManager(num_blocks=8, block_size=2)
    prompt = tokens(4)
    a, _ = blocks.allocate(prompt, None, reuse=False)
    b, _ = blocks.allocate(prompt, None, reuse=False)  # computed twice side by side
    blocks.register_full_blocks(a, prompt, None, known=0)
    blocks.register_full_blocks(b, prompt, None, known=0)
    blocks.free(b)
    assert blocks.allocate(prompt + [1], None, reuse=True)[0][:2] == a


def test_a_pool_needs_a_scratch_block_and_one_more():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=4)


def test_a_pinned_conversation_survives_eviction_until_unpinned():
    blocks = BlockManager(num_blocks=9, block_size=2)  # 8 usable; pins may hold 4
    chat = tokens(7)
    table, _ = blocks.allocate(chat, None, reuse=True)
    keyed = blocks.register_full_blocks(table, chat, None, known=0)
    assert blocks.pin("session-1", table[:keyed])
    blocks.free(table)
    hog, _ = blocks.allocate(tokens(10, 300), None, reuse=True)  # takes every block that is not pinned
    assert len(hog) == 5 and blocks.free_blocks == 0
    blocks.free(hog)
    assert blocks.allocate(chat + [1, 2], None, reuse=True)[1] == 6  # the whole conversation is still cached
    blocks.unpin("session-1")
    assert blocks.pinned_blocks == 0


def test_pins_may_hold_at_most_half_the_pool():
    blocks = BlockManager(num_blocks=9, block_size=2)
    first, _ = blocks.allocate(tokens(8), None, reuse=True)
    second, _ = blocks.allocate(tokens(4, 500), None, reuse=True)
    assert blocks.pin("a", first[:3]) and not blocks.pin("b", second)
    assert blocks.pinned_blocks == 3
    assert blocks.pin("a", first[:1]) and blocks.pinned_blocks == 1  # a new turn replaces the old pin


def pinned_turn(blocks: BlockManager, key: str, prompt: list[int]) -> list[int]:
    """A finished turn of session ``key``: its full blocks keyed and pinned, its table freed; the pinned blocks."""
    table, _ = blocks.allocate(prompt, None, reuse=True)
    keyed = blocks.register_full_blocks(table, prompt, None, known=0)
    pinned = table[:keyed]
    assert blocks.pin(key, pinned)
    blocks.free(table)
    return pinned


def test_the_pin_released_first_is_the_one_pinned_longest_ago():
    blocks = BlockManager(num_blocks=17, block_size=2)
    first = pinned_turn(blocks, "a", tokens(4, 100))
    pinned_turn(blocks, "b", tokens(4, 200))
    pinned_turn(blocks, "c", tokens(4, 300))
    assert blocks.pin("a", first)  # a new turn of "a": now the youngest
    assert [blocks.unpin_oldest() for _ in range(4)] == ["b", "c", "a", None]
    assert blocks.pinned_blocks == 0 and blocks.free_blocks == 16


def test_releasing_pins_counts_only_blocks_that_pins_alone_hold():
    blocks = BlockManager(num_blocks=9, block_size=2)  # 8 usable
    running, _ = blocks.allocate(tokens(4), None, reuse=True)
    blocks.register_full_blocks(running, tokens(4), None, known=0)
    assert blocks.pin("shared", list(running)) and blocks.pin_only_blocks() == 0  # a running sequence holds them too
    pinned_turn(blocks, "alone", tokens(4, 500))
    assert blocks.pin_only_blocks() == 2 and blocks.free_blocks == 4
    assert blocks.allocate(tokens(12, 900), None, reuse=True) is None  # 6 blocks
    assert blocks.fits_without_pins(tokens(12, 900), None, reuse=True)  # 4 free + 2 pinned alone
    assert not blocks.fits_without_pins(tokens(14, 900), None, reuse=True)  # 7 blocks
    # a prompt that starts with the pinned blocks reuses them: releasing them frees nothing for it
    assert not blocks.fits_without_pins(tokens(4, 500) + tokens(10, 700), None, reuse=True)
    assert blocks.pinned_blocks == 4  # asking never released anything
