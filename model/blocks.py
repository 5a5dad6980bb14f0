"""Block accounting for the paged MLA cache, in pure Python (no torch): the scheduler plans with
it and the single-process generator allocates with it.

A sequence owns a list of blocks (its block table); the token at position ``p`` lives in slot
``table[p // block_size] * block_size + p % block_size`` of every layer's pool.
"""

from __future__ import annotations


class CacheFullError(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq_id: int, new_len: int) -> int:
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-new_len // self.block_size) - have)

    def can_grow(self, seq_id: int, new_len: int) -> bool:
        return self.blocks_needed(seq_id, new_len) <= self.num_free

    def grow(self, seq_id: int, new_len: int) -> None:
        """Make room for positions ``0..new_len-1`` of ``seq_id``."""
        need = self.blocks_needed(seq_id, new_len)
        if need > self.num_free:
            raise CacheFullError(f"cache full: sequence {seq_id} needs {need} blocks, {self.num_free} free")
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))
        self.lengths[seq_id] = max(self.lengths.get(seq_id, 0), new_len)

    def trim(self, seq_id: int, length: int) -> None:
        """Give back the blocks of ``seq_id`` past position ``length - 1`` (room held ahead)."""
        table = self.tables.get(seq_id)
        if table is None:
            return
        keep = -(-length // self.block_size)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self.lengths[seq_id] = min(self.lengths.get(seq_id, 0), length)

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
