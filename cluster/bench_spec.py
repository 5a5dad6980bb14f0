"""``raymoe bench spec``: MTP speculative decoding on the default model: acceptance rate and tokens/s
speed-up for K = 1, 2, 3 draft tokens per step over plain decoding (K = 0), at batch 1 and 8, in the
single process and a cluster (default 1x2), in one run.

Greedy decoding of text prompts (opening lines in the style of the training plays, none from
Hamlet), ``--new-tokens`` each with EOS ignored; tokens/s counts generated tokens over the whole
request (the prompts are short), second of two runs. Acceptance = drafts kept / drafts verified;
tokens per step = emitted tokens / verification steps of a sequence (1 + kept drafts per step).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PROMPTS = [
    "KING. Now, lords, what news from France?",
    "Enter a MESSENGER.\n\nMESSENGER. My lord,",
    "ROMEO. I dreamt a dream to-night.",
    "First Citizen. Before we proceed any further, hear me speak.",
    "DUKE. If music be the food of love,",
    "LEAR. Come, let's away to prison;",
    "Enter the Queen and her Ladies.\n\nQUEEN.",
    "PORTIA. The quality of mercy is not strain'd;",
]


def main(args) -> int:
    import ray

    from cluster.api import RayMoE
    from cluster.options import model_dir
    from model.generate import LocalLLM
    from model.sampling import SamplingParams

    path = model_dir(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in (args.ks or "1,2,3").split(",")]
    layouts = [tuple(int(v) for v in lay.split("x")) for lay in (args.layouts or "1x2").split(",")]
    prompts = {b: [PROMPTS[i % len(PROMPTS)] for i in range(b)] for b in batch_sizes}

    def measure(generate, mode):
        out = []
        for b in batch_sizes:
            for k in [0] + ks:
                params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True,
                                        speculative_tokens=k)
                generate(prompts[b], params)  # warm-up
                t0 = time.perf_counter()
                results = generate(prompts[b], params)
                seconds = time.perf_counter() - t0
                tokens = sum(len(r.output_ids) for r in results)
                drafts = sum(r.draft_tokens for r in results)
                kept = sum(r.accepted_tokens for r in results)
                steps = (drafts / k) if k else tokens
                row = {"mode": mode, "batch": b, "k": k, "tok_s": tokens / seconds, "draft_tokens": drafts,
                       "accepted_tokens": kept, "acceptance": kept / drafts if drafts else None,
                       "tokens_per_step": tokens / steps if steps else None}
                out.append(row)
                print(_format(row, out), flush=True)
        return out

    print(f"MTP speculative decoding on {path} ({args.dtype}, greedy, {args.new_tokens} new tokens per request)")
    print(HEADER + "\n" + "-" * len(HEADER))
    local = LocalLLM(path, dtype=args.dtype, progress=False, mtp=True)
    rows = measure(local.generate, "single process")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        for shards, experts in layouts:
            with RayMoE.start(path, attention_shards=shards, expert_actors=experts, dtype=args.dtype,
                              speculative_tokens=max(ks)) as llm:
                rows += measure(llm.generate, f"cluster {shards}x{experts}")
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "spec", "checkpoint": str(path), "dtype": args.dtype,
                               "new_tokens": args.new_tokens, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


HEADER = (f"{'mode':>14} {'batch':>5} {'K':>2} | {'tok/s':>8} | {'speed-up':>8} | {'acceptance':>10} | "
          f"{'tokens/step':>11}")


def _format(row: dict, rows: list[dict]) -> str:
    base = next(r["tok_s"] for r in rows if r["mode"] == row["mode"] and r["batch"] == row["batch"] and r["k"] == 0)
    row["speedup"] = row["tok_s"] / base
    acc = "-" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
    return (f"{row['mode']:>14} {row['batch']:>5} {row['k']:>2} | {row['tok_s']:8.1f} | {row['speedup']:8.2f} | "
            f"{acc:>10} | {row['tokens_per_step']:11.2f}")
