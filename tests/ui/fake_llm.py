"""A stand-in for ``RayMoE`` with the few members the page and the OpenAI API use, for tests that
need no Ray."""

from pathlib import Path
from types import SimpleNamespace

from cluster.engine import StreamEvent


class FakeLLM:
    """Replies with ``reply`` in pieces of ``piece`` characters and records what it was sent."""

    def __init__(self, reply: str = "Hello there, I am fake.", piece: int = 4, generation_defaults=None):
        self.reply, self.piece = reply, piece
        self.generation_defaults = generation_defaults or {}
        self.submitted: list[tuple[list[dict], object]] = []
        self.cancelled: list[int] = []
        self.model_dir = Path("/fake/tiny")
        self.args = SimpleNamespace(model_type="deepseek_v3", n_routed_experts=8)
        self.layout = SimpleNamespace(attention_shards=1, expert_actors=2)
        self.dashboard_url = None

    def submit(self, prompt, params) -> int:
        """``prompt``: chat messages (the page), or token ids (the OpenAI API encodes first)."""
        size = sum(len(m["content"]) for m in prompt) if prompt and isinstance(prompt[0], dict) else len(prompt)
        if size > 10_000:
            raise ValueError("the prompt is longer than the model's context")
        self.submitted.append((prompt, params))
        return len(self.submitted) - 1

    def stream(self, request_id: int):
        pieces = [self.reply[i:i + self.piece] for i in range(0, len(self.reply), self.piece)]
        for i, text in enumerate(pieces):
            last = i == len(pieces) - 1
            result = SimpleNamespace(error=None, text=self.reply, output_ids=list(range(len(pieces))),
                                     finish_reason="stop", token_logprobs=[], top_logprobs=[]) if last else None
            yield StreamEvent(text, [i], last, result)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [f"<{i}>" for i in ids]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return [t.encode() for t in self.token_texts(ids)]

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)

    def stats(self) -> dict:
        return {"shards": [], "totals": {}, "tokens_per_s": 0.0, "ttft_s": None, "tpot_s": None, "preemptions": 0,
                "expert_load": {}, "placement_version": 0, "experts": []}

    def encode(self, prompt) -> list[int]:
        return [5] * (len(str(prompt)) // 4 + 1)

    def describe(self) -> dict:
        return {"model": self.model_dir.name, "model_dir": str(self.model_dir), "model_type": "deepseek_v3",
                "n_routed_experts": 8, "vocab_size": 1000, "max_context": 4096, "max_sequence_tokens": 4096,
                "attention_shards": 1, "expert_actors": 2, "transport": "pipes",
                "has_tokenizer": True, "started_at": 0.0, "generation_defaults": self.generation_defaults}

    def health(self) -> dict:
        return {"state": "healthy", "error": None}

    def cluster_info(self) -> list:
        return []

    def shutdown(self) -> None:
        pass
