"""The compressed MLA cache: a pool of fixed-size blocks of token slots, per layer.

Per token and layer the pool keeps the normalised latent (``kv_lora_rank``) and the rotated key
part (``qk_rope_head_dim``), nothing more. Sequences own lists of blocks (their block table);
a token at position ``p`` lives in slot ``table[p // block_size] * block_size + p % block_size``.
``BlockAllocator`` is pure Python so the scheduler can plan with it without torch.
"""

from __future__ import annotations

import torch

from model.attention import AttnMeta
from model.blocks import BlockAllocator
from model.config import ModelArgs

PAGED_ROWS_MAX = 16  # chunks up to this many tokens use the batched paged attention, one row per token


class MLACache:
    """Per-layer latent and rope-key pools: ``kv[layer]`` [slots, kv_lora_rank], ``pe[layer]`` [slots, rope];
    for DeepSeek-V3.2 also the indexer's keys ``ik[layer]`` [slots, index_head_dim] (else ``ik`` is empty)."""

    def __init__(self, args: ModelArgs, num_layers: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        n_slots = num_blocks * block_size
        self.kv = [torch.zeros(n_slots, args.kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pe = [torch.zeros(n_slots, args.qk_rope_head_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)]
        ik_dtype = torch.float8_e4m3fn if args.index_fp8 else dtype
        self.ik = [torch.zeros(n_slots, args.index_head_dim, dtype=ik_dtype, device=device)
                   for _ in range(num_layers)] if args.index_topk else []
        # FP8 indexer keys: one float32 scale per 128 values
        self.iks = [torch.zeros(n_slots, -(-args.index_head_dim // 128), dtype=torch.float32, device=device)
                    for _ in range(num_layers)] if args.index_topk and args.index_fp8 else []
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.device = torch.device(device)

    def index_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """DeepSeek-V3.2: the layer's indexer keys and their FP8 scales (``None`` for other models)."""
        return (self.ik[layer], self.iks[layer] if self.iks else None) if self.ik else None

    @property
    def bytes_per_token(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.kv + self.pe + self.ik + self.iks)

    def build_meta(self, seqs: list[tuple[int, int, int]],
                   tables: dict[int, list[int]] | None = None) -> AttnMeta:
        """``seqs``: ``(seq_id, start, end)`` for each sequence of the step, whose tokens at positions
        ``start..end-1`` are being computed now (after ``start`` tokens already cached). ``tables``:
        block tables decided elsewhere (the cluster's scheduler); without them this cache's own
        allocator grows each sequence as needed."""
        positions, slot_mapping, starts, spans = [], [], [0], []  # per token, per sequence
        if tables is None:
            for seq_id, _, end in seqs:
                self.allocator.grow(seq_id, end)
            tables = self.allocator.tables
        bs = self.allocator.block_size
        for seq_id, start, end in seqs:
            table = tables[seq_id]
            if len(table) * bs < end:
                raise ValueError(f"sequence {seq_id}: block table covers {len(table) * bs} tokens, needs {end}")
            positions += range(start, end)
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]
            starts.append(starts[-1] + end - start)
            spans.append((table[: -(-end // bs)], end))
        # host lists become tensors in one call each: per-sequence tensors cost more than the work
        meta = AttnMeta(torch.tensor(positions, dtype=torch.long, device=self.device),
                        torch.tensor(slot_mapping, dtype=torch.long, device=self.device), starts, spans,
                        block_size=bs)
        if seqs and all(end - start <= PAGED_ROWS_MAX for _, start, end in seqs):
            # decode and verification steps (a few tokens per sequence): every query row gets its own
            # row in the paged view, its sequence's blocks with the causal length of its position
            rows = [tables[seq_id][:p // bs + 1] for seq_id, start, end in seqs for p in range(start, end)]
            width = max(len(t) for t in rows)
            meta.block_table = torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.int32,
                                            device=self.device)
            meta.seq_lens = torch.tensor([p + 1 for _, start, end in seqs for p in range(start, end)],
                                         dtype=torch.long, device=self.device)
        return meta
