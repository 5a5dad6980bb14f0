"""DeepSeek-V3.2 (sparse attention with the lightning indexer) against transformers'
``DeepseekV32ForCausalLM`` on tiny checkpoints whose prompts are longer than ``index_topk`` (8), so
the selection matters; cached decode against full recompute; naive against absorbed attention.

transformers scores the indexer in float without the Hadamard rotation or FP8, as raymoe's exact
path does: float32 logits agree within 2e-4 (summation order only)."""

import json
import shutil

import pytest
import torch

from model.checkpoint import load_model
from model.generate import LocalLLM
from model.sampling import SamplingParams
from model.tiny import make_tiny
from tests.helpers import full_logits, rewrite_config

TOL = 2e-4
ROWS = [list(range(5, 45)), [7, 300, 11, 600, 42, 9, 77, 500, 12, 13, 14, 15, 900, 3, 4, 5, 6, 8, 10],
        [100, 200, 300]]


@pytest.fixture(scope="module")
def v32_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-v32", preset="tiny-v32", seed=5)


def _hf_logits(path, rows):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    with torch.no_grad():
        return [hf(torch.tensor([r])).logits[0].float() for r in rows]


def test_logits_match_transformers_and_the_selection_matters(v32_dir, tmp_path):
    model = load_model(v32_dir, torch.float32, with_mtp=False, progress=False)
    assert model.args.index_topk == 8 and len(ROWS[0]) > 8
    ours = full_logits(model, ROWS)
    theirs = _hf_logits(v32_dir, ROWS)
    for o, t in zip(ours, theirs, strict=True):
        assert (o - t).abs().max() < TOL
    # the same weights with every key selected (dense MLA) give other logits past index_topk
    dense = tmp_path / "dense"
    shutil.copytree(v32_dir, dense)
    rewrite_config(dense, index_topk=4096)
    dense_logits = full_logits(load_model(dense, torch.float32, with_mtp=False, progress=False), ROWS[:1])[0]
    assert (dense_logits[:8] - ours[0][:8]).abs().max() < TOL  # within index_topk: the same
    assert (dense_logits[8:] - ours[0][8:]).abs().max() > 1e-2  # beyond: the indexer changed attention


def test_naive_equals_absorbed(v32_dir):
    model = load_model(v32_dir, torch.float32, with_mtp=False, progress=False)
    a = full_logits(model, ROWS, absorb=True)
    b = full_logits(model, ROWS, absorb=False)
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() < TOL


def test_cached_decode_with_chunked_prefill_equals_full_recompute(v32_dir):
    """Greedy generation (prefill in chunks of 5 tokens, then one token per step over the paged
    cache, indexer keys included) picks the argmax of a full recompute at every position."""
    llm = LocalLLM(v32_dir, dtype="float32", max_batch_tokens=5, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=2)
    results = llm.generate(ROWS, params)
    for row, r in zip(ROWS, results, strict=True):
        full = full_logits(llm.model, [row + r.output_ids])[0]
        lp = torch.log_softmax(full[len(row) - 1:-1], -1)
        assert r.output_ids == lp.argmax(-1).tolist()
        got = torch.tensor([t[0][1] for t in r.top_logprobs])
        assert (got - lp.max(-1).values).abs().max() < 1e-4


def test_cache_holds_the_indexer_keys(v32_dir):
    from model.cache import MLACache

    args = load_model(v32_dir, torch.float32, with_mtp=False, progress=False).args
    cache = MLACache(args, args.num_hidden_layers, 4, 4, torch.bfloat16)
    per_layer = 2 * (args.kv_lora_rank + args.qk_rope_head_dim + args.index_head_dim)
    assert cache.bytes_per_token == per_layer * args.num_hidden_layers


def test_fp8_v32_checkpoint_loads_and_decodes_like_a_full_recompute(tmp_path):
    path = make_tiny(tmp_path / "v32-fp8", preset="tiny-v32", fp8=True, seed=5)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and "quantization_config" in cfg
    from safetensors import safe_open

    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    assert "model.layers.1.self_attn.indexer.wq_b.weight_scale_inv" in names
    assert "model.layers.1.self_attn.indexer.weights_proj.weight_scale_inv" not in names
    model = load_model(path, torch.float32, with_mtp=False, progress=False)
    out = LocalLLM(path, dtype="float32", progress=False).generate(ROWS[:1], SamplingParams(
        temperature=0, max_new_tokens=6, ignore_eos=True))[0]
    full = full_logits(model, [ROWS[0] + out.output_ids])[0]
    assert out.output_ids == full[len(ROWS[0]) - 1:-1].argmax(-1).tolist()


def test_fp8_indexer_selects_what_the_exact_one_selects(v32_dir):
    """On the same inputs, the FP8 path (Hadamard + 1x128 e4m3, keys cached in FP8) keeps on average
    at least 90% of the exact path's top-k keys per query (e4m3 keeps 3 mantissa bits; near-ties flip)."""
    import copy

    from model.cache import MLACache

    model = load_model(v32_dir, torch.float32, with_mtp=False, progress=False)
    caught = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.indexer.register_forward_hook(
            lambda mod, inp, out, i=i: caught.setdefault(i, (inp, out)) and None)
    full_logits(model, [list(range(5, 100))])
    fp8_args = model.args.replace(index_fp8=True)
    for i, (inp, exact) in caught.items():
        x, q_latent, meta, _ = inp
        twin = copy.deepcopy(model.model.layers[i].self_attn.indexer)
        twin._forward_hooks.clear()
        twin.fp8 = True
        cache = MLACache(fp8_args, 1, 64, 4, torch.float32)
        assert cache.ik[0].dtype == torch.float8_e4m3fn and cache.iks[0].dtype == torch.float32
        got = twin(x, q_latent, meta, (cache.ik[0], cache.iks[0]))
        overlaps = [len(set(a[va].tolist()) & set(b[vb].tolist())) / int(va.sum())
                    for e, g in zip(exact, got, strict=True)
                    for a, b, va, vb in zip(e.index, g.index, e.valid, g.valid, strict=True)]
        assert sum(overlaps) / len(overlaps) >= 0.9 and min(overlaps) >= 0.5, (i, overlaps)


def test_fp8_indexer_decode_equals_full_recompute(v32_dir, tiny_dir):
    llm = LocalLLM(v32_dir, dtype="float32", max_batch_tokens=7, progress=False, index_fp8=True)
    assert llm.model.model.layers[0].self_attn.indexer.fp8
    out = llm.generate(ROWS[:2], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    for row, r in zip(ROWS[:2], out, strict=True):
        full = full_logits(llm.model, [row + r.output_ids])[0]
        assert r.output_ids == full[len(row) - 1:-1].argmax(-1).tolist()
    with pytest.raises(ValueError, match="deepseek_v32"):
        load_model(tiny_dir, torch.float32, progress=False, index_fp8=True)


def test_the_v32_preset_builds_with_an_indexer_in_every_layer():
    from model.config import ModelArgs
    from model.transformer import Transformer

    args = ModelArgs.from_preset("deepseek-v3.2-exp")
    with torch.device("meta"):
        model = Transformer(args, torch.bfloat16, with_mtp=True)
    assert all(layer.self_attn.indexer is not None for layer in model.model.layers)
    total = sum(p.numel() for p in model.parameters())
    assert 680e9 < total < 690e9  # DeepSeek-V3.2-Exp: 671B + the 14B MTP module, plus the indexers


def test_speculative_decoding_past_index_topk_is_plain_greedy(v32_dir):
    """The MTP layer drafts with its own indexer (a prompt past index_topk: sparse attention in every
    layer, MTP's included); greedy output with drafts is plain greedy output."""
    llm = LocalLLM(v32_dir, dtype="float32", progress=False, mtp=True)
    prompts = [list(range(5, 60)), [9, 8, 7]]
    assert len(prompts[0]) > llm.args.index_topk
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    spec = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True,
                                                speculative_tokens=2))
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert all(r.draft_tokens > 0 for r in spec)
