"""Small building blocks: linear layers (bf16 or block FP8), RMSNorm, the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class Linear(nn.Module):
    """``y = x W^T (+ b)`` whose weight is either a float tensor or block-FP8 with
    ``weight_scale_inv`` ([ceil(out/128), ceil(in/128)], float32), as in the checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8_block = fp8_block
        if fp8_block is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
            self.register_parameter("weight_scale_inv", None)
        else:
            bo, bi = fp8_block
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=kernels.FP8_DTYPE),
                                       requires_grad=False)
            self.weight_scale_inv = nn.Parameter(
                torch.empty(-(-out_features // bo), -(-in_features // bi), dtype=torch.float32),
                requires_grad=False,
            )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            y = F.linear(x, self.weight)
        else:
            y = kernels.fp8_linear(x, self.weight, self.weight_scale_inv, self.fp8_block[0])
        return y if self.bias is None else y + self.bias

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense ``dtype`` matrix (dequantised when FP8)."""
        if self.weight_scale_inv is None:
            return self.weight.to(dtype)
        return kernels.reference.weight_dequant_float(self.weight, self.weight_scale_inv,
                                                      self.fp8_block[0]).to(dtype)

    def extra_repr(self) -> str:
        kind = "fp8" if self.fp8_block else str(self.weight.dtype)
        return f"{self.in_features} -> {self.out_features}, {kind}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, the fused form: returns ``(norm(x + residual), x + residual)``."""
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # the arithmetic of x * rsqrt(mean(x^2) + eps) in float32, fused in one operation
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, fp8_block=None):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, dtype=dtype, fp8_block=fp8_block)
        self.up_proj = Linear(dim, inter_dim, dtype=dtype, fp8_block=fp8_block)
        self.down_proj = Linear(inter_dim, dim, dtype=dtype, fp8_block=fp8_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
