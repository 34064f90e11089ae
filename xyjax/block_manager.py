"""A fixed pool of KV blocks handed out to requests (host side, plain Python)."""

from __future__ import annotations


class BlockManager:
    """Free list over ``num_blocks`` blocks of ``block_size`` tokens; a block table per request."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table must grow by to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append blocks to ``table`` until it holds ``num_tokens``; False (and no change) if the pool is short."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, table: list[int]) -> None:
        """Return every block of ``table`` to the pool and empty it."""
        self._free.extend(reversed(table))
        table.clear()

