"""Multi-head Latent Attention (MLA) over a paged cache of compressed latents.

Glossary (names from the DeepSeek-V2/V3 reports and ``config.json``):
- latent ``c_kv``: ``kv_lora_rank`` values per token, the normalised output of ``kv_a_proj_with_mqa``;
- rope key ``k_pe``: the ``qk_rope_head_dim`` rotated key part shared by every head;
- naive path: expand every cached latent through ``kv_b_proj`` into full per-head K and V;
- absorbed path: fold ``kv_b_proj`` into the query (for K) and into the output (for V), so
  attention runs in latent space and the cache is all it reads.

The cache holds per token and layer only ``c_kv`` and ``k_pe``; see ``model.cache``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model.config import ModelArgs
from model.indexer import Indexer, causal_past, whole_past
from model.layers import Linear, RMSNorm
from model.rope import apply_rotary

# the q and kv latents' RMSNorm epsilon, whatever rms_norm_eps says: DeepSeek's code and transformers
# build these two norms with their default, 1e-6
LATENT_NORM_EPS = 1e-6


@dataclass
class AttnMeta:
    """Where a flattened batch's tokens sit: sequences one after another, ``T`` tokens in all.

    ``positions`` [T]: each token's position in its sequence; ``slot_mapping`` [T]: the cache
    slot its latent is written to; ``query_starts`` [B+1]: token offsets of the sequences;
    ``spans``: per sequence, its block table and context length (this step's tokens included);
    ``context_slots`` (built when first read): per sequence, the slots of its positions
    ``0..context_len-1`` in order (this step's tokens last).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_starts: list[int]
    spans: list[tuple[list[int], int]]  # (the blocks holding the context, context length)
    block_size: int = 0
    # steps of a few tokens per sequence (decode, draft verification) also carry the paged view for the
    # batched kernel, one row per query token (its sequence's blocks)
    block_table: torch.Tensor | None = None  # [T, blocks the longest row needs] int32
    seq_lens: torch.Tensor | None = None  # [T] causal context length of each query token (position + 1)
    cos: torch.Tensor | None = None  # [T, rope/2], filled in by the model once per step
    sin: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.spans)

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_starts, self.query_starts[1:], strict=False)]

    @property
    def context_lens(self) -> list[int]:
        return [end for _, end in self.spans]

    @functools.cached_property
    def context_slots(self) -> list[torch.Tensor]:
        device, bs = self.positions.device, self.block_size
        offsets = torch.arange(bs, device=device)
        return [(torch.tensor(table, dtype=torch.long, device=device)[:, None] * bs + offsets).flatten()[:end]
                for table, end in self.spans]


def latent_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the absorbed attention runs in: on a CPU float32 whatever the model's dtype (there,
    bfloat16 batched matmuls this small cost more than the casts, and float32 is the more exact)."""
    return torch.float32 if device.type == "cpu" else dtype


BATCHED_SCORES_MAX = 2**24  # float32 scores (64 MB) a batched prefill attention may hold at once


def batched_fits(meta: AttnMeta, heads: int) -> bool:
    """Whether a step's sequences take one padded batch of attention (``MLA._batched_latent``): the
    padding costs at most 2x the real query x key pairs and the scores fit ``BATCHED_SCORES_MAX``."""
    q_lens, ctx_lens = meta.query_lens, meta.context_lens
    if len(q_lens) < 2:
        return False
    padded = len(q_lens) * max(q_lens) * max(ctx_lens)
    return padded * heads <= BATCHED_SCORES_MAX and padded <= 2 * sum(q * s for q, s in zip(q_lens, ctx_lens,
                                                                                         strict=True))


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, fp8_block=None):
        super().__init__()
        a = args
        self.n_heads = a.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = a.qk_nope_head_dim, a.qk_rope_head_dim
        self.v_head_dim = a.v_head_dim
        self.softmax_scale = a.softmax_scale
        lin = dict(dtype=dtype, fp8_block=fp8_block)
        if a.q_lora_rank:
            self.q_a_proj = Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias, **lin)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(a.q_lora_rank, self.n_heads * a.qk_head_dim, **lin)
        else:
            self.q_proj = Linear(a.hidden_size, self.n_heads * a.qk_head_dim, **lin)
        self.kv_a_proj_with_mqa = Linear(a.hidden_size, a.kv_lora_rank + a.qk_rope_head_dim,
                                         bias=a.attention_bias, **lin)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(a.kv_lora_rank, self.n_heads * (a.qk_nope_head_dim + a.v_head_dim), **lin)
        self.o_proj = Linear(self.n_heads * a.v_head_dim, a.hidden_size, bias=a.attention_bias, **lin)
        # DeepSeek-V3.2: the lightning indexer picks the keys each query attends to (model/indexer.py)
        self.indexer = Indexer(a, dtype, fp8_block) if a.index_topk else None
        self._wkv_b_cache: torch.Tensor | None = None

    def reset_caches(self) -> None:
        self._wkv_b_cache = None

    def wkv_b(self, dtype: torch.dtype) -> torch.Tensor:
        """``kv_b_proj`` as [heads, qk_nope + v, kv_lora_rank] (rows are head-major)."""
        w = self._wkv_b_cache
        if w is None or w.dtype != dtype:
            w = self.kv_b_proj.dense_weight(dtype).view(self.n_heads, -1, self.kv_lora_rank)
            self._wkv_b_cache = w
        return w

    def project(self, x: torch.Tensor, meta: AttnMeta):
        """Queries and this step's latents: q_nope [T,H,nope], q_pe [T,H,rope], c_kv [T,r], k_pe [T,rope],
        and the query latent [T, q_lora_rank] (``None`` without q-lora)."""
        q_latent = None
        if self.q_lora_rank:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        else:
            q = self.q_proj(x)
        q = q.view(x.shape[0], self.n_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary(q_pe, meta.cos, meta.sin)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rotary(k_pe, meta.cos, meta.sin)
        return q_nope, q_pe, c_kv, k_pe, q_latent

    def forward(self, x: torch.Tensor, meta: AttnMeta, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                absorb: bool = True, index_cache: tuple | None = None) -> torch.Tensor:
        """``x`` [T, hidden] -> [T, hidden]; writes this step's latents into the caches
        (``kv_cache`` [slots, kv_lora_rank], ``pe_cache`` [slots, qk_rope_head_dim], and for V3.2
        ``index_cache`` = (keys [slots, index_head_dim], FP8 scales or ``None``)) first."""
        if x.shape[0] == 0:  # a shard with no tokens this step still runs every layer (collectives)
            return x.new_zeros(x.shape)
        q_nope, q_pe, c_kv, k_pe, q_latent = self.project(x, meta)
        kv_cache[meta.slot_mapping] = c_kv.to(kv_cache.dtype)
        pe_cache[meta.slot_mapping] = k_pe.to(pe_cache.dtype)
        masks = None
        if self.indexer is not None:
            if index_cache is None:
                raise ValueError("this layer has a DSA indexer: give it its index_cache (MLACache.ik)")
            masks = self.indexer(x, q_latent, meta, index_cache)
            if all(m is None for m in masks):
                masks = None  # every context fits in index_topk: dense attention is the same
        if absorb:
            dt = latent_dtype(x.device, x.dtype)
            wkv_b = self.wkv_b(dt)
            q_nope, q_pe = q_nope.to(dt), q_pe.to(dt)
            q_lat = torch.bmm(q_nope.transpose(0, 1), wkv_b[:, : self.qk_nope_head_dim]).transpose(0, 1)  # [T, H, r]
            if masks is not None:  # V3.2 past index_topk: every query row over its selected slots, one call
                o_lat = kernels.mla_sparse(q_lat, q_pe, kv_cache, pe_cache, self._selected_slots(meta, masks),
                                           self.softmax_scale)
            elif meta.block_table is not None:
                o_lat = kernels.mla_decode(
                    q_lat, q_pe, kv_cache.view(-1, meta.block_size, self.kv_lora_rank),
                    pe_cache.view(-1, meta.block_size, self.qk_rope_head_dim),
                    meta.block_table, meta.seq_lens, self.softmax_scale)
            elif batched_fits(meta, self.n_heads):
                o_lat = self._batched_latent(q_lat, q_pe, meta, kv_cache, pe_cache)
            else:
                o_lat = self._per_sequence(self._attend_latent, q_lat, q_pe, meta, kv_cache, pe_cache)
            out = torch.bmm(o_lat.transpose(0, 1), wkv_b[:, self.qk_nope_head_dim:].transpose(1, 2))  # [H, T, v]
            out = out.transpose(0, 1).to(x.dtype)
        else:
            out = self._per_sequence(self._attend_naive, q_nope, q_pe, meta, kv_cache, pe_cache, masks)
        return self.o_proj(out.flatten(1))

    def _selected_slots(self, meta: AttnMeta, selections) -> torch.Tensor:
        """[T, index_topk] cache slots per query row (-1: none): the indexer's selection, or the
        whole causal past where the context fits in ``index_topk``."""
        k = self.indexer.topk
        out = torch.full((meta.query_starts[-1], k), -1, dtype=torch.long, device=meta.slot_mapping.device)
        for i, slots in enumerate(meta.context_slots):
            qs, qe = meta.query_starts[i], meta.query_starts[i + 1]
            if qe == qs:
                continue
            sel = selections[i] or whole_past(qe - qs, len(slots), slots.device)  # None: context <= topk
            out[qs:qe, :sel.index.shape[1]] = torch.where(sel.valid, slots[sel.index], -1)
        return out

    @staticmethod
    def _per_sequence(attend, q_a, q_pe, meta, kv_cache, pe_cache, masks=None) -> torch.Tensor:
        out = None
        for i, slots in enumerate(meta.context_slots):
            qs, qe = meta.query_starts[i], meta.query_starts[i + 1]
            if qe == qs:
                continue
            args = (q_a[qs:qe], q_pe[qs:qe], kv_cache[slots].to(q_a.dtype), pe_cache[slots].to(q_a.dtype))
            o = attend(*args) if masks is None else attend(*args, masks[i])  # masks[i]: the indexer's Selection
            if out is None:
                out = q_a.new_zeros(q_a.shape[0], *o.shape[1:])
            out[qs:qe] = o
        return out if out is not None else q_a.new_zeros(q_a.shape[0], q_a.shape[1], 0)

    def _causal_softmax(self, scores: torch.Tensor, selected: torch.Tensor | None = None) -> torch.Tensor:
        # scores [q, H, s]: each query sees its causal past (and of it, with the indexer, only the
        # ``selected`` [q, s] keys)
        visible = causal_past(scores.shape[0], scores.shape[-1], scores.device)
        if selected is not None:
            visible = visible & selected
        scores = scores.float().masked_fill(~visible[:, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def _batched_latent(self, q_lat, q_pe, meta: AttnMeta, kv_cache, pe_cache) -> torch.Tensor:
        """``_attend_latent`` for every sequence of the step at once (prefill chunks): queries padded to
        the longest chunk, contexts to the longest context, one masked batch of matmuls. The latent
        keys are shared by the heads, so each sequence's heads and queries are one [Q*H, r] matrix."""
        device, h = q_lat.device, self.n_heads
        q_lens, ctx_lens = meta.query_lens, meta.context_lens
        n, q_max, s_max = len(q_lens), max(q_lens), max(ctx_lens)
        # padded query j of sequence i: token row query_starts[i] + j (row 0 stands in for padding)
        j = torch.arange(q_max, device=device)
        starts = torch.tensor(meta.query_starts[:-1], device=device)
        lens = torch.tensor(q_lens, device=device)
        real = j[None, :] < lens[:, None]  # [B, Q]
        rows = torch.where(real, starts[:, None] + j[None, :], 0)
        slots = torch.nn.utils.rnn.pad_sequence(meta.context_slots, batch_first=True)  # [B, S], 0-padded
        kv = kv_cache[slots].to(q_lat.dtype)  # [B, S, r]
        pe = pe_cache[slots].to(q_lat.dtype)
        q = q_lat[rows].view(n, q_max * h, -1)
        scores = torch.bmm(q, kv.transpose(1, 2)).baddbmm_(q_pe[rows].view(n, q_max * h, -1), pe.transpose(1, 2))
        # query j of sequence i sits at position ctx - q_len + j and sees keys up to it (padding: key 0)
        q_pos = torch.where(real, torch.tensor(ctx_lens, device=device)[:, None] - lens[:, None] + j[None, :], 0)
        visible = torch.arange(s_max, device=device)[None, None, :] <= q_pos[:, :, None]  # [B, Q, S]
        scores = (scores.view(n, q_max, h, s_max).float() * self.softmax_scale).masked_fill_(
            ~visible[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(q_lat.dtype).view(n, q_max * h, s_max)
        return torch.bmm(probs, kv).view(n, q_max, h, -1)[real]  # [T, H, r]

    def _attend_latent(self, q_lat, q_pe, ctx_kv, ctx_pe):
        """Absorbed form, dense: [q, H, r] queries against [s, r] latents -> [q, H, r] latent outputs
        (with the indexer, the absorbed path reads only the selected slots: ``kernels.mla_sparse``).
        It is multi-query attention with keys ``[c_kv | k_pe]`` and values ``c_kv`` shared by the
        heads: one fused ``scaled_dot_product_attention`` call, no [q, H, s] scores in memory."""
        h, s = q_lat.shape[1], ctx_kv.shape[0]
        q = torch.cat([q_lat, q_pe], dim=-1).transpose(0, 1)  # [H, q, r + rope]
        keys = torch.cat([ctx_kv, ctx_pe], dim=-1).expand(h, s, -1)
        out = F.scaled_dot_product_attention(q, keys, ctx_kv.expand(h, s, -1),
                                             attn_mask=causal_past(q.shape[1], s, q.device), scale=self.softmax_scale)
        return out.transpose(0, 1)

    def _attend_naive(self, q_nope, q_pe, ctx_kv, ctx_pe, selected=None):
        kv = self.kv_b_proj(ctx_kv).view(ctx_kv.shape[0], self.n_heads, -1)  # [s, H, nope + v]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, ctx_pe[:, None, :].expand(-1, self.n_heads, -1)], dim=-1)  # [s, H, qk]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [q, H, qk]
        scores = torch.einsum("qhd,shd->qhs", q, k) * self.softmax_scale
        probs = self._causal_softmax(scores, None if selected is None else selected.mask(k.shape[0])).to(q.dtype)
        return torch.einsum("qhs,shd->qhd", probs, v)
