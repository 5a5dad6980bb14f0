"""MTP speculative decoding in one process: greedy output is plain greedy output, drafts are the MTP
layer's predictions, and rejection sampling keeps the request's distribution."""

import pytest
import torch

from model.cache import MLACache
from model.generate import LocalLLM
from model.sampling import SamplingParams, probabilities
from model.speculative import ChunkWork, run_chunks, verify

PROMPTS = ["Hello world, the model", "def f(x):", [5, 6, 7, 8] * 10, "a"]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LocalLLM(tiny_dir, dtype="float32", progress=False, mtp=True, max_batch_tokens=24)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_is_plain_greedy(llm, k):
    plain = llm.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, speculative_tokens=0))
    spec = llm.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, speculative_tokens=k))
    for a, b in zip(plain, spec, strict=True):
        assert b.output_ids == a.output_ids
        assert b.text == a.text
        assert b.speculative_tokens == k and b.draft_tokens > 0
        assert 0 <= b.accepted_tokens <= b.draft_tokens
    assert "draft_tokens" in spec[0].to_json() and "draft_tokens" not in plain[0].to_json()


def _mtp_oracle(model, tokens, next_ids):
    """The MTP layer over a whole sequence in a fresh cache (one pass): its output hidden states."""
    n = model.num_layers
    cache = MLACache(model.args, n + 1, 32, 4, torch.float32)
    meta = cache.build_meta([(0, 0, len(tokens))])
    hidden = model(torch.tensor(tokens), meta, cache)
    model.prepare(meta)
    return (model.mtp_layers[0].hidden(model.normed(hidden), torch.tensor(next_ids), meta, cache.kv[n], cache.pe[n]),
            cache, meta)


@torch.inference_mode()
def test_drafts_are_the_mtp_layers_predictions(llm):
    """Chunked prefill then a decode step with drafts, against the MTP layer recomputed from scratch."""
    model = llm.model
    mtp = model.mtp_layers[0]
    prompt = list(range(40, 59))
    greedy = SamplingParams(temperature=0, speculative_tokens=2)
    cache = MLACache(model.args, model.num_layers + 1, 32, 4, torch.float32)
    cache.allocator.grow(0, 64)
    cap = 64
    # prefill in two chunks (the first only fills the MTP layer's cache), then sample + draft 2
    r1 = run_chunks(model, cache, [ChunkWork(0, 0, prompt[:11], False, greedy, 0, 2, prompt[11], cap)])
    assert r1[0].drafts == [] and r1[0].tokens == []
    r2 = run_chunks(model, cache, [ChunkWork(0, 11, prompt[11:], True, greedy, 0, 2, None, cap)])
    (t0, _, _), = r2[0].tokens
    seq = prompt + [t0]
    h, _, _ = _mtp_oracle(model, prompt, seq[1:])
    d1 = int(mtp.head(h[-1:]).argmax())
    assert r2[0].drafts[0] == d1
    # the second draft: the layer again on its own output and the first draft, one position on
    h_all, cache2, _ = _mtp_oracle(model, prompt, seq[1:])
    meta2 = model.prepare(cache2.build_meta([(0, len(prompt), len(prompt) + 1)]))
    n = model.num_layers
    h2 = mtp.hidden(h_all[-1:], torch.tensor([d1]), meta2, cache2.kv[n], cache2.pe[n])
    assert r2[0].drafts[1] == int(mtp.head(h2).argmax())

    # a decode step verifying the two drafts: what it emits is the main model's greedy continuation
    drafts = r2[0].drafts
    r3 = run_chunks(model, cache, [ChunkWork(0, len(seq) - 1, [t0] + drafts, True, greedy, 2, 2, None, cap)])
    full = model.logits(model(torch.tensor(seq + drafts), *_fresh(model, len(seq + drafts))))
    want = []
    for j in range(3):
        want.append(int(full[len(seq) - 1 + j].argmax()))
        if j < 2 and want[-1] != drafts[j]:
            break
    assert [t for t, _, _ in r3[0].tokens] == want
    assert r3[0].accepted == len(want) - 1


@torch.inference_mode()
def test_the_mtp_layer_reads_the_main_models_hidden_after_its_final_norm(llm, monkeypatch):
    """DeepSeek's modelling code hands the MTP layer the main model's hidden state after the final
    norm (as vLLM and SGLang do); a further draft takes the layer's own output after its head's norm."""
    model = llm.model
    mtp = model.mtp_layers[0]
    # a final norm whose weights are not all one, so that normed and raw hidden states differ in direction
    # (changed in place and restored: the model is the module's fixture)
    weight = model.model.norm.weight
    saved = weight.clone()
    weight.mul_(torch.linspace(0.5, 2.0, weight.shape[0]))
    seen, real = [], mtp.hidden
    monkeypatch.setattr(mtp, "hidden", lambda h, *a, **k: seen.append(h.clone()) or real(h, *a, **k))
    try:
        prompt = list(range(40, 51))
        cache = MLACache(model.args, model.num_layers + 1, 32, 4, torch.float32)
        cache.allocator.grow(0, 32)
        greedy = SamplingParams(temperature=0, speculative_tokens=2)
        run_chunks(model, cache, [ChunkWork(0, 0, prompt, True, greedy, 0, 2, None, 32)])
        main = model(torch.tensor(prompt), *_fresh(model, len(prompt)))
        normed = model.model.norm(main)
    finally:
        weight.copy_(saved)
    torch.testing.assert_close(seen[0], normed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[0] / seen[0].norm(dim=-1, keepdim=True), main / main.norm(dim=-1, keepdim=True),
                              atol=1e-3)
    # the second draft's input: the first's output after the head's RMSNorm (unit RMS once its weight is divided out)
    rms = (seen[1] / mtp.shared_head.norm.weight).pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def _fresh(model, length):
    cache = MLACache(model.args, model.num_layers, 32, 4, torch.float32)
    return cache.build_meta([(0, 0, length)]), cache


def test_rejection_sampling_keeps_the_distribution():
    """First emitted token over many seeds: its frequencies match p, whatever the draft."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                   SamplingParams(temperature=1.0, top_p=0.6)):
        p = probabilities(logits, params)
        for draft in (0, 3):
            counts = torch.zeros(5)
            for seed in range(6000):
                sp = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)
                out, accepted = verify(torch.stack([logits, logits]), [draft], sp, 7)
                counts[out[0][0]] += 1
                assert accepted == (1 if out[0][0] == draft else 0)
            assert (counts / counts.sum() - p).abs().max() < 0.025, (params, draft, counts / counts.sum(), p)


@pytest.mark.parametrize("top_p", [1.0, 0.3])
def test_sampled_speculative_generation_is_plain_sampling(llm, top_p):
    """Seeded sampling gives the same tokens with and without drafts (each position draws from its
    own stream; a draft is kept when it is the drawn token), even with a top-p that leaves one token."""
    params = dict(temperature=0.8, top_p=top_p, seed=3, max_new_tokens=20)
    plain = llm.generate(PROMPTS, SamplingParams(**params, speculative_tokens=0))
    for k in (1, 3):
        spec = llm.generate(PROMPTS, SamplingParams(**params, speculative_tokens=k))
        assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
        assert all(len(r.output_ids) == 20 and r.draft_tokens > 0 for r in spec)


def test_speculative_needs_the_mtp_layer(tiny_dir):
    plain = LocalLLM(tiny_dir, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="MTP layer"):
        plain.generate(["hi"], SamplingParams(speculative_tokens=1))
    with pytest.raises(ValueError, match="speculative_tokens must be"):
        SamplingParams(speculative_tokens=9)
