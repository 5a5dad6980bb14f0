"""The routed experts of one MoE layer on block-FP8 weights, through the grouped FP8 GEMM.

Not a kernel itself: it sorts tokens by expert and calls the ``kernels`` wrappers, so the same
code runs the Triton kernels on GPU and their torch twins on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels


def sort_by_expert(indices: torch.Tensor, n_experts: int):
    """Order the ``[T, top_k]`` expert choices by expert: returns ``order`` (positions into the
    flattened choices), ``rows`` (the token of each sorted choice) and ``offsets`` [E+1]."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = counts.cumsum(0)
    return order, order // indices.shape[1], offsets


# what one expert's turn in the per-expert loop costs (about six operations), in flops of padded rows it
# would have to save: ~25 us of dispatch at ~120 GFLOP/s on a CPU core (measured on 2 cores with the
# default model: padded 0.33 / 2.37 / 6.32 ms vs loop 0.37 / 2.39 / 2.24 ms for 128 rows padded 3.9x,
# 4,096 padded 1.1x and 4,096 padded 3x), ~25 us of launches on a GPU at ~400 TFLOP/s
LOOP_EXPERT_FLOPS = {"cpu": 3e6, "cuda": 1e10}


def group_sizes(bounds: list[int]) -> list[int]:
    """Rows per expert from the sorted rows' ``bounds`` (``offsets`` on the host)."""
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def pad_experts(bounds: list[int], hidden: int, inter: int, device: torch.device | str) -> bool:
    """Whether expert-sorted rows (expert ``e`` owns ``bounds[e]..bounds[e+1]-1``) are cheaper as one
    batched matmul per projection over every expert padded to the largest group than as a loop of
    matmuls per expert: when the padding's flops cost less than the loop's extra operations."""
    sizes = group_sizes(bounds)
    padding = len(sizes) * max(sizes, default=0) - sum(sizes)
    busy = sum(1 for s in sizes if s)
    return padding * 6 * hidden * inter <= busy * LOOP_EXPERT_FLOPS.get(torch.device(device).type, 3e6)


def swiglu_sorted(x: torch.Tensor, offsets: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor,
                  down_w: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows ``x`` [N, hidden] through their experts' SwiGLU on float weights
    (``gate_w``/``up_w`` [E, inter, hidden], ``down_w`` [E, hidden, inter]) -> [N, hidden] in ``x.dtype``.

    Three batched matmuls over every expert padded to the largest group where the padding costs
    less than a loop's operations (small batches, which are bound by the operation count), otherwise
    (large or skewed batches, and big experts) one group of matmuls per expert: ``pad_experts``."""
    n, n_experts = x.shape[0], gate_w.shape[0]
    if n == 0:
        return x.new_empty(0, down_w.shape[1])
    bounds = offsets.tolist()
    if pad_experts(bounds, x.shape[1], gate_w.shape[1], x.device):
        counts = offsets.diff()
        cap = max(group_sizes(bounds))
        # slot of each sorted row inside its expert's padded block
        expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts)
        pos = torch.arange(n, device=x.device) - offsets[expert]
        padded = x.new_zeros(n_experts, cap, x.shape[1])
        padded[expert, pos] = x
        h = F.silu(torch.bmm(padded, gate_w.transpose(1, 2))) * torch.bmm(padded, up_w.transpose(1, 2))
        return torch.bmm(h, down_w.transpose(1, 2))[expert, pos]
    y = torch.empty(n, down_w.shape[1], dtype=x.dtype, device=x.device)
    for e in range(n_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = F.linear(F.silu(F.linear(x[lo:hi], gate_w[e])) * F.linear(x[lo:hi], up_w[e]), down_w[e])
    return y


def swiglu_dense(x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, weighted: ``sum_e weights[t, e] * expert_e(x[t])`` -> [T, hidden] in
    ``x.dtype``. ``weights`` [T, E] (zero for experts a row did not choose), ``gate_up`` [E * 2 * inter,
    hidden] (expert e's gate rows, then its up rows), ``down`` [hidden, E * inter].

    Two matmuls whatever the routing: where experts are few against top-k (a small model) computing
    them all costs a few times the useful flops but a handful of operations instead of a sort,
    padding and a matmul per projection, which is what a small batch pays for."""
    t, e = weights.shape
    h = F.linear(x, gate_up).view(t, e, 2, gate_up.shape[0] // (2 * e))
    h = F.silu(h[:, :, 0]) * h[:, :, 1]  # [T, E, inter]
    acc = torch.promote_types(x.dtype, torch.float32)  # weights applied in float32 at least
    h = (h.to(acc) * weights[..., None].to(acc)).to(x.dtype)
    return F.linear(h.view(t, down.shape[1]), down)


def swiglu_fp8_sorted(x: torch.Tensor, offsets: torch.Tensor, gate_w, gate_s, up_w, up_s, down_w, down_s):
    """Expert-sorted rows ``x`` [N, hidden] (rows ``offsets[e]..offsets[e+1]-1`` go to expert ``e``)
    through their experts' SwiGLU on FP8 weights: three grouped GEMM launches. -> [N, hidden] bf16."""
    return swiglu_fp8_quantized(*kernels.act_quant(x), offsets, gate_w, gate_s, up_w, up_s, down_w, down_s)


def swiglu_fp8_quantized(a: torch.Tensor, a_s: torch.Tensor, offsets: torch.Tensor, gate_w, gate_s, up_w, up_s,
                         down_w, down_s):
    """``swiglu_fp8_sorted`` on rows already quantised (``a`` FP8 [N, hidden], ``a_s`` its 1x128
    scales, as ``act_quant`` gives them): what an expert actor receives over an FP8 wire."""
    gate = kernels.grouped_fp8_gemm(a, a_s, gate_w, gate_s, offsets)
    up = kernels.grouped_fp8_gemm(a, a_s, up_w, up_s, offsets)
    h, h_s = kernels.act_quant(F.silu(gate.float()) * up.float())
    return kernels.grouped_fp8_gemm(h, h_s, down_w, down_s, offsets)


def moe_fp8(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            gate_w: torch.Tensor, gate_s: torch.Tensor, up_w: torch.Tensor, up_s: torch.Tensor,
            down_w: torch.Tensor, down_s: torch.Tensor) -> torch.Tensor:
    """``x`` [T, hidden]; ``indices``/``weights`` [T, top_k] (expert ids into the stacked weights,
    multipliers); ``gate_w``/``up_w`` [E, inter, hidden] and ``down_w`` [E, hidden, inter] FP8 with
    their block scales. Returns sum_k weights[t,k] * expert_k(x[t]) as [T, hidden] in ``x.dtype``."""
    order, rows, offsets = sort_by_expert(indices, gate_w.shape[0])
    y = swiglu_fp8_sorted(x[rows], offsets, gate_w, gate_s, up_w, up_s, down_w, down_s)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, rows, y.float() * weights.flatten()[order, None].float())
    return out.to(x.dtype)
