"""One request's generation state: output ids, streamed text, stop conditions.

Pure Python apart from the tokenizer; the single-process generator and the cluster engine both
post-process sampled tokens through ``Sequence.append``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.sampling import SamplingParams
from model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length", "cancelled" or "error"
    top_logprobs: list[list[list[float]]] = field(default_factory=list)  # per position: [[id, logprob], ...]
    error: str | None = None
    token_logprobs: list[float] = field(default_factory=list)  # per position: the picked token's logprob
    speculative_tokens: int = 0  # MTP drafts per step (0: off)
    draft_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # drafts kept

    def to_json(self) -> dict:
        out = {"output_ids": self.output_ids, "text": self.text, "finish_reason": self.finish_reason,
               "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.output_ids)}
        if self.top_logprobs:
            out["top_logprobs"] = self.top_logprobs
            out["token_logprobs"] = self.token_logprobs
        if self.speculative_tokens:
            out.update(speculative_tokens=self.speculative_tokens, draft_tokens=self.draft_tokens,
                       accepted_tokens=self.accepted_tokens)
        if self.error:
            out["error"] = self.error
        return out


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...] | None, max_len: int):
        """``eos_token_ids``: the id(s) that end the sequence unless ``params.ignore_eos``."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: send at least one token")
        if len(prompt_ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {max_len} tokens; "
                "shorten the prompt"
            )
        if params.max_new_tokens > max_len:
            raise ValueError(
                f"max_new_tokens {params.max_new_tokens} is more than the model's context of {max_len} tokens; "
                f"ask for at most {max_len - len(prompt_ids)} with this prompt"
            )
        self.seq_id, self.prompt_ids, self.params = seq_id, list(prompt_ids), params
        self.output_ids: list[int] = []
        self.top_logprobs: list[list[list[float]]] = []
        self.token_logprobs: list[float] = []
        self.max_new = min(params.max_new_tokens, max_len - len(prompt_ids))
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids.update(eos_token_ids or ())
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.text = ""
        self._emitted = 0
        self.finish_reason: str | None = None
        self.speculative_tokens = 0  # MTP drafts per step, set by whoever runs the sequence
        self.drafts: list[int] = []  # proposed for the next step
        self.draft_tokens = self.accepted_tokens = 0
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token_id: int, top: list[tuple[int, float]] | None = None, logprob: float | None = None) -> str:
        """Record a sampled token (with its top alternatives and its own logprob when asked for);
        returns the text now safe to stream (maybe empty)."""
        self.output_ids.append(token_id)
        if top:
            self.top_logprobs.append([[i, lp] for i, lp in top])
        if logprob is not None:
            self.token_logprobs.append(logprob)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
        elif self.detok is not None:
            start = len(self.text)
            self.text += self.detok.add(token_id)
            for s in self.params.stop:  # only where the new text can complete it: no rescan of the whole output
                cut = self.text.find(s, max(0, start - len(s) + 1))
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish_reason = "stop"
                    break
        if self.finish_reason is None and len(self.output_ids) >= self.max_new:
            self.finish_reason = "length"
            if self.detok is not None:
                self.text += self.detok.flush()
        end = len(self.text) if self.finished else max(self._emitted, len(self.text) - self._holdback)
        piece, self._emitted = self.text[self._emitted:end], end
        return piece

    @property
    def remaining(self) -> int:
        """Tokens it may still emit."""
        return self.max_new - len(self.output_ids)

    def drafts_to_verify(self) -> list[int]:
        """The drafts worth verifying next step: a step emits at most one token more than it verifies."""
        return self.drafts[:max(0, self.remaining - 1)]

    def record_step(self, emitted, verified: int, accepted: int, drafts: list[int]) -> list[tuple[int, str]]:
        """A step's emitted ``(token, top, logprob)`` tuples (and its draft figures): appended in order
        until the sequence finishes; returns ``(token, streamable text)`` per token appended."""
        self.draft_tokens += verified
        self.accepted_tokens += accepted
        self.drafts = list(drafts)
        out = []
        for token, top, lp in emitted:
            if self.finished:
                break
            out.append((token, self.append(token, top, lp)))
        return out

    def result(self) -> GenerationResult:
        return GenerationResult(self.prompt_ids, self.output_ids, self.text, self.finish_reason or "length",
                                self.top_logprobs, token_logprobs=self.token_logprobs,
                                speculative_tokens=self.speculative_tokens, draft_tokens=self.draft_tokens,
                                accepted_tokens=self.accepted_tokens)
