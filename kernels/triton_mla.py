"""Triton MLA decode: absorbed attention of one query per sequence over the paged latent cache.

One program per (sequence, group of BLOCK_H heads) streams the sequence's cached latents and
rope keys block by block with an online softmax (running max and sum in float32), so any
sequence length works in fixed registers. Same signature as ``kernels.reference.mla_decode``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 operands multiply in full float32 ("ieee"), as the
    torch twins do; Triton's default on GPUs, TF32, keeps 10 mantissa bits (about 3e-4 off on MLA's
    scores). Other dtypes are unaffected by it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _load_queries(q_ptr, qpe_ptr, row, heads, h_mask, rr, rp, r_mask, p_mask, H, R, P):
    """A query row's latent and rope parts for the heads [BH]: [BH, R] and [BH, P]."""
    q = tl.load(q_ptr + (row * H + heads[:, None]) * R + rr[None, :],
                mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    qpe = tl.load(qpe_ptr + (row * H + heads[:, None]) * P + rp[None, :],
                  mask=h_mask[:, None] & p_mask[None, :], other=0.0)
    return q, qpe


@triton.jit
def _attend_block(q, qpe, kv_ptr, pe_ptr, slot, n_mask, rr, rp, r_mask, p_mask, R, P, scale, m_i, l_i, acc,
                  DOT: tl.constexpr):
    """Load the cache ``slot``s [BN] (latents [BN, R], rope keys [BN, P]) and fold them into the
    running softmax of the heads (``_online_softmax_step``)."""
    kv = tl.load(kv_ptr + slot[:, None] * R + rr[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    pe = tl.load(pe_ptr + slot[:, None] * P + rp[None, :], mask=n_mask[:, None] & p_mask[None, :], other=0.0)
    return _online_softmax_step(q, qpe, kv, pe, n_mask, scale, m_i, l_i, acc, DOT)


@triton.jit
def _online_softmax_step(q, qpe, kv, pe, n_mask, scale, m_i, l_i, acc, DOT: tl.constexpr):
    """One block of keys [BN] into the running max ``m_i``, sum ``l_i`` and output ``acc`` of the
    heads [BH]; a block whose keys are all masked (``n_mask`` false) changes nothing, even first.
    ``DOT``: the matmuls' input precision (``dot_precision``)."""
    s = (tl.dot(q, tl.trans(kv), input_precision=DOT).to(tl.float32)
         + tl.dot(qpe, tl.trans(pe), input_precision=DOT).to(tl.float32))
    s = tl.where(n_mask[None, :], s * scale, float("-inf"))  # [BH, BN]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: exp(-inf) = 0, not NaN
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    pv = tl.dot(p.to(kv.dtype), kv, input_precision=DOT).to(tl.float32)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + pv


@triton.jit
def _mla_decode_kernel(q_ptr, qpe_ptr, kv_ptr, pe_ptr, bt_ptr, lens_ptr, out_ptr,
                       H, R, P, bt_stride, block_size, scale,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr, DOT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements stay exact
    hg = tl.program_id(1)
    heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < H
    rr = tl.arange(0, BLOCK_R)
    rp = tl.arange(0, BLOCK_P)
    r_mask, p_mask = rr < R, rp < P
    q, qpe = _load_queries(q_ptr, qpe_ptr, b, heads, h_mask, rr, rp, r_mask, p_mask, H, R, P)
    seq_len = tl.load(lens_ptr + b)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        n_mask = pos < seq_len
        blk = tl.load(bt_ptr + b * bt_stride + pos // block_size, mask=n_mask, other=0)
        slot = blk.to(tl.int64) * block_size + pos % block_size
        m_i, l_i, acc = _attend_block(q, qpe, kv_ptr, pe_ptr, slot, n_mask, rr, rp, r_mask, p_mask, R, P, scale,
                                      m_i, l_i, acc, DOT)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (b * H + heads[:, None]) * R + rr[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & r_mask[None, :])


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    b, h, r = q_lat.shape
    p = q_pe.shape[-1]
    block_size = kv_cache.shape[1]
    q_lat = q_lat.contiguous()
    out = torch.empty(b, h, r, dtype=q_lat.dtype, device=q_lat.device)
    q_pe = q_pe.contiguous().to(q_lat.dtype)
    kv_cache, pe_cache = kv_cache.contiguous(), pe_cache.contiguous()
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    block_h = 16
    block_r = max(16, triton.next_power_of_2(r))
    block_p = max(16, triton.next_power_of_2(p))
    block_n = 64 if block_r <= 128 else 32
    grid = (b, triton.cdiv(h, block_h))
    _mla_decode_kernel[grid](q_lat, q_pe, kv_cache.to(q_lat.dtype), pe_cache.to(q_lat.dtype), block_table,
                             seq_lens, out, h, r, p, block_table.stride(0), block_size, softmax_scale,
                             BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=block_p,
                             DOT=dot_precision(q_lat.dtype))
    return out


@triton.jit
def _mla_sparse_kernel(q_ptr, qpe_ptr, kv_ptr, pe_ptr, slots_ptr, out_ptr, H, R, P, K, scale,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr, DOT: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    hg = tl.program_id(1)
    heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < H
    rr = tl.arange(0, BLOCK_R)
    rp = tl.arange(0, BLOCK_P)
    r_mask, p_mask = rr < R, rp < P
    q, qpe = _load_queries(q_ptr, qpe_ptr, n, heads, h_mask, rr, rp, r_mask, p_mask, H, R, P)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for start in range(0, K, BLOCK_N):
        k = start + tl.arange(0, BLOCK_N)
        slot = tl.load(slots_ptr + n * K + k, mask=k < K, other=-1).to(tl.int64)
        n_mask = slot >= 0
        slot = tl.where(n_mask, slot, 0)
        m_i, l_i, acc = _attend_block(q, qpe, kv_ptr, pe_ptr, slot, n_mask, rr, rp, r_mask, p_mask, R, P, scale,
                                      m_i, l_i, acc, DOT)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (n * H + heads[:, None]) * R + rr[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & r_mask[None, :])


def mla_sparse(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_pool: torch.Tensor, pe_pool: torch.Tensor,
               slots: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Sparse absorbed MLA over each row's own cache slots; same signature as
    ``kernels.reference.mla_sparse``. A block of selected slots whose first entries are all -1
    contributes nothing (its scores are -inf), wherever it is in the row; every row has at least one
    valid slot."""
    n, h, r = q_lat.shape
    p = q_pe.shape[-1]
    k = slots.shape[1]
    q_lat = q_lat.contiguous()
    out = torch.empty(n, h, r, dtype=q_lat.dtype, device=q_lat.device)
    q_pe = q_pe.contiguous().to(q_lat.dtype)
    block_h = 16
    block_r = max(16, triton.next_power_of_2(r))
    block_p = max(16, triton.next_power_of_2(p))
    block_n = 64 if block_r <= 128 else 32
    grid = (n, triton.cdiv(h, block_h))
    _mla_sparse_kernel[grid](q_lat, q_pe, kv_pool.contiguous().to(q_lat.dtype), pe_pool.contiguous().to(q_lat.dtype),
                             slots.contiguous(), out, h, r, p, k, softmax_scale,
                             BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=block_p,
                             DOT=dot_precision(q_lat.dtype))
    return out
