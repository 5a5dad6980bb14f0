"""Triton lightning-indexer scoring (DeepSeek-V3.2) over the paged key cache.

One program per (query row, block of BLOCK_N slots): the row's H x D queries against the block's
keys (float, or FP8 scaled per 128 values), ReLU, then the per-head weighted sum. Same signature as
``kernels.reference.index_scores``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, slots_ptr, slots_stride, out_ptr, H, D, L, NB,
                         HAS_SCALES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # n * L overflows int32 past 2^31 scores
    nb = tl.program_id(1)
    hh = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    h_mask, d_mask = hh < H, dd < D
    q = tl.load(q_ptr + (n * H + hh[:, None]) * D + dd[None, :], mask=h_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)  # [BH, BD]
    w = tl.load(w_ptr + n * H + hh, mask=h_mask, other=0.0).to(tl.float32)  # [BH]
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + n * slots_stride + cols, mask=cols < L, other=-1).to(tl.int64)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    k = tl.load(k_ptr + slot[:, None] * D + dd[None, :], mask=valid[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)  # [BN, BD]
    if HAS_SCALES:
        s = tl.load(ks_ptr + slot[:, None] * NB + dd[None, :] // 128, mask=valid[:, None] & d_mask[None, :],
                    other=0.0)
        k = k * s
    scores = tl.maximum(tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)  # [BH, BN]; float32, not TF32
    out = tl.sum(scores * w[:, None], axis=0)  # [BN]
    out = tl.where(valid, out, float("-inf"))
    tl.store(out_ptr + n * L + cols, out, mask=cols < L)


def index_scores(q: torch.Tensor, weights: torch.Tensor, key_pool: torch.Tensor, slots: torch.Tensor,
                 key_scales: torch.Tensor | None = None) -> torch.Tensor:
    n, h, d = q.shape
    length = slots.shape[1]
    out = torch.empty(n, length, dtype=torch.float32, device=q.device)
    if n == 0 or length == 0:
        return out
    q = q.float().contiguous()
    weights = weights.float().contiguous()
    keys = key_pool.contiguous()
    if keys.dtype == torch.float8_e4m3fn and not keys.is_cuda:
        keys = keys.float()  # Triton's CPU interpreter has no FP8 loads; on CUDA the kernel reads FP8
    scales = key_scales.contiguous() if key_scales is not None else keys  # a placeholder pointer when absent
    block_h = max(16, triton.next_power_of_2(h))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 32
    grid = (n, triton.cdiv(length, block_n))
    if slots.stride(-1) != 1:
        slots = slots.contiguous()
    # a row stride of 0 (one context's slots expanded to every query) reads the one row, never copied out
    _index_scores_kernel[grid](q, weights, keys, scales, slots, slots.stride(0), out, h, d, length,
                               -(-d // 128), HAS_SCALES=key_scales is not None, BLOCK_H=block_h,
                               BLOCK_D=block_d, BLOCK_N=block_n)
    return out
