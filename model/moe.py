"""The gate (router scores and top-k) and the Mixture-of-Experts layer.

Logical expert: index ``0..n_routed_experts-1`` as in the checkpoint. The gate picks logical
experts; where a logical expert lives (which physical replica on which expert actor) is the
cluster's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model.config import ModelArgs
from model.layers import MLP


class Routing(NamedTuple):
    weights: torch.Tensor  # [T, top_k] float32: the routed experts' output multipliers
    indices: torch.Tensor  # [T, top_k] int64: logical expert ids


class Gate(nn.Module):
    """Scores (softmax or sigmoid), group-limited top-k, bias for selection only, weights.

    Follows the config as written: ``noaux_tc`` adds ``e_score_correction_bias`` for selection and
    scores a group by the sum of its two best biased scores; ``group_limited_greedy`` scores a group
    by its best score; ``greedy`` ignores groups. Weights are the unbiased scores of the chosen
    experts, renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size), requires_grad=False)
        if args.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> Routing:
        a = self.args
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1) if a.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if a.topk_method != "greedy" and a.n_group > 1:
            grouped = choice.view(x.shape[0], a.n_group, a.n_routed_experts // a.n_group)  # [T, G, E/G]
            if a.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(a.topk_group, dim=-1).indices  # [T, topk_group]
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        indices = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if a.norm_topk_prob and a.num_experts_per_tok > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * a.routed_scaling_factor, indices)


def run_experts(x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
    """Sum of ``weight * expert(x)`` over each token's routed experts; ``experts[i]`` is a callable
    for logical expert ``i`` (only the ones hit are called)."""
    y = torch.zeros_like(x, dtype=torch.float32)
    flat = routing.indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    token_of = order // routing.indices.shape[1]
    w_sorted = routing.weights.flatten()[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        out = experts[e](x[rows])
        y.index_add_(0, rows, out.float() * w_sorted[start:start + n, None])
        start += n
    return y.to(x.dtype)


class ExpertBank:
    """Routed experts' weights for a set of physical slots, stacked per projection: ``gate``/``up``
    [S, moe_inter, hidden] and ``down`` [S, hidden, moe_inter], float or FP8 with block scales.
    A slot holds one logical expert (or nothing yet: a spare slot for a replica)."""

    PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, weights: dict[str, torch.Tensor], scales: dict[str, torch.Tensor] | None = None):
        self.weights, self.scales = weights, scales

    @property
    def fp8(self) -> bool:
        return self.scales is not None

    @property
    def num_slots(self) -> int:
        return self.weights["gate_proj"].shape[0]

    @classmethod
    def load(cls, reader, layer_id: int, logical: list[int | None], args: ModelArgs, dtype: torch.dtype,
             device: str | torch.device = "cpu") -> ExpertBank:
        """Read the experts ``logical[slot]`` of MoE layer ``layer_id`` (``None``: an empty spare slot)."""
        fp8 = args.quant is not None
        names = []
        for e in logical:
            if e is not None:
                base = f"model.layers.{layer_id}.mlp.experts.{e}."
                names += [base + p + ".weight" for p in cls.PROJ]
                names += [base + p + ".weight_scale_inv" for p in cls.PROJ] if fp8 else []
        t = reader.read(names, device=device)
        weights, scales = {}, {}
        shapes = {"gate_proj": (args.moe_intermediate_size, args.hidden_size),
                  "up_proj": (args.moe_intermediate_size, args.hidden_size),
                  "down_proj": (args.hidden_size, args.moe_intermediate_size)}
        for p, (o, i) in shapes.items():
            w_dtype = torch.float8_e4m3fn if fp8 else dtype
            weights[p] = torch.zeros(len(logical), o, i, dtype=w_dtype, device=device)
            scales[p] = torch.zeros(len(logical), -(-o // 128), -(-i // 128), dtype=torch.float32, device=device)
            for slot, e in enumerate(logical):
                if e is None:
                    continue
                base = f"model.layers.{layer_id}.mlp.experts.{e}.{p}."
                weights[p][slot] = t[base + "weight"].to(w_dtype)
                if fp8:
                    scales[p][slot] = t[base + "weight_scale_inv"]
        return cls(weights, scales if fp8 else None)

    def forward_sorted(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows sorted by slot (``offsets`` [S+1]) through their slot's SwiGLU expert -> [N, hidden]."""
        w = self.weights
        if self.fp8:
            s = self.scales
            return kernels.moe.swiglu_fp8_sorted(x, offsets, w["gate_proj"], s["gate_proj"], w["up_proj"],
                                                 s["up_proj"], w["down_proj"], s["down_proj"]).to(x.dtype)
        y = torch.empty(x.shape[0], w["down_proj"].shape[1], dtype=x.dtype, device=x.device)
        bounds = offsets.tolist()
        for slot in range(self.num_slots):
            lo, hi = bounds[slot], bounds[slot + 1]
            if hi > lo:
                h = F.silu(F.linear(x[lo:hi], w["gate_proj"][slot])) * F.linear(x[lo:hi], w["up_proj"][slot])
                y[lo:hi] = F.linear(h, w["down_proj"][slot])
        return y


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, fp8_block=None, routed_experts: bool = True):
        super().__init__()
        self.fp8 = fp8_block is not None
        self._stacked: tuple[torch.Tensor, ...] | None = None
        # set by the cluster's attention shard: sends the routed part to the expert actors
        self.remote_experts: Callable[[torch.Tensor, Routing], torch.Tensor] | None = None
        self.gate = Gate(args)
        self.experts = nn.ModuleList(
            MLP(args.hidden_size, args.moe_intermediate_size, dtype, fp8_block)
            for _ in range(args.n_routed_experts if routed_experts else 0)
        )
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, dtype, fp8_block)
            if args.n_shared_experts else None
        )

    def stacked_fp8(self) -> tuple[torch.Tensor, ...]:
        """The routed experts' FP8 weights and scales stacked per projection, for the grouped GEMM:
        gate [E, inter, hidden], its scales, up, its scales, down [E, hidden, inter], its scales."""
        if self._stacked is None:
            parts = []
            for proj in ("gate_proj", "up_proj", "down_proj"):
                linears = [getattr(e, proj) for e in self.experts]
                parts += [torch.stack([lin.weight for lin in linears]),
                          torch.stack([lin.weight_scale_inv for lin in linears])]
            self._stacked = tuple(parts)
        return self._stacked

    def reset_caches(self) -> None:
        self._stacked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.gate(x)
        if self.remote_experts is not None:
            y = self.remote_experts(x, routing)
        elif self.fp8:
            y = kernels.moe_fp8(x, routing.indices, routing.weights, *self.stacked_fp8())
        else:
            y = run_experts(x, routing, self.experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
