"""A fixed pool of reference-counted KV blocks handed out to requests (host side, plain Python)."""

from __future__ import annotations


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` tokens. A request owns a block table (list of block ids); the
    prefix cache owns the blocks it caches. A block with several owners (request tables, the prefix cache)
    returns to the pool when its last owner lets go."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first
        self.refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table must grow by to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append fresh blocks to ``table`` until it holds ``num_tokens``; False (and no change) if the pool is short."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def share(self, table: list[int], blocks: list[int]) -> None:
        """Append already-owned ``blocks`` to ``table`` as one more owner of each."""
        for block in blocks:
            self.ref(block)
            table.append(block)

    def copy_on_write(self, table: list[int]) -> tuple[int, int]:
        """Replace the (shared) last block of ``table`` by a fresh one; returns (source, copy) for the device to
        copy the KV before anyone writes. The caller checks that a block is free."""
        source, table[-1] = table[-1], self._take()
        self.unref(source)
        return source, table[-1]

    def free(self, table: list[int]) -> None:
        """Drop ``table``'s ownership of each of its blocks and empty it."""
        for block in reversed(table):
            self.unref(block)
        table.clear()

    def ref(self, block: int) -> None:
        """One more owner of an owned block."""
        if self.refcount[block] < 1:
            raise ValueError(f"block {block} is free and cannot be shared")
        self.refcount[block] += 1

    def unref(self, block: int) -> None:
        """One owner fewer; the last one returns the block to the pool."""
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)
        elif self.refcount[block] < 0:
            raise AssertionError(f"block {block} freed more times than it was owned")

    def _take(self) -> int:
        block = self._free.pop()
        self.refcount[block] = 1
        return block
