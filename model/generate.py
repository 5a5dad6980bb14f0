"""Generation in one process: batched prefill and decode over the absorbed MLA cache."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from model.cache import MLACache
from model.checkpoint import load_model
from model.config import end_of_sequence_ids, generation_defaults
from model.sampling import SamplingParams, with_seed
from model.sequence import GenerationResult, Sequence
from model.speculative import ChunkWork, mtp_cache_layers, require_mtp, run_chunks, speculative_for
from model.tokenizer import Tokenizer, encode_prompt

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class LocalLLM:
    """The whole model in this process: ``generate`` a batch of prompts of any lengths."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                 block_size: int = 16, max_batch_tokens: int = 2048, progress: bool = True, index_fp8: bool = False,
                 speculative_tokens: int = 0, mtp: bool | None = None, compile: bool = False):
        """``speculative_tokens``: MTP drafts per step for requests that do not say (0: off); the MTP
        layer is loaded when that is on or ``mtp`` is true (then requests may ask for drafts).
        ``compile``: decode steps through ``torch.compile`` (``Transformer.compile_decode``)."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.speculative_tokens = speculative_tokens
        with_mtp = bool(speculative_tokens) if mtp is None else mtp
        self.model = load_model(path, dtype, device, with_mtp=with_mtp, progress=progress, index_fp8=index_fp8)
        require_mtp(path, len(self.model.mtp_layers), speculative_tokens)
        if compile:
            self.model.compile_decode()
            if progress:
                print("decode steps are compiled on first use (torch.compile: 10-30 s per shape class, batch 1 "
                      "and larger; less once cached)", file=sys.stderr, flush=True)
        self.args = self.model.args
        self.tokenizer = Tokenizer.from_dir(path) if (Path(path) / "tokenizer.json").exists() else None
        self.dtype, self.device, self.block_size = dtype, device, block_size
        self.max_batch_tokens = max_batch_tokens
        self.eos_token_ids = end_of_sequence_ids(self.tokenizer, self.args, generation_defaults(path))

    def encode(self, prompt: str | list[int] | list[dict]) -> list[int]:
        """Token ids for a text prompt, a list of ids, or a list of chat messages."""
        return encode_prompt(self.tokenizer, prompt, self.args.vocab_size)

    @torch.inference_mode()
    def generate(self, prompts: Iterable[str | list[int] | list[dict]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 on_token: Callable[[int, str], None] | None = None) -> list[GenerationResult]:
        prompts = list(prompts)
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        max_len = self.args.max_position_embeddings
        seqs = [Sequence(i, self.encode(p), with_seed(sp), self.tokenizer, self.eos_token_ids, max_len)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        for s in seqs:
            s.speculative_tokens = speculative_for(s.params, self.speculative_tokens, bool(self.model.mtp_layers))
        # every sequence gets its blocks up front: prompt, new tokens, and room for its drafts
        lengths = {s.seq_id: len(s.prompt_ids) + s.max_new + 2 * s.speculative_tokens for s in seqs}
        cache = MLACache(self.args, mtp_cache_layers(self.model),
                         sum(-(-n // self.block_size) for n in lengths.values()), self.block_size, self.dtype,
                         self.device)
        for seq_id, n in lengths.items():
            cache.allocator.grow(seq_id, n)

        def step(batch: list[tuple[Sequence, int, int]]):
            works = []
            for s, a, b in batch:
                k, last = s.speculative_tokens, b == len(s)
                drafts = s.drafts_to_verify() if last and k else []
                works.append(ChunkWork(s.seq_id, a, s.all_ids[a:b] + drafts, last, s.params, len(drafts), k,
                                       None if last or not k else s.all_ids[b],
                                       len(cache.allocator.tables[s.seq_id]) * self.block_size))
            results = run_chunks(self.model, cache, works)
            for w, (s, _, _) in zip(works, batch, strict=True):
                if not w.sample:
                    continue
                r = results[w.seq_id]
                for _, piece in s.record_step(r.tokens, w.drafts, r.accepted, r.drafts):
                    if on_token is not None:
                        on_token(s.seq_id, piece)
                if s.finished:
                    cache.allocator.free(s.seq_id)

        # prefill in chunks of at most max_batch_tokens tokens
        done = {s.seq_id: 0 for s in seqs}
        pending = list(seqs)
        while pending:
            batch, budget = [], self.max_batch_tokens
            while pending and budget > 0:
                s = pending[0]
                end = min(len(s.prompt_ids), done[s.seq_id] + budget)
                batch.append((s, done[s.seq_id], end))
                budget -= end - done[s.seq_id]
                done[s.seq_id] = end
                if end == len(s.prompt_ids):
                    pending.pop(0)
            step(batch)
        # decode: every running sequence one token per step
        while running := [s for s in seqs if not s.finished]:
            step([(s, len(s) - 1, len(s)) for s in running])
        return [s.result() for s in seqs]
