"""``raymoe bench cluster``: tokens/s of the cluster (several layouts) against the single process,
at several batch sizes, in one run, with the per-step breakdown (attention, gate, dispatch, expert
compute, combine, scheduler). Greedy decoding of equal-length random prompts; tokens/s counts
generated tokens over the whole request (prefill included) for both. ``--decode-steps 1,4`` measures
each layout with that many model steps per actor call (the layout's ``decode_steps``), ``--micro-batches 1,2``
with that many micro-batches per shard (``micro_batches``), ``--transports pipes,gloo`` with the rows
over each (``local_pipes``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def main(args) -> int:
    import ray

    from cluster.api import RayMoE
    from cluster.options import model_dir
    from model.generate import LocalLLM
    from model.sampling import SamplingParams

    path = model_dir(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    layouts = [tuple(int(v) for v in lay.split("x")) for lay in (args.layouts or "1x2,2x2").split(",")]
    decode_steps = [int(n) for n in (getattr(args, "decode_steps", None) or "1").split(",")]
    micro_batches = [int(n) for n in (getattr(args, "micro_batches", None) or "1").split(",")]
    transports = (getattr(args, "transports", None) or "pipes").split(",")
    if set(transports) - {"pipes", "gloo"}:
        raise ValueError(f"--transports: {args.transports!r}; use pipes, gloo or both (pipes,gloo)")
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    local = LocalLLM(path, dtype=args.dtype, progress=False)
    prompts = {b: torch.randint(5, local.args.vocab_size, (b, args.prompt_len), generator=gen).tolist()
               for b in batch_sizes}

    def rate(run, b):
        run(prompts[b])  # warm-up
        t0 = time.perf_counter()
        run(prompts[b])
        return b * args.new_tokens / (time.perf_counter() - t0)

    rows = [{"layout": "single process", "batch": b, "tok_s": rate(lambda p: local.generate(p, params), b)}
            for b in batch_sizes]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        for (shards, experts), steps, micro, via in [(lay, n, m, t) for lay in layouts for n in decode_steps
                                                     for m in micro_batches for t in transports]:
            with RayMoE.start(path, attention_shards=shards, expert_actors=experts, dtype=args.dtype,
                              decode_steps=steps, micro_batches=micro, local_pipes=via == "pipes") as llm:
                used = llm.describe()["transport"]
                for b in batch_sizes:
                    before = dict(llm.engine.totals)
                    tok_s = rate(lambda p: llm.generate(p, params), b)
                    after = llm.engine.totals
                    calls = after["steps"] - before.get("steps", 0)
                    model_steps = after["model_steps"] - before.get("model_steps", 0)
                    breakdown = {k: (after[k] - before.get(k, 0)) / model_steps * 1e3 for k in after
                                 if k.endswith("seconds") or "." in k}
                    name = (f"{shards}x{experts}" + (f" N={steps}" if len(decode_steps) > 1 or steps > 1 else "")
                            + (f" mb={micro}" if len(micro_batches) > 1 or micro > 1 else "")
                            + (f" {used}" if len(transports) > 1 else ""))
                    rows.append({"layout": name, "decode_steps": steps, "micro_batches": micro, "batch": b,
                                 "transport": used, "tok_s": tok_s,
                                 "calls": calls, "model_steps": model_steps, "ms_per_step": breakdown})
    finally:
        ray.shutdown()
    base = {r["batch"]: r["tok_s"] for r in rows if r["layout"] == "single process"}
    print(f"tokens/s ({args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, two runs each; "
          "the second is timed)")
    print(f"{'layout':>20} {'batch':>5} | {'tok/s':>8} | {'vs single':>9} | ms per model step: "
          "attention+dense gate dispatch experts combine scheduler")
    for r in rows:
        r["ratio_vs_single"] = r["tok_s"] / base[r["batch"]]
        bd = r.get("ms_per_step", {})
        parts = " ".join(f"{bd.get(k, 0):.1f}" for k in (
            "attention.attention_and_dense", "attention.gate", "attention.dispatch", "expert.experts",
            "attention.combine", "scheduler_seconds")) if bd else ""
        print(f"{r['layout']:>20} {r['batch']:>5} | {r['tok_s']:8.1f} | {r['ratio_vs_single']:9.2f} | {parts}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cluster", "checkpoint": str(path), "dtype": args.dtype,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                               "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
