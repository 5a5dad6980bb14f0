"""Kernels behind thin wrappers: Triton on CUDA, a plain-torch twin elsewhere.

``model/`` calls only these wrappers and never branches on the platform. The backend is
chosen per call from the input's device; ``RAYMOE_KERNELS=torch|triton`` forces one (tests
use it to run the Triton kernels under ``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import os

import torch

from kernels import reference
from kernels.reference import FP8_DTYPE, FP8_MAX

__all__ = ["FP8_DTYPE", "FP8_MAX", "act_quant", "weight_dequant", "fp8_gemm", "fp8_linear", "grouped_fp8_gemm",
           "mla_decode", "mla_sparse", "index_scores", "moe_fp8", "backend_for"]


def backend_for(t: torch.Tensor) -> str:
    forced = os.environ.get("RAYMOE_KERNELS", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced:
        raise ValueError(f"RAYMOE_KERNELS={forced!r} is not a backend; use 'torch' or 'triton'")
    return "triton" if t.is_cuda else "torch"


_TRITON_MODULES = {"act_quant": "triton_fp8", "weight_dequant": "triton_fp8", "fp8_gemm": "triton_fp8",
                   "fp8_linear": "triton_fp8", "grouped_fp8_gemm": "triton_fp8", "mla_decode": "triton_mla",
                   "mla_sparse": "triton_mla", "index_scores": "triton_index"}


def _impl(name: str, t: torch.Tensor):
    if backend_for(t) == "triton":
        import importlib

        # lazy: CPU-only machines never import triton
        return getattr(importlib.import_module(f"kernels.{_TRITON_MODULES[name]}"), name)
    return getattr(reference, name)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    return _impl("act_quant", x)(x, block_size, scale_fmt)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    return _impl("weight_dequant", w)(w, s, block_size)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    return _impl("fp8_gemm", a)(a, a_s, b, b_s)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128):
    """A linear layer with a block-FP8 weight, in ``x.dtype``."""
    return _impl("fp8_linear", x)(x, weight, scale_inv, block_size)


def grouped_fp8_gemm(a, a_s, b, b_s, expert_offsets) -> torch.Tensor:
    """Expert-sorted FP8 rows times their experts' FP8 weights in one launch."""
    return _impl("grouped_fp8_gemm", a)(a, a_s, b, b_s, expert_offsets)


def mla_decode(q_lat, q_pe, kv_cache, pe_cache, block_table, seq_lens, softmax_scale: float):
    """Absorbed MLA decode over a paged latent cache; see ``kernels.reference.mla_decode``."""
    return _impl("mla_decode", q_lat)(q_lat, q_pe, kv_cache, pe_cache, block_table, seq_lens, softmax_scale)


def index_scores(q, weights, key_pool, slots, key_scales=None):
    """DeepSeek-V3.2 indexer scores over the paged key cache; see ``kernels.reference.index_scores``."""
    return _impl("index_scores", q)(q, weights, key_pool, slots, key_scales)


def mla_sparse(q_lat, q_pe, kv_pool, pe_pool, slots, softmax_scale: float):
    """Absorbed MLA over each query row's own cache slots (V3.2); see ``kernels.reference.mla_sparse``."""
    return _impl("mla_sparse", q_lat)(q_lat, q_pe, kv_pool, pe_pool, slots, softmax_scale)


from kernels.moe import moe_fp8  # noqa: E402  (built on the wrappers above)
