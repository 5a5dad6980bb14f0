"""Sampling parameters of a request and the sampling of one next token from logits."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

MAX_NEW_TOKENS = 2**31 - 1  # the model's context bounds it further (``Sequence``)
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (vLLM's _SAMPLING_EPS)
MAX_SPECULATIVE_TOKENS = 8


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature`` 0 (or under ``GREEDY_BELOW``, as vLLM
    does) is greedy."""

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
    # draft tokens per step from the model's MTP layer, verified in one step (0: off; None: the
    # server's default, ``--speculative-tokens``)
    speculative_tokens: int | None = None

    def __post_init__(self):
        # Every field is checked for type and range here, so a value that could fail a step (a float
        # top_k, a string seed, an infinite temperature) never reaches the cluster.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) and t >= 0
                                                                         for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for key in ("temperature", "top_p"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        for key in ("top_k", "max_new_tokens", "logprobs"):
            if not _is_int(getattr(self, key)):
                raise ValueError(f"{key} must be an integer, got {getattr(self, key)!r}")
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be a 64-bit integer or null, got {self.seed!r}")
        for key in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.temperature < GREEDY_BELOW:  # logits / 1e-38 overflow to inf, and the draw fails
            object.__setattr__(self, "temperature", 0.0)
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if self.speculative_tokens is not None and not (
                _is_int(self.speculative_tokens) and 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS):
            raise ValueError(f"speculative_tokens must be an integer in 0..{MAX_SPECULATIVE_TOKENS} (0: off) or null, "
                             f"got {self.speculative_tokens!r}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")

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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           token: int | None = None):
    """One token from ``logits`` [vocab] (float32). Returns ``(token_id, top, logprob)``: ``top`` is
    the list of ``params.logprobs`` ``(token_id, logprob)`` pairs, best first, and ``logprob`` that of
    the token picked (``None`` when ``params.logprobs`` is 0), both from the unmodified log-softmax.
    ``token``: the pick, already made (a greedy batch's argmax)."""
    logits = logits.float()
    if token is None:
        token = _pick(logits, params, generator)
    if not params.logprobs:
        return token, [], None
    lp = torch.log_softmax(logits, dim=-1)
    vals, idx = lp.topk(min(params.logprobs, lp.numel()))
    return token, list(zip(idx.tolist(), vals.tolist(), strict=True)), float(lp[token])


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.greedy:
        return int(logits.argmax())
    probs = probabilities(logits, params)
    if not bool(torch.isfinite(probs).all() & (probs.sum() > 0)):  # one read back to the host
        # logits that are not finite (a model overflowing in float16): this sequence's token is the
        # best finite one rather than a failed step for the whole batch
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (``temperature > 0``) request draws from: temperature, then
    top-k, then top-p over ``logits`` [vocab] (float32)."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p / sorted_p.sum())
    return probs
