"""DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention, DSA).

For every query token it scores the tokens of the causal past and keeps the ``index_topk`` best;
MLA then attends to those only. Per layer (names as in the checkpoint, ``self_attn.indexer.*``):

- indexer queries: ``wq_b`` on the query latent ``q_a_layernorm(q_a_proj(x))``, ``index_n_heads``
  heads of ``index_head_dim``;
- indexer key: ``k_norm(wk(x))`` (a LayerNorm with bias), one per token, shared by the heads, cached
  next to the MLA latent (``MLACache.ik``);
- RoPE on the first ``qk_rope_head_dim`` dims of both, in the **half-split** layout: dim ``i`` pairs
  with dim ``i + rope/2`` (MLA pairs neighbours; mixing the two up loses accuracy);
- score of key ``s`` for query ``t``: ``sum_h weights_proj(x_t)_h * n_heads^-0.5 * softmax_scale *
  ReLU(q_th . k_s)``, with ``softmax_scale = index_head_dim^-0.5``.

Two paths, chosen by ``ModelArgs.index_fp8`` (``load_model(..., index_fp8=True)``, the layout's
``index_fp8``): the exact one scores in float (as transformers does); the FP8 one does what DeepSeek's
kernels do: q and k are rotated by a normalised Hadamard matrix (it keeps dot products and spreads
outliers), quantised to FP8 e4m3 in blocks of 1x128 with float32 scales, and the keys are cached that
way (``MLACache.ik`` in FP8, ``MLACache.iks`` the scales); scores are then taken on the FP8 values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import kernels
from model.config import ModelArgs
from model.layers import Linear


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (the indexer's ``k_norm``), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split pairs ``(x[i], x[i + d/2])``. ``x`` [T, ..., d]; cos/sin [T, d/2]."""
    shape = [cos.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[1]]
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float()
    x1, x2 = xf[..., : cos.shape[-1]], xf[..., cos.shape[-1]:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, fp8_block=None):
        super().__init__()
        if not args.q_lora_rank:
            raise ValueError("the DSA indexer reads the query latent: deepseek_v32 needs q_lora_rank > 0")
        if args.index_head_dim < args.qk_rope_head_dim:
            raise ValueError(f"index_head_dim ({args.index_head_dim}) must be at least qk_rope_head_dim "
                             f"({args.qk_rope_head_dim})")
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.rope_dim = args.qk_rope_head_dim
        self.softmax_scale = self.head_dim ** -0.5
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, dtype=dtype, fp8_block=fp8_block)
        self.wk = Linear(args.hidden_size, self.head_dim, dtype=dtype, fp8_block=fp8_block)
        self.k_norm = LayerNorm(self.head_dim, 1e-6, dtype)
        # never FP8, and float32 whatever the model dtype (as transformers keeps it): it weighs the heads
        self.weights_proj = Linear(args.hidden_size, self.n_heads, dtype=torch.float32)
        self.fp8 = args.index_fp8
        self.scale_fmt = args.quant.scale_fmt if args.quant else None
        if self.fp8 and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"the FP8 indexer rotates by a Hadamard matrix: index_head_dim ({self.head_dim}) "
                             "must be a power of two")
        self._hadamard: torch.Tensor | None = None

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` [..., D] times the normalised Sylvester-Hadamard matrix (orthogonal and symmetric)."""
        h = self._hadamard
        if h is None or h.device != t.device:
            h = torch.ones(1, 1)
            while h.shape[0] < self.head_dim:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            h = self._hadamard = (h / self.head_dim ** 0.5).to(t.device)
        return t.float() @ h

    def quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated and quantised: FP8 values [..., D] and float32 scales [..., ceil(D/128)]."""
        return kernels.act_quant(self.rotate(t).contiguous(), 128, self.scale_fmt)

    @staticmethod
    def dequantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        d = values.shape[-1]
        return values.float() * scales.repeat_interleave(128, dim=-1)[..., :d]

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rotary_half(rot, cos, sin), rest], dim=-1)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, meta, index_cache: tuple
                ) -> list[Selection | None]:
        """Writes this step's indexer keys into ``index_cache`` = (keys [slots, index_head_dim], FP8
        scales [slots, blocks] or ``None``); returns per sequence of ``meta`` the keys each query may
        attend to, or ``None`` when the context is no longer than ``index_topk`` (every key is selected)."""
        keys_cache, scales_cache = index_cache
        q = self.wq_b(q_latent).view(x.shape[0], self.n_heads, self.head_dim)
        q = self._rope(q, meta.cos, meta.sin)
        k = self._rope(self.k_norm(self.wk(x)), meta.cos, meta.sin)
        if self.fp8:
            q = self.dequantize(*self.quantize(q))
            k_fp8, k_scale = self.quantize(k)
            keys_cache[meta.slot_mapping] = k_fp8
            scales_cache[meta.slot_mapping] = k_scale
        else:
            keys_cache[meta.slot_mapping] = k.to(keys_cache.dtype)
        weights = self.weights_proj(x.float()) * (self.n_heads ** -0.5 * self.softmax_scale)  # [T, H]
        masks: list[torch.Tensor | None] = []
        for i, slots in enumerate(meta.context_slots):
            qs, qe = meta.query_starts[i], meta.query_starts[i + 1]
            if qe == qs or len(slots) <= self.topk:
                masks.append(None)
                continue
            rows = slots[None, :].expand(qe - qs, -1)  # every query scores the whole context; causality below
            index = kernels.index_scores(q[qs:qe], weights[qs:qe], keys_cache, rows,
                                         scales_cache if self.fp8 else None)  # [q, s]
            masks.append(select_topk(index, self.topk))
        return masks


class Selection(NamedTuple):
    """Per query, the context positions it attends to: ``index`` [q, topk] and ``valid`` [q, topk]
    (False where a query has fewer than ``topk`` keys in its causal past)."""

    index: torch.Tensor
    valid: torch.Tensor

    def mask(self, s_len: int) -> torch.Tensor:
        """The same as a bool mask [q, s_len]."""
        m = torch.zeros(self.index.shape[0], s_len, dtype=torch.bool, device=self.index.device)
        return m.scatter_(1, self.index, self.valid)


def causal_past(q_len: int, s_len: int, device) -> torch.Tensor:
    """[q, s] bool: for the queries at the last ``q`` positions of an ``s``-token context, the keys
    each may see (query ``i`` sits at position ``s - q + i`` and sees keys ``0..s-q+i``)."""
    q_pos = torch.arange(s_len - q_len, s_len, device=device)[:, None]
    return torch.arange(s_len, device=device)[None, :] <= q_pos


def whole_past(q_len: int, s_len: int, device) -> Selection:
    """Every key of each query's causal past (a context no longer than ``index_topk``)."""
    return Selection(torch.arange(s_len, device=device).expand(q_len, -1), causal_past(q_len, s_len, device))


def select_topk(index: torch.Tensor, topk: int) -> Selection:
    """Scores [q, s] of the queries at the last ``q`` positions of an ``s``-token context -> each
    query's ``topk`` best keys among its causal past (all of them when fewer)."""
    past = causal_past(*index.shape, index.device)
    best = index.masked_fill(~past, float("-inf")).topk(min(topk, index.shape[1]), dim=-1).indices
    return Selection(best, past.gather(1, best))
