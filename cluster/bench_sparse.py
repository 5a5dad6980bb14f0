"""``raymoe bench sparse``: DeepSeek-V3.2's attention per decode step against the context length,
with the lightning indexer (sparse: MLA over ``index_topk`` selected keys) and without (dense MLA
over the whole context), on one attention layer of reduced shapes (CPU-sized), in one run.

The cache is filled with random latents and keys (attention's cost does not depend on their values),
then one decode step of ``--batch`` sequences is timed at each context length. Prints a table, writes
JSON. Dense cost grows with the context; sparse cost is the indexer's scoring (cheap per key: a few
heads of a small dimension) plus MLA over ``index_topk`` keys, so it flattens past ``index_topk``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

SHAPES = dict(hidden_size=1024, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
              qk_rope_head_dim=32, v_head_dim=64, index_n_heads=16, index_head_dim=64, index_topk=2048)


def _layer(index_fp8: bool):
    from model.attention import MLA
    from model.config import ModelArgs
    from model.rope import RotaryEmbedding

    args = ModelArgs.from_preset("deepseek-v3.2-exp").replace(quant=None, index_fp8=index_fp8, **SHAPES)
    torch.manual_seed(0)
    mla = MLA(args, torch.float32)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
        if p.dim() == 1:
            p.data.add_(1.0)
    return args, mla.eval(), RotaryEmbedding(args)


def _time_step(args, mla, rope, context: int, batch: int, sparse: bool, repeats: int) -> float:
    from model.cache import MLACache

    block = 64
    cache = MLACache(args, 1, batch * (-(-context // block)) + 1, block, torch.float32)
    for pool in cache.kv + cache.pe + cache.ik:
        if pool.dtype == torch.float32:
            pool.normal_()
    for pool in cache.iks:
        pool.fill_(1.0 / 64)
    if cache.ik and cache.ik[0].dtype != torch.float32:
        cache.ik[0].copy_(torch.randn(cache.ik[0].shape).to(cache.ik[0].dtype))
    meta = cache.build_meta([(s, context - 1, context) for s in range(batch)])
    meta.cos, meta.sin = rope.cos_sin(meta.positions)
    x = torch.randn(batch, args.hidden_size)
    index_cache = (cache.ik[0], cache.iks[0] if cache.iks else None)
    indexer = mla.indexer
    if not sparse:
        mla.indexer = None
    try:
        with torch.inference_mode():
            mla(x, meta, cache.kv[0], cache.pe[0], True, index_cache)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                mla(x, meta, cache.kv[0], cache.pe[0], True, index_cache)
                best = min(best, time.perf_counter() - t0)
    finally:
        mla.indexer = indexer
    return best


def main(args) -> int:
    contexts = [int(c) for c in (getattr(args, "contexts", None) or "512,1024,2048,4096,8192,16384").split(",")]
    batch = max(int(b) for b in args.batch_sizes.split(","))  # one decode batch; the CLI's default is 1
    rows = []
    for fp8 in (False, True):
        margs, mla, rope = _layer(fp8)
        for context in contexts:
            row = {"index_fp8": fp8, "context": context, "batch": batch}
            row["dense_ms"] = 1e3 * _time_step(margs, mla, rope, context, batch, False, args.repeats)
            row["sparse_ms"] = 1e3 * _time_step(margs, mla, rope, context, batch, True, args.repeats)
            rows.append(row)
    topk = SHAPES["index_topk"]
    print(f"one V3.2 attention layer, decode step of {batch} sequence(s), reduced shapes {SHAPES}, float32, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'indexer':>8} {'context':>8} | {'dense MLA ms':>12} | {'indexer+sparse ms':>17} | {'sparse/dense':>12}")
    for r in rows:
        print(f"{'fp8' if r['index_fp8'] else 'exact':>8} {r['context']:>8} | {r['dense_ms']:12.2f} | "
              f"{r['sparse_ms']:17.2f} | {r['sparse_ms'] / r['dense_ms']:12.2f}")
    print(f"(index_topk {topk}: up to it, sparse = dense attention plus the indexer's scoring)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "sparse", "shapes": SHAPES, "cpus": os.cpu_count(),
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
