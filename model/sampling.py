"""Sampling parameters of a request and the sampling of one next token from logits."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # how many top log-probabilities to return per generated token
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """From a JSON-like dict; unknown keys raise a ``ValueError`` naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sampling field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def with_seed(params: SamplingParams) -> SamplingParams:
    """Sampled requests get a seed when they have none, so any token can be drawn again."""
    if params.greedy or params.seed is not None:
        return params
    return replace(params, seed=random.getrandbits(62))


def position_generator(params: SamplingParams, position: int,
                       device: str | torch.device = "cpu") -> torch.Generator | None:
    """The random stream for the token at ``position`` of a sequence: a function of the request's
    seed and the position alone, so recomputing a sequence (after preemption or a lost actor)
    draws exactly the tokens a fault-free run draws."""
    if params.greedy:
        return None
    if params.seed is None:
        raise ValueError("sampling needs a seed here; pass the params through with_seed() first")
    gen = torch.Generator(device=device)
    gen.manual_seed((params.seed * 1_000_003 + position) % (2**63 - 1))
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """One token from ``logits`` [vocab] (float32). Returns ``(token_id, top)`` where ``top`` is the
    list of ``params.logprobs`` ``(token_id, logprob)`` pairs, best first, from the unmodified
    log-softmax of ``logits``."""
    logits = logits.float()
    top: list[tuple[int, float]] = []
    if params.logprobs:
        lp = torch.log_softmax(logits, dim=-1)
        vals, idx = lp.topk(min(params.logprobs, lp.numel()))
        top = list(zip(idx.tolist(), vals.tolist(), strict=True))
    if params.greedy:
        return int(logits.argmax()), top
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator)), top
