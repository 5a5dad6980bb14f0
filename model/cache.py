"""The compressed MLA cache: a pool of fixed-size blocks of token slots, per layer.

Per token and layer the pool keeps the normalised latent (``kv_lora_rank``) and the rotated key
part (``qk_rope_head_dim``), nothing more. Sequences own lists of blocks (their block table);
a token at position ``p`` lives in slot ``table[p // block_size] * block_size + p % block_size``.
``BlockAllocator`` is pure Python so the scheduler can plan with it without torch.
"""

from __future__ import annotations

import torch

from model.attention import AttnMeta
from model.config import ModelArgs


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

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]


class MLACache:
    """Per-layer latent and rope-key pools: ``kv[layer]`` [slots, kv_lora_rank], ``pe[layer]`` [slots, rope]."""

    def __init__(self, args: ModelArgs, num_layers: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        n_slots = num_blocks * block_size
        self.kv = [torch.zeros(n_slots, args.kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pe = [torch.zeros(n_slots, args.qk_rope_head_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.device = torch.device(device)

    @property
    def bytes_per_token(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.kv + self.pe)

    def build_meta(self, seqs: list[tuple[int, int, int]]) -> AttnMeta:
        """``seqs``: ``(seq_id, start, end)`` for each sequence of the step, whose tokens at positions
        ``start..end-1`` are being computed now (after ``start`` tokens already cached)."""
        positions, slot_mapping, starts, ctx = [], [], [0], []
        for seq_id, start, end in seqs:
            self.allocator.grow(seq_id, end)
            slots = self.allocator.slots(seq_id, 0, end)
            positions.extend(range(start, end))
            slot_mapping.extend(slots[start:end])
            starts.append(starts[-1] + end - start)
            ctx.append(torch.tensor(slots, dtype=torch.long, device=self.device))
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)
        meta = AttnMeta(as_long(positions), as_long(slot_mapping), starts, ctx)
        if seqs and all(end - start == 1 for _, start, end in seqs):
            tables = [self.allocator.tables[seq_id] for seq_id, _, _ in seqs]
            width = max(len(t) for t in tables)
            meta.block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                            device=self.device)
            meta.seq_lens = as_long([end for _, _, end in seqs])
            meta.block_size = self.allocator.block_size
        return meta
