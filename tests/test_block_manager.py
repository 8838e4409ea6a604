"""The KV block manager on its own: hash chain, prefix hits, refcounts, LRU eviction, copy-on-write."""
import pytest

from arkfast.engine.block_manager import ROOT_HASH, BlockManager, BlockTables, chain_hash
from arkfast.engine.sequence import Sequence

BS = 16


def make_seq(tokens, rid="r"):
    return Sequence(rid, None, list(tokens), params=None, arrival_time=0.0)


def admit(bm, seq, n=None):
    """Admit ``seq`` with its prefix match and compute ``n`` (default: all remaining) tokens."""
    match = bm.match_prefix(seq)
    n = seq.num_tokens - match.num_tokens if n is None else n
    bm.allocate(seq, n, match)
    seq.num_computed_tokens += n
    return match


def test_hash_chain():
    a, b = list(range(BS)), list(range(1, BS + 1))
    assert chain_hash(ROOT_HASH, a) == chain_hash(ROOT_HASH, a)
    assert chain_hash(ROOT_HASH, a) != chain_hash(ROOT_HASH, b)
    # The same block after different prefixes hashes differently.
    assert chain_hash(chain_hash(ROOT_HASH, a), b) != chain_hash(chain_hash(ROOT_HASH, b), b)
    bm = BlockManager(8, BS)
    seq = make_seq(a + b + [7, 7])
    assert bm.block_hash(seq, 1) == chain_hash(chain_hash(ROOT_HASH, a), b)
    assert seq.block_hashes == [chain_hash(ROOT_HASH, a), bm.block_hash(seq, 1)]


def test_prefix_hit_shares_full_blocks_and_counts():
    bm = BlockManager(16, BS)
    prefix = list(range(100, 100 + 2 * BS))
    a = make_seq(prefix + [1, 2, 3], "a")
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 13
    b = make_seq(prefix + [9] * 20, "b")
    match = admit(bm, b)
    assert match.blocks[:2] == a.block_table[:2] and match.num_tokens == 2 * BS
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.num_hit_tokens == 2 * BS and bm.num_queried_tokens == a.num_tokens + b.num_tokens
    # A prompt that is entirely cached still computes its last token: at most num_tokens - 1 hit.
    c = make_seq(prefix, "c")
    match = bm.match_prefix(c)
    assert match.num_tokens == 2 * BS - 1
    assert match.blocks == a.block_table[:2]


def test_tokens_are_recompared_on_a_hit():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(BS + 1)), "a")
    admit(bm, a)
    # Forge a collision: the hash of another prefix now names a's first block.
    other = make_seq([5] * BS + [1], "b")
    bm._cached[bm.block_hash(other, 0)] = a.block_table[0]
    assert bm.match_prefix(other).num_tokens == 0


def test_refcounts_and_cached_free_blocks():
    bm = BlockManager(8, BS)
    tokens = list(range(2 * BS + 3))
    a, b = make_seq(tokens, "a"), make_seq(tokens + [1], "b")
    admit(bm, a)
    admit(bm, b)
    shared = a.block_table[:2]
    a_blocks = list(a.block_table)
    assert bm.num_copied_blocks == 1  # b shared a's partial block for 3 tokens, then wrote its 4th
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in shared] == [1, 1] and a.block_table == []
    bm.free(b)
    assert all(bm.blocks[i].ref_count == 0 for i in shared) and bm.num_free_blocks == 8
    # Freed blocks keep their contents: a new sequence still hits them, and revives them.
    c = make_seq(tokens + [4, 4], "c")
    match = bm.match_prefix(c)
    assert match.blocks == a_blocks and match.num_tokens == 2 * BS + 3
    # Three cached blocks revived, no new block, no copy: nobody else holds a's partial block, so c
    # writes its two tokens into it in place.
    assert bm.blocks_needed(c, 2, match) == 3
    admit(bm, c)
    assert [bm.blocks[i].ref_count for i in c.block_table] == [1, 1, 1] and bm.num_copied_blocks == 1
    assert bm.blocks[c.block_table[2]].token_ids == [32, 33, 34, 4, 4]


def test_lru_eviction_order():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(100, 100 + 3 * BS)), "a")    # 3 full blocks (last token computed too)
    b = make_seq(list(range(300, 300 + 3 * BS)), "b")
    admit(bm, a)
    admit(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)  # released first: evicted first, its last block before its first
    bm.free(b)
    c = make_seq(list(range(500, 500 + 2 * BS)), "c")
    admit(bm, c)
    assert c.block_table == [a_blocks[2], a_blocks[1]]
    # a's first block survives, b's prefix entirely
    assert bm.match_prefix(make_seq(a.token_ids[:BS + 1])).blocks == [a_blocks[0]]
    assert bm.match_prefix(make_seq(b.token_ids)).blocks == b_blocks[:2] + [b_blocks[2]]
    d = make_seq(list(range(700, 700 + 2 * BS)), "d")
    admit(bm, d)
    assert d.block_table == [a_blocks[0], b_blocks[2]]


def test_copy_on_write_of_a_shared_partial_block():
    bm = BlockManager(8, BS)
    prompt = list(range(BS + 5))                      # one full block + 5 tokens
    a = make_seq(prompt, "a")
    admit(bm, a)
    b = make_seq(prompt, "b")
    match = bm.match_prefix(b)
    # Full block, then a's partial block shared for 4 of its 5 tokens (the last is recomputed).
    assert match.blocks == a.block_table and match.num_tokens == BS + 4
    assert bm.blocks_needed(b, 1, match) == 1          # the copy
    bm.allocate(b, 1, match)
    src, dst = bm.take_copies()
    new = b.block_table[1]
    assert new != a.block_table[1] and b.block_table[0] == a.block_table[0]
    assert src == [a.block_table[1] * BS + i for i in range(4)]
    assert dst == [new * BS + i for i in range(4)]
    assert bm.blocks[a.block_table[1]].ref_count == 1 and bm.blocks[new].ref_count == 1
    assert bm.num_copied_blocks == 1 and bm.take_copies() == ([], [])
    # a now owns its block alone and appends in place.
    a.token_ids.append(42)
    bm.allocate(a, 1)
    assert bm.take_copies() == ([], []) and bm.blocks[a.block_table[1]].token_ids == prompt[BS:] + [42]


def test_append_token_only_in_place():
    """append_token takes a decode token only when it goes into the sequence's own, unshared,
    uncached, not-full last block; otherwise it changes nothing (allocate's general path runs)."""
    bm = BlockManager(8, BS)
    a = make_seq(list(range(BS + 5)), "a")
    c = make_seq(list(range(100, 100 + 2 * BS)), "c")
    admit(bm, a)
    admit(bm, c)
    a.token_ids.append(7)
    c.token_ids.append(9)

    def state():
        blocks = [(b.ref_count, list(b.token_ids), b.hash) for b in bm.blocks]
        return [list(s.block_table) for s in (a, c)], blocks, bm.num_free_blocks, set(bm._writes)

    last = bm.blocks[a.block_table[-1]]
    last.ref_count += 1  # someone else holds it too
    before = state()
    assert not bm.append_token(a) and state() == before
    last.ref_count -= 1
    before = state()
    assert not bm.append_token(c) and state() == before  # its last block is full: it needs a new one
    free = bm.num_free_blocks
    assert bm.append_token(a) and bm.num_free_blocks == free
    assert last.token_ids == a.token_ids[BS:] and last.block_id in bm._writes
    a.num_computed_tokens += 1
    before = state()
    assert not bm.append_token(a) and state() == before  # nothing left to compute


def test_copy_chains_resolve_to_their_origin():
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    a = make_seq(prompt, "a")
    admit(bm, a)
    b = make_seq(prompt, "b")
    admit(bm, b)                                       # copies a's 9 slots into b's block
    c = make_seq(prompt[:6] + [99], "c")
    match = bm.match_prefix(c)
    assert match.num_tokens == 6
    bm.allocate(c, 1, match)                           # copies 6 slots from a or b's block
    src, dst = bm.take_copies()
    origin = a.block_table[0] * BS
    assert set(src) <= set(range(origin, origin + 9)) and len(dst) == 9 + 6 and not set(src) & set(dst)


def test_full_cached_blocks_are_immutable():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(BS + 1)), "a")
    admit(bm, a)
    full = a.block_table[0]
    bm.free(a)
    # b matches the first 10 tokens of the cached full block, then differs: it copies instead of
    # overwriting the cached block, which a later request can still hit.
    b = make_seq(list(range(10)) + [77, 78], "b")
    match = bm.match_prefix(b)
    assert match.blocks == [full] and match.num_tokens == 10
    assert bm.blocks_needed(b, 2, match) == 2          # revive + copy
    bm.allocate(b, 2, match)
    assert b.block_table != [full] and bm.blocks[full].ref_count == 0
    # The copy's source is not handed out again before the step (which copies from it) is over.
    free_during_step = bm.num_free_blocks
    assert all(bm._fresh_block().block_id != full for _ in range(free_during_step))
    assert bm.take_copies()[0] == [full * BS + i for i in range(10)] and bm.num_free_blocks == 1
    assert bm.match_prefix(make_seq(list(range(BS + 1)))).blocks == [full]


def test_a_copy_source_can_be_hit_again_in_the_same_step():
    bm = BlockManager(8, BS)
    a = make_seq(list(range(BS + 1)), "a")
    admit(bm, a)
    full = a.block_table[0]
    bm.free(a)
    bm.take_copies()
    b = make_seq(list(range(10)) + [77], "b")
    admit(bm, b)                                       # revives `full`, copies from it, lets it go
    assert bm.blocks[full].ref_count == 0 and full not in bm._free
    c = make_seq(list(range(BS)) + [5, 6], "c")
    assert admit(bm, c).blocks == [full]               # hit again before the step is over
    bm.take_copies()
    assert bm.blocks[full].ref_count == 1 and full not in bm._free
    bm.free(c)
    assert full in bm._free


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = list(range(2 * BS + 3))
    a, b = make_seq(prompt, "a"), make_seq(prompt, "b")
    admit(bm, a)
    assert admit(bm, b).num_tokens == 0
    assert not set(a.block_table) & set(b.block_table) and bm.num_hit_tokens == 0


def test_prefix_index_stays_as_small_as_the_cache():
    """Evicted blocks leave no trace in the index of partial-block candidates: after thousands of
    distinct prompts through 8 blocks it holds at most 8 blocks, under their current parents."""
    import random

    rng = random.Random(0)
    bm = BlockManager(8, BS)
    for i in range(2000):
        seq = make_seq([rng.randrange(300) for _ in range(50)], f"s{i}")
        admit(bm, seq)
        bm.take_copies()
        bm.free(seq)
    assert all(bm._children.values()), "empty entries left behind"
    indexed = [(parent, b) for parent, ids in bm._children.items() for b in ids]
    assert len(indexed) <= 8 and all(bm.blocks[b].parent_hash == parent for parent, b in indexed)
    assert len(bm._cached) <= 8


def test_allocation_beyond_capacity_raises():
    bm = BlockManager(2, BS)
    seq = make_seq(list(range(3 * BS)))
    match = bm.match_prefix(seq)
    assert not bm.can_allocate(seq, seq.num_tokens, match)
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        bm.allocate(seq, seq.num_tokens, match)


def assert_tables_match(tables, holding, others):
    """``tables`` holds each of ``holding``'s block tables in a row of its own, ``-1`` after it, every
    other row is all ``-1``, and ``others`` (holding no blocks) have no row."""
    rows = [seq.table_row for seq in holding]
    assert len(set(rows)) == len(rows) and all(r >= 0 for r in rows), rows
    assert all(seq.block_table == [] and seq.table_row == -1 for seq in others)
    expected = [[-1] * tables.array.shape[1] for _ in range(len(tables.array))]
    for seq in holding:
        expected[seq.table_row][:len(seq.block_table)] = seq.block_table
    assert tables.array.tolist() == expected
    width = max((len(seq.block_table) for seq in holding), default=0)
    assert tables.gather(holding, width).tolist() == [t + [-1] * (width - len(t))
                                                      for t in (seq.block_table for seq in holding)]


def test_block_tables_grow_and_reuse_rows():
    tables = BlockTables(rows=1, width=1)
    a, b, c = make_seq([1], "a"), make_seq([2], "b"), make_seq([3], "c")
    a.block_table, b.block_table = [4, 5, 6], [7]
    tables.assign(a, a.block_table)
    tables.assign(b, b.block_table)
    assert tables.array.shape == (2, 4)
    assert_tables_match(tables, [a, b], [c])
    a.block_table = []
    tables.release(a)
    c.block_table = [9, 8]
    tables.assign(c, c.block_table)
    assert c.table_row == 0  # a's row, cleared, is reused
    assert_tables_match(tables, [b, c], [a])
    b.block_table[0] = 3
    tables.set(b, 0, 3)
    assert_tables_match(tables, [b, c], [a])
    with pytest.raises(ValueError, match="wider"):
        tables.gather([b], 5)


# (seed, num_blocks, max_num_seqs, max_num_batched_tokens, prefix caching)
SIMULATIONS = [(0, 10, 8, 24, True), (1, 12, 8, 8, True), (2, 40, 8, 64, True), (3, 40, 3, 24, True),
               (4, 10, 8, 24, False), (5, 14, 8, 64, True)]


@pytest.mark.parametrize("seed, num_blocks, max_num_seqs, budget, caching", SIMULATIONS)
def test_scheduler_and_block_manager_keep_the_cache_consistent(seed, num_blocks, max_num_seqs, budget, caching):
    """Many steps of a simulated engine over a small cache: a fake KV cache stores each slot's token,
    writes and copy-on-write copies are applied as the model runner applies them, and after every
    step each scheduled sequence must find its own tokens in its slots. Refcounts must equal the
    number of holders. Prompts share prefixes (often whole prompts) to exercise hits, partial hits,
    copies, eviction and preemption (small caches). The block manager's array of block tables (started
    at one row of one block, so that it grows) must equal the sequences' lists after every step."""
    import random

    from arkfast.engine.config import EngineConfig
    from arkfast.engine.sampling_params import SamplingParams
    from arkfast.engine.scheduler import Scheduler

    rng = random.Random(seed)
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, enable_prefix_caching=caching)
    bm = BlockManager(num_blocks, BS, cfg.enable_prefix_caching)
    bm.tables = BlockTables(rows=1, width=1)
    sched = Scheduler(cfg, bm)
    cache = [-1] * (num_blocks * BS)
    roots = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(3)]
    pending = []
    for i in range(24):
        prompt = list(rng.choice(roots)) + [rng.randrange(50) for _ in range(rng.choice([0, 0, 1, 7, 20]))]
        params = SamplingParams(max_tokens=rng.randrange(1, 30))
        pending.append((rng.randrange(40), Sequence(f"s{i}", None, prompt, params, 0.0)))
    finished, step = [], 0
    while pending or sched.has_unfinished():
        for arrival, seq in [p for p in pending if p[0] <= step]:
            sched.add(seq)
            pending.remove((arrival, seq))
        step += 1
        batch = sched.schedule()
        if batch.is_empty:
            continue
        work = [(s, 1) for s in batch.decode] + batch.prefill
        for seq, n in work:
            for j in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                cache[seq.block_table[j // BS] * BS + j % BS] = seq.token_ids[j]
        copied = [cache[s] for s in batch.copy_src]        # gather, then scatter, like torch indexing
        for dst, value in zip(batch.copy_dst, copied):
            cache[dst] = value
        for seq, n in work:
            end = seq.num_computed_tokens + n
            got = [cache[seq.block_table[j // BS] * BS + j % BS] for j in range(end)]
            assert got == seq.token_ids[:end], f"step {step}: {seq} reads wrong tokens"
        sched.finish_step(batch)
        for seq, _ in work:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append((sum(seq.token_ids[-3:]) * 31 + seq.num_tokens) % 50)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq, "length")
                    finished.append(seq)
        holders = {}
        for seq in sched.running:
            for b in seq.block_table:
                holders[b] = holders.get(b, 0) + 1
        bm.take_copies()  # nothing pending between steps
        assert all(bm.blocks[b].ref_count == holders.get(b, 0) for b in range(num_blocks))
        assert all(holders.get(b, 0) == 0 for b in bm._free)
        assert len(bm._free) + len(holders) == num_blocks
        assert all(bm._children.values()) and sum(map(len, bm._children.values())) <= num_blocks
        assert_tables_match(bm.tables, sched.running, [*sched.waiting, *finished])
        assert step < 5000
    assert len(finished) == 24
    assert (sched.num_preemptions > 0) == (num_blocks < 20)
    assert (bm.num_copied_blocks > 0 and bm.num_hit_tokens > 0) == caching
