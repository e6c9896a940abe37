"""The paged KV cache's bookkeeping: blocks, block tables, prefix hashes per adapter, reference counts, LRU.

vLLM's paged attention (arXiv:2309.06180) and automatic prefix caching, with no tensors here: the runner holds
the K/V storage, this module says which block holds which positions. The cache is ``num_blocks`` blocks of
``BLOCK_SIZE`` tokens; a sequence's block table maps its position ``p`` to storage slot
``blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE``. Blocks are taken as tokens arrive and returned when
a sequence ends or is preempted, so memory in use follows the tokens in flight, not the worst case.

Home rows, the fast path. The blocks are also seen as a grid of ``rows`` rows of ``row_blocks`` blocks (a row
holds ``max_model_len`` tokens). A sequence admitted with nothing cached gets the lowest row nobody holds, and
while its ``j``-th block is block ``home * row_blocks + j`` (``in_home``), its K/V lie at a fixed stride from
its neighbours': the runner then attends to a whole batch of them through one strided view, with no gather
(paged_attention.py). Every other sequence, one past the rows or one whose home block was taken, reads
through its block table with a gather. Blocks not claimed by a home go to any sequence, highest id first, so
low rows stay free for homes.

Prefix caching, per adapter. A full block is named by ``sha256(parent hash, adapter key, its tokens)``: the
same tokens under another adapter (other K/V) or after another prefix get another name. A request whose
prompt starts with named blocks takes them (a reference each) and prefills only the rest; at most
``(length - 1) // BLOCK_SIZE`` blocks, so the last prompt token is always computed and yields the logits to
sample. A block whose last reference goes keeps its name and waits, least recently freed first (a sequence's
tail first), until a block is needed and none is free. ``invalidate(key)`` forgets an adapter's blocks.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from typing import Protocol

BLOCK_SIZE = 16


def blocks_for(tokens: int) -> int:
    """Blocks that hold ``tokens`` positions."""
    return -(-tokens // BLOCK_SIZE)


def block_hash(parent: bytes, adapter_key: int, tokens: list[int]) -> bytes:
    """The name of a full block: its tokens, the block before it, and the adapter whose K/V it holds."""
    return hashlib.sha256(parent + adapter_key.to_bytes(8, "little", signed=True)
                          + array("q", tokens).tobytes()).digest()


class BlockTable(Protocol):
    """What the pool keeps on a sequence (scheduler.Sequence has these fields)."""

    blocks: list[int]  # its block table
    hashes: list[bytes]  # names of its leading full blocks, in order
    home: int | None  # its home row
    in_home: bool  # every block so far is its home row's


class BlockPool:
    """``num_blocks`` blocks, ``rows`` home rows of ``row_blocks`` each; ``prefix_caching`` names full blocks.

    Counters, as vLLM names them: ``queries`` and ``hits`` (prompt tokens looked up, and found cached),
    ``preemptions`` (kept by the scheduler).
    """

    def __init__(self, num_blocks: int, row_blocks: int, prefix_caching: bool = True) -> None:
        if num_blocks < row_blocks:
            raise ValueError(f"{num_blocks} blocks cannot hold one sequence of {row_blocks} blocks")
        self.num_blocks, self.row_blocks = num_blocks, row_blocks
        self.rows = num_blocks // row_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.name: list[bytes | None] = [None] * num_blocks
        self.adapter_key = [0] * num_blocks
        self.named: dict[bytes, int] = {}  # name -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named, unreferenced; least recently freed first
        self.is_free = bytearray(b"\x01") * num_blocks  # unreferenced and unnamed
        self.free_heap = [-b for b in range(num_blocks)]  # highest id first; entries of taken blocks are skipped
        heapq.heapify(self.free_heap)
        self.free_count = num_blocks
        self.row_refs = [0] * self.rows  # referenced blocks in each row
        self.row_named = [0] * self.rows  # named blocks in each row
        self.row_taken = [False] * self.rows
        self.queries = self.hits = self.preemptions = 0

    # Counts -------------------------------------------------------------------------------------------

    def available(self) -> int:
        """Blocks a sequence can take now: free ones and named ones nobody references."""
        return self.free_count + len(self.evictable)

    def used(self) -> int:
        return self.num_blocks - self.available()

    # Taking and returning -----------------------------------------------------------------------------

    def assign_home(self, seq: BlockTable) -> None:
        """Give ``seq`` a home row, if it can have one. Holding no blocks: a row no sequence holds or
        references, the one with the fewest cached blocks (which it would evict), the lowest of those. Holding
        a cached prefix (``lookup``): the row those blocks lead, if they are its first blocks in order and no
        sequence holds it (usually the row of the request that computed them, since ended), so that its
        decodes too read the cache in place; else none."""
        if seq.blocks:
            row = seq.blocks[0] // self.row_blocks
            first = row * self.row_blocks
            if row < self.rows and not self.row_taken[row] and seq.blocks == list(range(first, first + len(seq.blocks))):
                self.row_taken[row] = True
                seq.home, seq.in_home = row, True
            else:
                seq.home, seq.in_home = None, False
            return
        free = [row for row in range(self.rows) if not self.row_taken[row] and self.row_refs[row] == 0]
        if not free:
            seq.home, seq.in_home = None, False
            return
        row = min(free, key=lambda r: (self.row_named[r], r))
        self.row_taken[row] = True
        seq.home, seq.in_home = row, True

    def grow(self, seq: BlockTable, tokens: int) -> bool:
        """Extend ``seq``'s table to hold ``tokens`` positions; False, taking nothing, if the pool cannot."""
        need = blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.available():
            return False
        for _ in range(need):
            block = None
            if seq.in_home:
                j = len(seq.blocks)
                mine = seq.home * self.row_blocks + j
                if j < self.row_blocks and (self.is_free[mine] or mine in self.evictable):
                    block = self._claim(mine)
                else:
                    seq.in_home = False
            if block is None:
                block = self._pop()
            self._ref(block)
            seq.blocks.append(block)
        return True

    def release(self, seq: BlockTable, spoiled: bool = False) -> list[int]:
        """Return ``seq``'s blocks (tail first, so its tail is evicted first) and its home row; the blocks no
        one references any more. ``spoiled`` (its K/V may hold NaN or infinity): its blocks lose their names
        first, so none is reused for its prefix, and the caller wipes the ones returned."""
        if spoiled:
            for block in seq.blocks:
                if self.name[block] is not None and self.refs[block] == 1:
                    del self.named[self.name[block]]
                    self.name[block] = None
                    self._count_name(block, -1)
        freed = []
        for block in reversed(seq.blocks):
            self._unref(block)
            if self.refs[block] == 0:
                freed.append(block)
        seq.blocks.clear()
        seq.hashes.clear()
        if seq.home is not None:
            self.row_taken[seq.home] = False
        seq.home, seq.in_home = None, False
        return freed

    # Prefix cache -------------------------------------------------------------------------------------

    def lookup(self, seq: BlockTable, tokens: list[int], adapter_key: int) -> int:
        """Take the named blocks ``tokens`` start with into ``seq``'s empty table; the tokens they hold."""
        self.queries += len(tokens)
        parent = b""
        for j in range((len(tokens) - 1) // BLOCK_SIZE):
            name = block_hash(parent, adapter_key, tokens[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE])
            block = self.named.get(name)
            if block is None:
                break
            self.evictable.pop(block, None)
            self._ref(block)
            seq.blocks.append(block)
            seq.hashes.append(name)
            parent = name
        hit = len(seq.blocks) * BLOCK_SIZE
        self.hits += hit
        return hit

    def commit(self, seq: BlockTable, tokens: list[int], computed: int, adapter_key: int) -> None:
        """Name ``seq``'s blocks that are full with ``computed`` positions of ``tokens`` (K/V written)."""
        for j in range(len(seq.hashes), computed // BLOCK_SIZE):
            parent = seq.hashes[-1] if seq.hashes else b""
            name = block_hash(parent, adapter_key, tokens[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE])
            seq.hashes.append(name)
            block = seq.blocks[j]
            if name not in self.named and self.name[block] is None:  # a copy of a named block stays unnamed
                self.named[name] = block
                self.name[block], self.adapter_key[block] = name, adapter_key
                self._count_name(block, 1)

    def invalidate(self, adapter_key: int) -> int:
        """Forget the names of every block computed under ``adapter_key`` (unloaded); how many."""
        gone = [(name, block) for name, block in self.named.items() if self.adapter_key[block] == adapter_key]
        for name, block in gone:
            del self.named[name]
            self.name[block] = None
            self._count_name(block, -1)
            if block in self.evictable:
                del self.evictable[block]
                self._free(block)
        return len(gone)

    # Internals ----------------------------------------------------------------------------------------

    def _ref(self, block: int) -> None:
        self.refs[block] += 1
        row = block // self.row_blocks
        if self.refs[block] == 1 and row < self.rows:
            self.row_refs[row] += 1

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block]:
            return
        row = block // self.row_blocks
        if row < self.rows:
            self.row_refs[row] -= 1
        if self.name[block] is not None:
            self.evictable[block] = None
        else:
            self._free(block)

    def _free(self, block: int) -> None:
        self.is_free[block] = 1
        self.free_count += 1
        heapq.heappush(self.free_heap, -block)
        if len(self.free_heap) > 2 * self.num_blocks:  # entries of blocks claimed as homes pile up: drop them
            self.free_heap = [-b for b in range(self.num_blocks) if self.is_free[b]]
            heapq.heapify(self.free_heap)

    def _claim(self, block: int) -> int:
        """Take this unreferenced block: free, or named (forgetting its name)."""
        if self.is_free[block]:
            self.is_free[block] = 0
            self.free_count -= 1
        else:
            self._evict(block)
        return block

    def _pop(self) -> int:
        """A free block, highest id first, else the least recently freed named one."""
        while self.free_count:
            block = -heapq.heappop(self.free_heap)
            if self.is_free[block]:
                self.is_free[block] = 0
                self.free_count -= 1
                return block
        block = next(iter(self.evictable))
        self._evict(block)
        return block

    def _evict(self, block: int) -> None:
        del self.evictable[block]
        del self.named[self.name[block]]
        self.name[block] = None
        self._count_name(block, -1)

    def _count_name(self, block: int, change: int) -> None:
        row = block // self.row_blocks
        if row < self.rows:
            self.row_named[row] += change
