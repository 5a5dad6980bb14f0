"""``raymoe bench balance``: what live balancing buys on a skewed workload, in one run.

For each workload (a tiny checkpoint whose gate bias favours three experts per MoE layer, and the
model given by ``--model``/the default model with its own routing) and each layout (``1x3,1x4``):

1. start the cluster on the initial placement (contiguous experts per actor, ``--spare-slots`` free);
2. warm up (fills the router's load window), then time a batch: tokens/s and, per MoE layer, the rows
   each expert actor computed, as max/mean over the actors;
3. plan on the window and apply the plan while a batch is in flight: seconds from plan to switch,
   expert weights loaded, the longest step during the change against the median step;
4. time the same batch again on the new placement: tokens/s and max/mean per layer.

Prints a table and writes JSON. Greedy decoding of random prompts.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def _layer_rows(llm) -> dict[int, list[int]]:
    """Per MoE layer, the rows each expert actor computed since its placement was switched in."""
    import ray

    per_actor = ray.get([e.slot_load.remote() for e in llm.experts], timeout=60)
    layers = sorted(per_actor[0])
    return {layer: [sum(a[layer]) for a in per_actor] for layer in layers}


def _ratios(before: dict[int, list[int]], after: dict[int, list[int]]) -> dict[int, float]:
    out = {}
    for layer, rows in after.items():
        delta = [x - y for x, y in zip(rows, before.get(layer, [0] * len(rows)), strict=True)]
        mean = sum(delta) / len(delta)
        out[layer] = max(delta) / mean if mean else 1.0
    return out


def _moved(old, new) -> int:
    """Expert weights loaded: slots whose logical expert changed to another (not to empty)."""
    n = 0
    for a in range(new.num_actors):
        before = old.slot_contents(a) if a < old.num_actors else {}
        for layer, slots in new.slot_contents(a).items():
            was = before.get(layer, [None] * len(slots))
            n += sum(1 for s, e in enumerate(slots) if e is not None and (s >= len(was) or was[s] != e))
    return n


def _measure(llm, prompts, params) -> tuple[float, dict[int, float]]:
    start = _layer_rows(llm)
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return len(prompts) * params.max_new_tokens / seconds, _ratios(start, _layer_rows(llm))


def run_one(path, shards: int, experts: int, spare: int, dtype: str, prompts, params) -> dict:
    import ray

    from cluster.api import RayMoE

    # one model step per call: the figures are per step (the longest step during the change)
    with RayMoE.start(path, attention_shards=shards, expert_actors=experts, spare_slots=spare, dtype=dtype,
                      decode_steps=1) as llm:
        llm.generate(prompts, params)  # warm-up: the router's window fills with this load
        tok_before, ratio_before = _measure(llm, prompts, params)
        old = llm.placement
        plan = ray.get(llm.router.plan.remote(force=True), timeout=120)
        switch = {"seconds": 0.0, "moved": 0, "longest_step_ms": None, "median_step_ms": None}
        if plan.placement is not None:
            mark = len(llm.engine.step_seconds)
            load = threading.Thread(target=llm.generate, args=(prompts, params))
            load.start()  # the change is applied while this batch is in flight
            while len(llm.engine.step_seconds) < mark + 3 and load.is_alive():
                time.sleep(0.005)
            t0 = time.perf_counter()
            llm.engine.request_placement(plan.placement).result(600)
            switch["seconds"] = time.perf_counter() - t0
            during = list(llm.engine.step_seconds)[mark:]
            load.join()
            steps = list(llm.engine.step_seconds)[mark:]
            switch.update(moved=_moved(old, llm.placement), longest_step_ms=1e3 * max(during),
                          median_step_ms=1e3 * statistics.median(steps))
        tok_after, ratio_after = _measure(llm, prompts, params)
        replicas = sum(len(r) - 1 for t in llm.placement.layers.values() for r in t)
    return {"tok_s_before": tok_before, "tok_s_after": tok_after,
            "max_mean_before": ratio_before, "max_mean_after": ratio_after,
            "predicted_before": plan.before, "predicted_after": plan.after,
            "redundant_experts": replicas, "version": llm.placement.version, **switch}


def main(args) -> int:
    import ray

    from cluster.options import model_dir
    from model.sampling import SamplingParams
    from model.tiny import make_tiny

    layouts = [tuple(int(v) for v in lay.split("x")) for lay in (args.layouts or "1x3,1x4").split(",")]
    batch = max(int(b) for b in args.batch_sizes.split(","))
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    workloads = {"skewed (3 hot experts/layer)": make_tiny(Path(tempfile.mkdtemp(prefix="raymoe-skewed")) / "ckpt",
                                                           seed=3, hot_experts=3, hot_bias=1.0),
                 f"{Path(model_dir(args)).name} (own routing)": Path(model_dir(args))}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name, path in workloads.items():
            from model.config import ModelArgs

            vocab = ModelArgs.from_hf(path).vocab_size
            gen = torch.Generator().manual_seed(0)
            prompts = torch.randint(5, vocab, (batch, args.prompt_len), generator=gen).tolist()
            for shards, experts in layouts:
                r = run_one(path, shards, experts, args.spare_slots, args.dtype, prompts, params)
                rows.append({"workload": name, "layout": f"{shards}x{experts}", **r})
    finally:
        ray.shutdown()
    print(f"balance ({args.dtype}, batch {batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.spare_slots} spare slots per actor); max/mean = rows of the busiest expert actor over the mean, "
          "worst MoE layer")
    print(f"{'workload':>30} {'layout':>6} | {'max/mean':>15} | {'tok/s':>15} | {'switch s':>8} {'moved':>5} "
          f"{'longest/median step':>19}")
    for r in rows:
        mm = f"{max(r['max_mean_before'].values()):.2f} -> {max(r['max_mean_after'].values()):.2f}"
        tk = f"{r['tok_s_before']:.0f} -> {r['tok_s_after']:.0f}"
        st = (f"{r['longest_step_ms']:.0f}/{r['median_step_ms']:.0f} ms" if r["longest_step_ms"] is not None
              else "no change")
        print(f"{r['workload']:>30} {r['layout']:>6} | {mm:>15} | {tk:>15} | {r['seconds']:8.2f} {r['moved']:5d} "
              f"{st:>19}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "balance", "dtype": args.dtype, "batch": batch,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                               "spare_slots": args.spare_slots, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
