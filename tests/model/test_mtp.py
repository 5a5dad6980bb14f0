"""The MTP module (layer ``num_hidden_layers``) loads from the checkpoint and runs."""

import torch

from model.cache import MLACache
from model.checkpoint import CheckpointReader, load_model


def test_mtp_loads_and_predicts(tiny_dir):
    model = load_model(tiny_dir, torch.float32, progress=False)
    n = model.args.num_hidden_layers
    assert len(model.mtp_layers) == model.args.num_nextn_predict_layers == 1
    mtp = model.mtp_layers[0]
    ckpt = CheckpointReader(tiny_dir).read([f"model.layers.{n}.eh_proj.weight",
                                            f"model.layers.{n}.shared_head.head.weight"])
    assert torch.equal(mtp.eh_proj.weight, ckpt[f"model.layers.{n}.eh_proj.weight"].float())
    assert torch.equal(mtp.shared_head.head.weight, ckpt[f"model.layers.{n}.shared_head.head.weight"].float())

    tokens = list(range(10, 30))
    cache = MLACache(model.args, n + 1, 8, 4, torch.float32)
    meta = cache.build_meta([(0, 0, len(tokens) - 1)])
    hidden = model(torch.tensor(tokens[:-1]), meta, cache)
    next_ids = torch.tensor(tokens[1:])
    model.prepare(meta)
    got = mtp.predict(hidden, next_ids, meta, cache.kv[n], cache.pe[n])

    # the same composition written out with the naive attention path and a fresh cache
    cache2 = MLACache(model.args, 1, 8, 4, torch.float32)
    meta2 = model.prepare(cache2.build_meta([(0, 0, len(tokens) - 1)]))
    h = mtp.eh_proj(torch.cat([mtp.enorm(mtp.embed_tokens(next_ids)), mtp.hnorm(hidden)], -1))
    x = h + mtp.self_attn(mtp.input_layernorm(h), meta2, cache2.kv[0], cache2.pe[0], absorb=False)
    x = x + mtp.mlp(mtp.post_attention_layernorm(x))
    expected = mtp.shared_head.head(mtp.shared_head.norm(x))
    assert got.shape == (len(tokens) - 1, model.args.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
