"""What travels over Ray between the engine and the actors each step: small, typed messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.placement import Placement
from model.sampling import SamplingParams


@dataclass
class ChunkPlan:
    """Compute positions ``start..start+len(tokens)-1`` of a sequence; sample the next token after it
    when ``sample``. ``params`` comes with a sequence's first chunk (its sampler is made then)."""

    seq_id: int
    tokens: list[int]
    start: int
    block_table: list[int]
    sample: bool
    params: SamplingParams | None = None
    drafts: int = 0  # the last `drafts` tokens are MTP drafts to verify (model.speculative)
    propose: int = 0  # draft this many tokens for the next step (0: the sequence does not speculate)
    next_token: int | None = None  # with `propose`, a chunk ending inside the known tokens: the next one
    max_tokens: int = 1  # tokens the sequence may still emit (bounds a multi-step call)
    stop_ids: tuple[int, ...] = ()  # token ids that end the sequence (EOS, stop_token_ids)


@dataclass
class StepPlan:
    chunks: list[ChunkPlan] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # finished or cancelled sequences: drop their samplers
    placement: Placement | None = None  # route with this placement from this step on (a switch)
    decode_steps: int = 1  # model steps in this call: each sampling sequence feeds back its own tokens
    # a bound on any shard's tokens in any model step of this call, the same for every actor (0: none);
    # with it the MoE layers skip the counts exchange (actors/dispatch.py)
    capacity_tokens: int = 0
    # micro-batches per shard, interleaved at the MoE layers (``assign_micro_batches`` splits the chunks);
    # ``capacity_tokens`` then bounds each micro-batch
    micro_batches: int = 1


@dataclass
class StepOutput:
    sampled: dict[int, list[tuple[int, list[tuple[int, float]], float | None]]]  # seq_id -> [(token, top, logprob)]
    load: dict[int, list[int]]  # MoE layer -> tokens per logical expert
    seconds: dict[str, float]  # per phase
    num_tokens: int = 0
    steps: int = 1  # model steps run
    # seq_id -> (drafts verified, drafts kept, drafts proposed for the next call)
    drafts: dict[int, tuple[int, int, list[int]]] = field(default_factory=dict)


@dataclass
class ExpertStepOutput:
    rows: list[int]  # rows computed per MoE layer
    seconds: dict[str, float]
    version: int = 0  # the placement version this step served
    staged_version: int | None = None  # a placement whose weights are loaded and ready to switch to
    rows_total: int = 0  # rows computed since the actor started
    stage_error: str | None = None  # staging the last prepared placement failed
