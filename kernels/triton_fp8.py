"""Triton FP8 kernels: activation quantisation, weight dequantisation, block-scaled GEMM and the
grouped expert GEMM. Same signatures as the twins in ``kernels.reference``.

FP8 is e4m3 (``tl.float8e4nv`` = ``torch.float8_e4m3fn``). Values are snapped to the e4m3 grid
in float32 (round to nearest even) before the cast: exact on GPU, and it makes Triton's CPU
interpreter, whose own float-to-FP8 cast rounds wrongly, give torch's bits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.reference import FP8_DTYPE

# The CPU interpreter cannot feed FP8 operands to tl.dot (upcast there; FP8 MMA on GPUs), and its
# float32 -> bf16 cast truncates: there GEMMs store float32 and torch rounds to bf16 (to nearest).
_UPCAST_DOT = os.environ.get("TRITON_INTERPRET", "0") == "1"
_GEMM_OUT = torch.float32 if _UPCAST_DOT else torch.bfloat16


@triton.jit
def _snap_e4m3(y):
    """Round float32 ``y`` (|y| <= 448) to the nearest e4m3 value, ties to even."""
    bits = y.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6) - 3  # e4m3: 3 mantissa bits; subnormal spacing 2^-9 below 2^-6
    quantum = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    r = tl.math.div_rn(tl.abs(y), quantum)
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: float32 addition rounds to an integer, ties to even
    snapped = (r * quantum).to(tl.int32, bitcast=True) | (bits & -2147483648)  # keep the sign, -0 too
    return snapped.to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, n_blocks, BLOCK: tl.constexpr, UE8M0: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * K past 2^31 elements stays exact
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    # div_rn: a plain '/' compiles to approximate division on GPUs (the interpreter divides exactly)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4), 448.0)
    if UE8M0:  # round the scale up to a power of two
        bits = s.to(tl.int32, bitcast=True)
        exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (exp << 23).to(tl.float32, bitcast=True)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0)
    tl.store(y_ptr + row * K + offs, _snap_e4m3(y).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * n_blocks + blk, s)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    *lead, k = x.shape
    x2 = x.reshape(-1, k).contiguous()
    n_blocks = triton.cdiv(k, block_size)
    y = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(x2.shape[0], n_blocks, dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _act_quant_kernel[(x2.shape[0], n_blocks)](x2, y, s, k, n_blocks, BLOCK=block_size,
                                                   UE8M0=scale_fmt == "ue8m0")
    return y.view(*lead, k), s.view(*lead, n_blocks)


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, M, N, BLOCK: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BLOCK + tl.arange(0, BLOCK)
    rn = pn * BLOCK + tl.arange(0, BLOCK)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    w = tl.load(w_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pm * tl.cdiv(N, BLOCK) + pn)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], (w * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    m, n = w.shape
    w, s = w.contiguous(), s.contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16, device=w.device)
    _weight_dequant_kernel[(triton.cdiv(m, block_size), triton.cdiv(n, block_size))](w, s, y, m, n,
                                                                                     BLOCK=block_size)
    return y


@triton.jit
def _fp8_gemm_tile(a_ptr, a_s_ptr, b_ptr, b_s_ptr, rows, row_mask, rn, K, N,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, acc):
    """acc [BLOCK_M, BLOCK_N] += sum over K blocks of (a * a_s) @ (b * b_s).T for the given rows."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    for kb in range(0, k_blocks):
        k_mask = kb * BLOCK_K + rk < K
        a = tl.load(a_ptr + rows[:, None] * K + kb * BLOCK_K + rk[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * K + kb * BLOCK_K + rk[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a_s = tl.load(a_s_ptr + rows * k_blocks + kb, mask=row_mask, other=0.0)
        b_s = tl.load(b_s_ptr + (rn // 128) * k_blocks + kb, mask=n_mask, other=0.0)
        if UPCAST:
            partial = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)))
        else:
            partial = tl.dot(a, tl.trans(b))
        acc += partial * a_s[:, None] * b_s[None, :]
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, M, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _fp8_gemm_tile(a_ptr, a_s_ptr, b_ptr, b_s_ptr, rows, row_mask, rn, K, N, BLOCK_N, BLOCK_K, UPCAST, acc)
    tl.store(c_ptr + rows[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (rn[None, :] < N))


def _gemm_blocks(m: int) -> tuple[int, int]:
    if _UPCAST_DOT:
        return 16, 32
    return (64 if m > 32 else 16), 128


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    *lead, k = a.shape
    a2, a_s2 = a.reshape(-1, k).contiguous(), a_s.reshape(-1, a_s.shape[-1]).contiguous()
    m, n = a2.shape[0], b.shape[0]
    c = torch.empty(m, n, dtype=_GEMM_OUT, device=a.device)
    if m:
        bm, bn = _gemm_blocks(m)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _fp8_gemm_kernel[grid](a2, a_s2, b.contiguous(), b_s.contiguous(), c, m, n, k,
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, UPCAST=_UPCAST_DOT)
    return c.view(*lead, n).to(torch.bfloat16)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128):
    a, a_s = act_quant(x, block_size)
    return fp8_gemm(a, a_s, weight, scale_inv).to(x.dtype)


@triton.jit
def _grouped_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                         N, K, b_stride, b_s_stride,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST: tl.constexpr):
    tile = tl.program_id(0)
    pn = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _fp8_gemm_tile(a_ptr, a_s_ptr, b_ptr + expert.to(tl.int64) * b_stride,
                         b_s_ptr + expert.to(tl.int64) * b_s_stride, rows, row_mask, rn, K, N,
                         BLOCK_N, BLOCK_K, UPCAST, acc)
    tl.store(c_ptr + rows[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (rn[None, :] < N))


def grouped_fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                     expert_offsets: torch.Tensor) -> torch.Tensor:
    t, k = a.shape
    e, n, _ = b.shape
    c = torch.empty(t, n, dtype=_GEMM_OUT, device=a.device)
    if t == 0:
        return c.to(torch.bfloat16)
    bm, bn = _gemm_blocks(max(1, t // max(1, e)))
    counts = (expert_offsets[1:] - expert_offsets[:-1]).long()
    tiles = (counts + bm - 1) // bm  # [E]
    tile_expert = torch.repeat_interleave(torch.arange(e, device=a.device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    within = torch.arange(tile_expert.numel(), device=a.device) - first_tile[tile_expert]
    tile_start = expert_offsets[:-1].long()[tile_expert] + within * bm
    tile_end = expert_offsets[1:].long()[tile_expert]
    grid = (tile_expert.numel(), triton.cdiv(n, bn))
    _grouped_gemm_kernel[grid](a.contiguous(), a_s.contiguous(), b.contiguous(), b_s.contiguous(), c,
                               tile_expert, tile_start, tile_end, n, k, n * k, b_s.shape[1] * b_s.shape[2],
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, UPCAST=_UPCAST_DOT)
    return c.to(torch.bfloat16)
