"""Absorbed MLA == naive MLA; incremental decode over the paged cache == full recomputation."""

import pytest
import torch

from model.cache import MLACache
from model.checkpoint import load_model
from tests.helpers import full_logits


@pytest.fixture(scope="module")
def model32(tiny_dir):
    return load_model(tiny_dir, torch.float32, progress=False)


def test_absorbed_equals_naive(model32):
    rows = [list(range(3, 40)), list(range(100, 111)), [7]]
    absorbed = full_logits(model32, rows, absorb=True)
    naive = full_logits(model32, rows, absorb=False)
    for a, n in zip(absorbed, naive, strict=True):
        assert a.abs().max() > 1.0
        torch.testing.assert_close(a, n, atol=1e-4, rtol=0)  # float32, different contraction order


def test_incremental_decode_equals_full_recompute(model32):
    """Prefill 11 tokens, then feed one token per step through the cache (block size 4, so the
    sequence crosses blocks); every step's logits equal those of one full forward."""
    tokens = torch.randint(0, model32.args.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    full = full_logits(model32, [tokens])[0]
    cache = MLACache(model32.args, model32.num_layers, num_blocks=16, block_size=4, dtype=torch.float32)
    meta = cache.build_meta([(0, 0, 11)])
    step_logits = [model32.logits(model32(torch.tensor(tokens[:11]), meta, cache))[-1]]
    for pos in range(11, len(tokens)):
        meta = cache.build_meta([(0, pos, pos + 1)])
        step_logits.append(model32.logits(model32(torch.tensor([tokens[pos]]), meta, cache))[0])
    torch.testing.assert_close(torch.stack(step_logits), full[10:], atol=1e-4, rtol=0)


def test_chunked_prefill_equals_one_pass(model32):
    tokens = list(range(50, 90))
    full = full_logits(model32, [tokens])[0]
    cache = MLACache(model32.args, model32.num_layers, num_blocks=16, block_size=8, dtype=torch.float32)
    outs = []
    for a, b in [(0, 13), (13, 29), (29, 40)]:
        meta = cache.build_meta([(0, a, b)])
        outs.append(model32.logits(model32(torch.tensor(tokens[a:b]), meta, cache)))
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-4, rtol=0)


def test_cache_holds_only_latent_and_rope_key(model32):
    a = model32.args
    cache = MLACache(a, model32.num_layers, num_blocks=2, block_size=4, dtype=torch.bfloat16)
    assert cache.bytes_per_token == a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 2


def test_bf16_error_no_worse_than_transformers(tiny_dir, model32):
    """bf16 vs float32 on the random tiny model: near-tie expert choices flip for some tokens in
    any bf16 implementation, so the bound is relative to transformers' own bf16 error."""
    transformers = pytest.importorskip("transformers")
    rows = [list(range(3, 30))]
    ref = full_logits(model32, rows)[0]
    ours = full_logits(load_model(tiny_dir, torch.bfloat16, progress=False), rows)[0].float()
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
        theirs = hf(torch.tensor(rows)).logits[0].float()
    err = lambda x: ((x - ref).abs().mean(-1) / ref.abs().mean()).median().item()
    assert err(ours) < 1.5 * err(theirs) + 1e-3, (err(ours), err(theirs))
    assert err(ours) < 0.1


def test_batched_prefill_attention_equals_per_sequence(model32):
    """Prefill chunks of several sequences at once (``_batched_latent``: queries and contexts padded,
    one masked batch) give the same outputs as one sequence at a time, with chunks that start past
    cached tokens and a sequence with no query this step."""
    from model.attention import batched_fits

    attn = model32.model.layers[1].self_attn
    a = model32.args
    cache = MLACache(a, model32.num_layers, num_blocks=32, block_size=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    cache.kv[1].copy_(torch.randn(cache.kv[1].shape, generator=gen))
    cache.pe[1].copy_(torch.randn(cache.pe[1].shape, generator=gen))
    meta = cache.build_meta([(0, 0, 9), (1, 5, 12), (2, 7, 7), (3, 3, 10)])  # (seq, start, end)
    assert batched_fits(meta, attn.n_heads)
    t = meta.query_starts[-1]
    q_lat = torch.randn(t, attn.n_heads, a.kv_lora_rank, generator=gen)
    q_pe = torch.randn(t, attn.n_heads, a.qk_rope_head_dim, generator=gen)
    got = attn._batched_latent(q_lat, q_pe, meta, cache.kv[1], cache.pe[1])
    want = attn._per_sequence(attn._attend_latent, q_lat, q_pe, meta, cache.kv[1], cache.pe[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
