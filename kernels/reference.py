"""Plain-torch twins of the kernels: the CPU path and the oracle for the Triton versions.

Every function here has the same signature as its Triton counterpart in ``kernels/triton_*``.
FP8 is ``torch.float8_e4m3fn`` (largest finite value 448); CPU torch only casts to and from it,
so all arithmetic is done after an upcast to float32.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def _round_scale_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two (DeepSeek-V3.1 ``ue8m0`` scales),
    exactly: bump the exponent when any mantissa bit is set."""
    bits = s.float().contiguous().view(torch.int32)
    exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    """Quantise ``x`` in groups of ``block_size`` along the last dim to FP8.

    Returns ``(y, s)``: ``y`` float8_e4m3fn of ``x.shape``, ``s`` float32 of
    ``[*x.shape[:-1], ceil(x.shape[-1] / block_size)]`` with ``x ~= y * s`` per group.
    """
    *lead, k = x.shape
    n_blocks = -(-k // block_size)
    pad = n_blocks * block_size - k
    xf = torch.nn.functional.pad(x.float(), (0, pad)).view(*lead, n_blocks, block_size)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)  # [*lead, n_blocks, 1]
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = _round_scale_ue8m0(s)
    y = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    y = y.view(*lead, n_blocks * block_size)[..., :k].contiguous()
    return y, s.squeeze(-1)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """``w`` [out, in] FP8 times its block scales ``s`` [ceil(out/bs), ceil(in/bs)] -> bfloat16."""
    return weight_dequant_float(w, s, block_size).to(torch.bfloat16)


def weight_dequant_float(w: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """As ``weight_dequant`` but float32: the exact product, before any rounding to bf16."""
    out_f, in_f = w.shape
    scale = s.float().repeat_interleave(block_size, 0)[:out_f].repeat_interleave(block_size, 1)[:, :in_f]
    return w.float() * scale


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """``a`` [..., K] FP8 with 1x128 scales ``a_s`` [..., ceil(K/128)] times ``b`` [N, K] FP8 with
    128x128 scales ``b_s`` -> ``a @ b.T`` in bfloat16.

    Accumulates in float32 as the kernel does: per 128-wide K block, the dot product of the raw FP8
    values (products of two e4m3 values are exact in float32) times both blocks' scales.
    """
    k, n = a.shape[-1], b.shape[0]
    a_f, b_f = a.float(), b.float()
    b_scale = b_s.float().repeat_interleave(128, 0)[:n]  # [N, ceil(K/128)]
    out = torch.zeros(*a.shape[:-1], n, dtype=torch.float32, device=a.device)
    for kb in range(-(-k // 128)):
        cols = slice(kb * 128, min(k, (kb + 1) * 128))
        out += (a_f[..., cols] @ b_f[:, cols].T) * a_s[..., kb:kb + 1].float() * b_scale[:, kb]
    return out.to(torch.bfloat16)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
               block_size: int = 128) -> torch.Tensor:
    """A linear layer with a block-FP8 weight as DeepSeek runs it: activations quantised per token
    in groups of 128 (``act_quant``), then ``fp8_gemm``; result in ``x.dtype``."""
    a, a_s = act_quant(x, block_size)
    return fp8_gemm(a, a_s, weight, scale_inv).to(x.dtype)


def grouped_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                     expert_offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` [T, K] (FP8, scales [T, ceil(K/128)]) sorted by expert, rows
    ``offsets[e]..offsets[e+1]-1`` belonging to expert ``e``, times that expert's weight ``b[e]``
    ([E, N, K] FP8, scales [E, ceil(N/128), ceil(K/128)]) -> [T, N] bfloat16."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    bounds = expert_offsets.tolist()
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = fp8_gemm(a[lo:hi], a_s[lo:hi], b[e], b_s[e])
    return out


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA attention of one query token per sequence over a paged latent cache.

    ``q_lat`` [B, H, kv_lora_rank] (queries with ``kv_b_proj``'s key half folded in), ``q_pe``
    [B, H, rope]; ``kv_cache`` [blocks, block_size, kv_lora_rank], ``pe_cache`` [blocks, block_size,
    rope]; ``block_table`` [B, blocks] int (every block is read: as wide as the longest row needs);
    ``seq_lens`` [B] (keys ``0..len-1`` are visible).
    Returns the attention output in latent space, [B, H, kv_lora_rank], in ``q_lat.dtype``.
    """
    (b, n), block_size = block_table.shape, kv_cache.shape[1]
    table = block_table.long()  # every row's blocks; the table is as wide as its longest row needs
    kv = kv_cache[table].view(b, n * block_size, -1).float()  # [B, L, r]: whole blocks, masked below
    pe = pe_cache[table].view(b, n * block_size, -1).float()  # [B, L, rope]
    # plain batched matmuls, not einsum: at decode sizes the per-call overhead is the cost
    scores = torch.bmm(q_lat.float(), kv.transpose(1, 2)).baddbmm_(q_pe.float(), pe.transpose(1, 2))  # [B, H, L]
    beyond = torch.arange(n * block_size, device=q_lat.device) >= seq_lens[:, None]  # [B, L]
    scores = scores.mul_(softmax_scale).masked_fill_(beyond[:, None, :], float("-inf"))
    return torch.bmm(scores.softmax(dim=-1), kv).to(q_lat.dtype)


def mla_sparse(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_pool: torch.Tensor, pe_pool: torch.Tensor,
               slots: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA attention of each query row over its own set of cache slots (DeepSeek-V3.2's
    sparse attention over the keys the indexer selected).

    ``q_lat`` [N, H, kv_lora_rank], ``q_pe`` [N, H, rope]; ``kv_pool`` [slots, kv_lora_rank] and
    ``pe_pool`` [slots, rope] (a layer's whole paged cache, flat); ``slots`` [N, K] int64, the cache
    slots row ``n`` attends to, ``-1`` for none (every row has at least one). Returns [N, H, r] in
    ``q_lat.dtype``.
    """
    valid = slots >= 0
    idx = slots.clamp(min=0)
    kv = kv_pool[idx].float()  # [N, K, r]
    pe = pe_pool[idx].float()  # [N, K, rope]
    scores = (torch.einsum("nhc,nkc->nhk", q_lat.float(), kv)
              + torch.einsum("nhr,nkr->nhk", q_pe.float(), pe)) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("nhk,nkc->nhc", scores.softmax(dim=-1), kv).to(q_lat.dtype)


def index_scores(q: torch.Tensor, weights: torch.Tensor, key_pool: torch.Tensor, slots: torch.Tensor,
                 key_scales: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3.2's lightning-indexer scores over a paged key cache.

    ``q`` [N, H, D] float (queries, already rotated), ``weights`` [N, H] float (per-head weights,
    every scale folded in); ``key_pool`` [slots, D] (float, or FP8 with ``key_scales`` [slots,
    ceil(D/128)]); ``slots`` [N, L] int64, the cache slots each row scores, ``-1`` for none.
    Returns [N, L] float32: ``sum_h weights[n, h] * ReLU(q[n, h] . key[slot])``, ``-inf`` where the
    slot is ``-1``."""
    valid = slots >= 0
    idx = slots.clamp(min=0)
    keys = key_pool[idx].float()  # [N, L, D]
    if key_scales is not None:
        d = keys.shape[-1]
        keys = keys * key_scales[idx].repeat_interleave(128, dim=-1)[..., :d]
    scores = torch.einsum("nhd,nld->nhl", q.float(), keys).relu_()
    out = torch.einsum("nh,nhl->nl", weights.float(), scores)
    return out.masked_fill(~valid, float("-inf"))
