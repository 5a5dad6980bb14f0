"""Generation in one process: batched prefill and decode over the absorbed MLA cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from model.cache import MLACache
from model.checkpoint import load_model
from model.sampling import SamplingParams, position_generator, sample, with_seed
from model.sequence import GenerationResult, Sequence
from model.tokenizer import Tokenizer, encode_prompt

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class LocalLLM:
    """The whole model in this process: ``generate`` a batch of prompts of any lengths."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                 block_size: int = 16, max_batch_tokens: int = 2048, progress: bool = True, index_fp8: bool = False):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.model = load_model(path, dtype, device, with_mtp=False, progress=progress, index_fp8=index_fp8)
        self.args = self.model.args
        self.tokenizer = Tokenizer.from_dir(path) if (Path(path) / "tokenizer.json").exists() else None
        self.dtype, self.device, self.block_size = dtype, device, block_size
        self.max_batch_tokens = max_batch_tokens
        self.eos_token_id = (self.tokenizer.eos_token_id if self.tokenizer and self.tokenizer.eos_token_id
                             is not None else self.args.eos_token_id)

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
        seqs = [Sequence(i, self.encode(p), with_seed(sp), self.tokenizer, self.eos_token_id, max_len)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        need_blocks = sum(-(-(len(s.prompt_ids) + s.max_new) // self.block_size) for s in seqs)
        cache = MLACache(self.args, self.args.num_hidden_layers, need_blocks, self.block_size, self.dtype,
                         self.device)

        def step(batch: list[tuple[Sequence, int, int]]):
            ids = torch.tensor([t for s, a, b in batch for t in s.all_ids[a:b]], device=self.device)
            meta = cache.build_meta([(s.seq_id, a, b) for s, a, b in batch])
            hidden = self.model(ids, meta, cache)
            last = torch.tensor(meta.query_starts[1:], device=self.device) - 1
            logits = self.model.logits(hidden[last])
            for (s, _, b), row in zip(batch, logits, strict=True):
                if b < len(s):  # a prefill chunk that does not reach the end of the prompt
                    continue
                token, top, logprob = sample(row, s.params, position_generator(s.params, b, self.device))
                piece = s.append(token, top, logprob)
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
