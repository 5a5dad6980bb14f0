"""The gate (router scores and top-k) and the Mixture-of-Experts layer.

Logical expert: index ``0..n_routed_experts-1`` as in the checkpoint. The gate picks logical
experts; where a logical expert lives (which physical replica on which expert actor) is the
cluster's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.moe import sort_by_expert
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
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return route(self.args, logits, self.e_score_correction_bias)


def route(a: ModelArgs, logits: torch.Tensor, bias: torch.Tensor | None) -> Routing:
    """The gate's arithmetic on router ``logits`` [T, E] (see ``Gate``); differentiable in the
    weights, which the training loop relies on."""
    scores = logits.softmax(dim=-1) if a.scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if a.topk_method != "greedy" and a.n_group > 1:
        grouped = choice.view(logits.shape[0], a.n_group, a.n_routed_experts // a.n_group)  # [T, G, E/G]
        if a.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(a.topk_group, dim=-1).indices  # [T, topk_group]
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
    indices = choice.topk(a.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, indices)
    # DeepSeek-V2's code skips it for top-1; V3's (transformers, DeepSeek's reference) does not
    if a.norm_topk_prob and (a.num_experts_per_tok > 1 or a.model_type != "deepseek_v2"):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(weights * a.routed_scaling_factor, indices)


# (layer_id, x [T, hidden], routing) -> receive, where receive() -> [T, hidden] is the weighted sum of each
# token's routed experts, computed elsewhere (the cluster's expert actors): the call sends the rows out,
# ``receive`` waits for the results, and the caller computes something else in between
RoutedExperts = Callable[[int, torch.Tensor, Routing], Callable[[], torch.Tensor]]


def experts_elsewhere(layer_id: int, x: torch.Tensor, routing: Routing) -> Callable[[], torch.Tensor]:
    """For a model part built without its routed experts and never run (checking a checkpoint)."""
    raise RuntimeError(f"layer {layer_id}: this model part was built without its routed experts")


# every-expert rows up to which the dense form wins on CPU for the default model (16 experts, top-4):
# per MoE layer, dense vs sorted 0.42 / 0.45 ms at 8 tokens, 0.44 / 0.54 at 32, 0.72 / 0.71 at 64,
# 1.21 / 0.95 at 128 (2 cores, float32)
DENSE_ROWS = 1024


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dtype: torch.dtype, fp8_block=None,
                 routed_experts: RoutedExperts | None = None):
        """``routed_experts``: where the routed experts run when not here (an attention shard passes
        its dispatcher to the expert actors); ``None`` builds them in this module."""
        super().__init__()
        self.layer_id = layer_id
        self.fp8 = fp8_block is not None
        self._stacked: tuple[torch.Tensor, ...] | None = None
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None
        self.routed_experts = routed_experts
        self.gate = Gate(args)
        self.experts = nn.ModuleList(
            MLP(args.hidden_size, args.moe_intermediate_size, dtype, fp8_block)
            for _ in range(args.n_routed_experts if routed_experts is None else 0)
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

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """The routed experts' float weights stacked per projection: gate, up [E, inter, hidden] and
        down [E, hidden, inter] (built once; the experts' own weights stay as loaded)."""
        if self._stacked is None:
            self._stacked = tuple(torch.stack([getattr(e, proj).weight for e in self.experts])
                                  for proj in ("gate_proj", "up_proj", "down_proj"))
        return self._stacked

    def dense(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a batch of ``tokens``: the routed experts and then the shared ones (as
        ``n_shared_experts`` experts of ``moe_intermediate_size`` each, always weight 1) as the two
        matrices of ``kernels.moe.swiglu_dense``; ``None`` where computing every expert for every
        token costs more than the sorted path: beyond ``DENSE_ROWS`` expert rows, or more than 4x the
        chosen experts' work (``n_routed_experts > 4 * num_experts_per_tok``: every DeepSeek model).
        Float weights only."""
        a = self.gate.args
        if self.fp8 or a.n_routed_experts > 4 * a.num_experts_per_tok or tokens > self.dense_tokens:
            return None
        if self._dense is None:
            gate, up, down = self.stacked()  # [E, inter, hidden] x 2, [E, hidden, inter]
            inter = gate.shape[1]
            if self.shared_experts is not None:
                mlp = self.shared_experts
                gate = torch.cat([gate, mlp.gate_proj.weight.view(-1, inter, gate.shape[2])])
                up = torch.cat([up, mlp.up_proj.weight.view(-1, inter, up.shape[2])])
                down = torch.cat([down, mlp.down_proj.weight.view(down.shape[1], -1, inter).transpose(0, 1)])
            self._dense = (torch.cat([gate, up], dim=1).flatten(0, 1).contiguous(),
                           down.permute(1, 0, 2).flatten(1).contiguous())
        return self._dense

    @property
    def dense_tokens(self) -> int:
        """The most tokens the dense form takes (``DENSE_ROWS`` expert rows)."""
        return DENSE_ROWS // self.gate.args.n_routed_experts

    def reset_caches(self) -> None:
        self._stacked = None
        self._dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routed_experts is not None:
            return run_stages(self.stages(x))
        return self.local(x, self.gate(x))

    def stages(self, x: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """The layer as a generator that returns its output. With the routed experts elsewhere it
        yields once, while their rows are away: the shared experts are computed before the yield,
        and whoever drives it may run another micro-batch's layers there (``interleave``)."""
        routing = self.gate(x)
        if self.routed_experts is None:
            return self.local(x, routing)
        receive = self.routed_experts(self.layer_id, x, routing)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        yield
        y = receive()
        return y if shared is None else y + shared

    def local(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The routed experts (in this module) and the shared ones on ``x`` [T, hidden]."""
        dense = self.dense(x.shape[0])
        if dense is not None:  # routed and shared experts in two matmuls
            n_shared = self.gate.args.n_shared_experts if self.shared_experts is not None else 0
            weights = torch.zeros(x.shape[0], self.gate.args.n_routed_experts + n_shared, device=x.device)
            weights[:, self.gate.args.n_routed_experts:] = 1.0
            weights.scatter_(1, routing.indices, routing.weights.float())
            return kernels.moe.swiglu_dense(x, weights, *dense)
        if self.fp8:
            y = kernels.moe_fp8(x, routing.indices, routing.weights, *self.stacked_fp8())
        else:
            order, rows, offsets = sort_by_expert(routing.indices, len(self.experts))
            out = kernels.moe.swiglu_sorted(x[rows], offsets, *self.stacked())
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            y.index_add_(0, rows, out.float() * routing.weights.flatten()[order, None])
            y = y.to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


def run_stages(stages: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """Drive a layer's (or a model's) stages to the end and return the result."""
    return interleave([stages])[0]


def interleave(stages: list[Generator]) -> list:
    """Drive several micro-batches' stages round-robin, each up to its next yield (its routed rows
    sent) in turn, and return their results in order. Every micro-batch must yield as often as the
    others, so that every rank sends its rows in the same order (micro-batch 0, 1, ... per layer)."""
    results, live = [None] * len(stages), list(range(len(stages)))
    while live:
        for i in list(live):
            try:
                next(stages[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results
