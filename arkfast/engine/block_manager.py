"""The KV block manager: paged blocks, a prefix cache over them, copy-on-write for shared blocks.

Blocks. The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence's ``block_table``
lists its blocks in order; token ``j`` lives in slot ``block_table[j // block_size] * block_size +
j % block_size``. A block carries a reference count (how many sequences hold it) and ``token_ids``, the
tokens whose K/V it holds (or will hold once the current step has run).

Prefix cache. A full block is named by a chained hash, ``h_i = H(h_{i-1}, tokens of block i)`` with
``h_{-1} = ROOT``, so equal hashes mean equal token prefixes (tokens are re-compared on a hit, and H is
128-bit BLAKE2b, so a false hit would need a hash collision in an earlier block of the chain). A new
sequence takes over the longest run of cached full blocks that matches its tokens, then may share one
more block *partially*: any block (full or not) whose parent chain is the same and whose first ``j``
tokens equal its next ``j`` tokens. At most ``num_tokens - 1`` tokens are ever served from the cache:
the last prompt token is always computed, it gives the logits of the first output token.

Blocks whose reference count drops to 0 keep their contents and stay findable; they wait in an LRU
list (a sequence's blocks are released last-block-first, so a prefix outlives its tails) and are
evicted from its front only when a fresh block is needed.

Copy-on-write. Writing into a block that other sequences also hold (a shared partial block: ``n``
identical prompts, or a partial hit), or into a full cached block (those stay immutable), first moves
the writer to a fresh block; the slots before the write position are copied over. Copies are recorded as slot pairs and carried out by the model
runner in every layer right after the step's new K/V are written (the source may be written in the
same step), see :meth:`take_copies`.

Block tables as an array. Besides each sequence's ``block_table`` list, the manager keeps every table in
one int32 array (:class:`BlockTables`, a row per sequence holding blocks, ``-1`` past its last block),
updated wherever a table changes, so that the model runner gathers a step's padded ``[B, W]`` tables
with one index instead of re-padding B Python lists every step.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from array import array

import numpy as np

from .sequence import Sequence

ROOT_HASH = 0


def chain_hash(parent: int, tokens: list[int]) -> int:
    """128-bit hash of ``(parent hash, block tokens)``."""
    digest = hashlib.blake2b(parent.to_bytes(16, "little"), digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


class BlockTables:
    """Every block-holding sequence's ``block_table`` as a row of one int32 array ``[rows, width]``:
    ``array[seq.table_row, :len(seq.block_table)] == seq.block_table`` and ``-1`` after it; a
    sequence without blocks has ``table_row == -1``. Rows and width grow (doubling) on demand. Only
    the :class:`BlockManager` writes it, at the few places a table changes (a block appended, a
    copy-on-write replacing the last block, a prefix match taken over, the sequence freed)."""

    def __init__(self, rows: int = 16, width: int = 16):
        self.array = np.full((rows, width), -1, dtype=np.int32)
        self._free_rows = list(range(rows - 1, -1, -1))  # popped from the end: lowest row first

    def set(self, seq: Sequence, index: int, block_id: int) -> None:
        """``seq.block_table[index] = block_id`` in the array (``index <= len(seq.block_table)``)."""
        if seq.table_row < 0:
            if not self._free_rows:
                rows = len(self.array)
                self.array = np.concatenate([self.array, np.full_like(self.array, -1)])
                self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
            seq.table_row = self._free_rows.pop()
        if index >= self.array.shape[1]:
            width = self.array.shape[1]
            while width <= index:
                width *= 2
            grown = np.full((len(self.array), width), -1, dtype=np.int32)
            grown[:, :self.array.shape[1]] = self.array
            self.array = grown
        self.array[seq.table_row, index] = block_id

    def assign(self, seq: Sequence, blocks: list[int]) -> None:
        """``seq.block_table = blocks`` in the array."""
        if seq.table_row >= 0:
            self.array[seq.table_row] = -1
        for index, block_id in enumerate(blocks):
            self.set(seq, index, block_id)

    def release(self, seq: Sequence) -> None:
        """``seq`` no longer holds blocks: its row is cleared and reused."""
        if seq.table_row >= 0:
            self.array[seq.table_row] = -1
            self._free_rows.append(seq.table_row)
            seq.table_row = -1

    def gather(self, seqs: list[Sequence], width: int) -> np.ndarray:
        """The tables of ``seqs`` (each holding at most ``width`` blocks) as a new ``[len(seqs),
        width]`` int32 array, ``-1`` after each table (a copy: later updates do not reach it)."""
        if width > self.array.shape[1]:
            raise ValueError(f"width {width} is wider than the widest table ({self.array.shape[1]} columns)")
        return self.array[[seq.table_row for seq in seqs], :width]


@dataclasses.dataclass
class Block:
    block_id: int
    ref_count: int = 0
    token_ids: list[int] = dataclasses.field(default_factory=list)
    parent_hash: int | None = None  # chain hash of every block before this one in its sequence
    hash: int | None = None         # set once the block is full (prefix caching on)


@dataclasses.dataclass
class PrefixMatch:
    """Cached blocks a sequence can take over: ``blocks`` cover its first ``num_tokens`` tokens (the
    last block only partly when ``num_tokens`` is not a multiple of the block size)."""

    blocks: list[int]
    num_tokens: int


class BlockManager:
    """Allocates KV blocks to sequences; see the module docstring.

    >>> bm = BlockManager(num_blocks=8, block_size=16)
    >>> seq = Sequence("r0", None, list(range(40)), params=None, arrival_time=0.0)
    >>> bm.allocate(seq, 40, bm.match_prefix(seq)); seq.block_table
    [0, 1, 2]
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.tables = BlockTables()                              # every seq.block_table, as one array
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}                        # full-block hash -> block id
        self._children: dict[int, set[int]] = {}                 # parent hash -> ids of blocks with content
        self._copy_src: dict[int, int] = {}                      # this step's copies: dst slot -> src slot
        self._release_after_step: list[int] = []                 # copy sources nobody holds any more
        self._writes: set[int] = set()                           # blocks written since the last take_copies
        self.last_step_writes: frozenset[int] = frozenset()      # ... as of the last take_copies
        self.num_queried_tokens = 0                              # prompt tokens looked up at admission
        self.num_hit_tokens = 0                                  # of which served from the cache
        self.num_copied_blocks = 0                               # copy-on-write copies made

    # ------------------------------------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some of them still cache a prefix)."""
        return len(self._free)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def block_hash(self, seq: Sequence, index: int) -> int:
        """The chain hash of ``seq``'s full block ``index`` (computed once per sequence and block)."""
        bs = self.block_size
        while len(seq.block_hashes) <= index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return seq.block_hashes[index]

    def _parent_hash(self, seq: Sequence, index: int) -> int:
        return ROOT_HASH if index == 0 else self.block_hash(seq, index - 1)

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """The cached blocks ``seq`` (holding no blocks yet) could start from; commits nothing."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks")
        if not self.enable_prefix_caching:
            return PrefixMatch([], 0)
        bs, tokens = self.block_size, seq.token_ids
        limit = len(tokens) - 1  # the last token is always computed
        blocks: list[int] = []
        while (len(blocks) + 1) * bs <= limit:
            i = len(blocks)
            block_id = self._cached.get(self.block_hash(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tokens[i * bs:(i + 1) * bs]:
                break
            blocks.append(block_id)
        num_tokens = len(blocks) * bs
        # One more block, shared up to the longest common prefix with our next tokens.
        want = tokens[num_tokens:min(limit, num_tokens + bs)]
        best, best_len = None, 0
        for block_id in self._children.get(self._parent_hash(seq, len(blocks)), ()) if want else ():
            have = self.blocks[block_id].token_ids
            n = 0
            for a, b in zip(have, want):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = block_id, n
        if best is not None:
            blocks.append(best)
            num_tokens += best_len
        return PrefixMatch(blocks, num_tokens)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, match: PrefixMatch | None = None) -> int:
        """Free blocks that :meth:`allocate` ``(seq, num_new_tokens, match)`` would take."""
        bs = self.block_size
        if match is not None:
            start = match.num_tokens
            table_len = len(match.blocks)
            revived = sum(1 for b in match.blocks if self.blocks[b].ref_count == 0)
            copy = start % bs != 0 and self._must_copy(self.blocks[match.blocks[-1]], holders=0)
        else:
            start = seq.num_computed_tokens
            table_len = len(seq.block_table)
            revived = 0
            copy = start % bs != 0 and self._must_copy(self.blocks[seq.block_table[-1]], holders=1)
        new = max(0, -(-(start + num_new_tokens) // bs) - table_len)
        return revived + new + int(copy)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, match: PrefixMatch | None = None) -> bool:
        return self.blocks_needed(seq, num_new_tokens, match) <= len(self._free)

    # ------------------------------------------------------------------------------------------------
    # Updates
    # ------------------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, match: PrefixMatch | None = None) -> None:
        """Make room for ``seq``'s next ``num_new_tokens`` tokens (from ``num_computed_tokens`` on).

        With a ``match`` (admission of a sequence that holds no blocks), first take over its blocks and
        set ``num_computed_tokens`` to the matched length. Blocks that become full are entered in the
        prefix cache right away: the step that computes them runs before anyone else can read them, and
        within the step every layer writes all new K/V before any attention reads the cache."""
        if match is None and num_new_tokens == 1 and self.append_token(seq):
            return
        bs = self.block_size
        if not self.can_allocate(seq, num_new_tokens, match):
            raise RuntimeError(f"not enough free KV blocks for {num_new_tokens} tokens of {seq.request_id}")
        if match is not None:
            for block_id in match.blocks:
                self._take(block_id)
            seq.block_table = list(match.blocks)
            self.tables.assign(seq, match.blocks)
            seq.num_computed_tokens = match.num_tokens
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += match.num_tokens
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        if end > seq.num_tokens:
            raise ValueError(f"{seq.request_id}: tokens [{start}, {end}) go past its {seq.num_tokens} tokens")
        if start % bs and self._must_copy(self.blocks[seq.block_table[-1]], holders=1):
            self._copy_on_write(seq, start)
        while len(seq.block_table) * bs < end:
            block = self._fresh_block()
            block.parent_hash = self._parent_hash(seq, len(seq.block_table)) if self.enable_prefix_caching \
                else None
            self.tables.set(seq, len(seq.block_table), block.block_id)
            seq.block_table.append(block.block_id)
        for i in range(start // bs, -(-end // bs)):
            self._write(seq, i, min((i + 1) * bs, end))

    def append_token(self, seq: Sequence) -> bool:
        """Make room for ``seq``'s next token if it fits in the sequence's last block with no block
        taken and nothing copied: the block is not full, no other sequence holds it and it is not
        cached. That is a decode token of almost every decoding sequence in almost every step, so
        the scheduler tries this first; it is what :meth:`allocate` ``(seq, 1)`` does then, without
        the general checks (:meth:`blocks_needed` would find 0 blocks needed). Returns whether it
        did; when not, nothing changed."""
        bs, start, table = self.block_size, seq.num_computed_tokens, seq.block_table
        if not start % bs or start >= len(seq.token_ids) or len(table) != start // bs + 1:
            return False
        block = self.blocks[table[-1]]
        if block.ref_count != 1 or block.hash is not None:
            return False
        self._write(seq, len(table) - 1, start + 1)
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (last block first, so prefixes stay cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released more often than taken"
            if block.ref_count == 0:
                self._free[block_id] = None
                if not block.token_ids:  # nothing worth keeping: reuse it first
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        self.tables.release(seq)
        seq.num_computed_tokens = 0

    def take_copies(self) -> tuple[list[int], list[int]]:
        """``(src_slots, dst_slots)`` of the copy-on-write copies recorded since the last call: slot
        ``dst_slots[i]`` must receive ``src_slots[i]``'s K/V in every layer, after the step's writes.
        No source is also a destination (chains within a step are resolved to their origin). Call it
        once per step, after the step's last allocation."""
        pairs, self._copy_src = self._copy_src, {}
        self.last_step_writes, self._writes = frozenset(self._writes), set()
        for block_id in self._release_after_step:  # the step's allocations are done: free copy sources
            if self.blocks[block_id].ref_count == 0:
                self._free[block_id] = None
        self._release_after_step = []
        return list(pairs.values()), list(pairs.keys())

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their K/V were computed with weights that are about to change):
        all blocks become empty free blocks. ``RuntimeError`` while a sequence holds blocks."""
        held = [b.block_id for b in self.blocks if b.ref_count]
        if held or self._release_after_step:
            raise RuntimeError(f"cannot reset the prefix cache while {len(held)} block(s) are held by "
                               f"sequences in flight")
        for block in self.blocks:
            block.token_ids, block.parent_hash, block.hash = [], None, None
        self._cached.clear()
        self._children.clear()
        self._copy_src.clear()
        self._writes.clear()
        self.last_step_writes = frozenset()
        self._free = collections.OrderedDict.fromkeys(range(len(self.blocks)))

    def forget_step_writes(self) -> None:
        """Drop what the last scheduled step's writes told the cache (call when that step never ran,
        after freeing its sequences): its blocks' K/V were never computed, so they must be neither
        hit nor shared. They become empty free blocks, reused first."""
        for block_id in self.last_step_writes:
            block = self.blocks[block_id]
            if block.ref_count:  # not expected: every writer of the step has been freed
                continue
            if block.hash is not None and self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            siblings = self._children.get(block.parent_hash) if block.parent_hash is not None else None
            if siblings is not None:
                siblings.discard(block_id)
                if not siblings:
                    del self._children[block.parent_hash]
            block.token_ids, block.parent_hash, block.hash = [], None, None
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)
        self.last_step_writes = frozenset()

    # ------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free.pop(block_id, None)  # absent while it waits in _release_after_step
        block.ref_count += 1

    @staticmethod
    def _must_copy(block: Block, holders: int) -> bool:
        """Whether a writer that is one of ``holders`` holders of ``block`` (about to write into its
        middle) must copy it first: when someone else holds it too, or when it is a full cached block,
        which stays immutable so later requests can still hit it."""
        return block.ref_count > holders or block.hash is not None

    def _fresh_block(self) -> Block:
        """Pop the least recently released block, evicting what it cached."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
        siblings = self._children.get(block.parent_hash) if block.parent_hash is not None else None
        if siblings is not None:
            siblings.discard(block_id)
            if not siblings:  # drop the key too: the map stays as small as the cache, not the history
                del self._children[block.parent_hash]
        block.ref_count, block.token_ids, block.parent_hash, block.hash = 1, [], None, None
        return block

    def _copy_on_write(self, seq: Sequence, start: int) -> None:
        """Move ``seq``'s shared last block to a fresh one holding copies of its first slots."""
        bs = self.block_size
        old = self.blocks[seq.block_table[-1]]
        new = self._fresh_block()
        new.parent_hash = old.parent_hash
        new.token_ids = seq.token_ids[start - start % bs:start]
        if new.parent_hash is not None:
            self._children.setdefault(new.parent_hash, set()).add(new.block_id)
        for offset in range(start % bs):
            src = old.block_id * bs + offset
            self._copy_src[new.block_id * bs + offset] = self._copy_src.get(src, src)
        self.num_copied_blocks += 1
        old.ref_count -= 1
        if old.ref_count == 0:
            # A cached block revived only to be copied. It is the source of a copy that runs during
            # this step, so it must not be handed out (and overwritten) before the step is over.
            self._release_after_step.append(old.block_id)
        seq.block_table[-1] = new.block_id
        self.tables.set(seq, len(seq.block_table) - 1, new.block_id)

    def _write(self, seq: Sequence, index: int, end: int) -> None:
        """Record that ``seq``'s block ``index`` holds its tokens up to ``end`` (exclusive)."""
        bs = self.block_size
        block = self.blocks[seq.block_table[index]]
        assert block.ref_count == 1 and block.hash is None, \
            f"writing into block {block.block_id} (held {block.ref_count} times, hash {block.hash})"
        block.token_ids = seq.token_ids[index * bs:end]  # a stale tail from an earlier holder is dropped
        self._writes.add(block.block_id)
        if not self.enable_prefix_caching:
            return
        self._children.setdefault(block.parent_hash, set()).add(block.block_id)
        if len(block.token_ids) == bs:
            block.hash = self.block_hash(seq, index)
            self._cached.setdefault(block.hash, block.block_id)
