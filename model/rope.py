"""Rotary position embedding (YaRN or linear scaling), in DeepSeek's interleaved pair layout."""

from __future__ import annotations

import math

import torch

from model.config import ModelArgs, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies ``[qk_rope_head_dim // 2]`` and the cos/sin multiplier."""
    dim, rope = args.qk_rope_head_dim, args.rope
    freqs = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope.type == "linear":  # positions divided by the factor
        return freqs / rope.factor, 1.0
    if rope.type != "yarn":
        return freqs, 1.0
    orig = rope.original_max_position_embeddings
    low = max(math.floor(_correction_dim(rope.beta_fast, dim, rope.theta, orig)), 0)
    high = min(math.ceil(_correction_dim(rope.beta_slow, dim, rope.theta, orig)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    freqs = freqs / rope.factor * (1 - extrapolate) + freqs * extrapolate
    if rope.attention_factor is not None:  # given outright (transformers reads it first)
        return freqs, rope.attention_factor
    attn_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return freqs, attn_factor


class RotaryEmbedding(torch.nn.Module):
    # positions past max_position_embeddings the table still covers: drafts (at most 8) verified at a
    # sequence's last positions
    MARGIN = 64

    def __init__(self, args: ModelArgs):
        super().__init__()
        freqs, self.attn_factor = inv_freq(args)
        self.register_buffer("inv_freq", freqs, persistent=False)
        self.max_positions = args.max_position_embeddings + self.MARGIN
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [T] -> cos, sin [T, rope_dim // 2] (float32, YaRN multiplier applied), read
        from a table of every position built on first use (two lookups per step instead of six ops)."""
        if self._table is None or self._table[0].device != self.inv_freq.device:
            self._table = self.compute(torch.arange(self.max_positions, device=self.inv_freq.device))
        return self._table[0][positions], self._table[1][positions]

    def compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.attn_factor, angles.sin() * self.attn_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])``. ``x`` [T, ..., rope_dim]; cos/sin [T, rope_dim/2]."""
    shape = [cos.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[1]]
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
