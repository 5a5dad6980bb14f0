"""``raymoe bench generate``: decode tokens/s of raymoe's single process vs transformers' ``generate``.

Both run greedy decoding with their KV cache on the same checkpoint, same dtype, same prompts
(random token ids, equal lengths so transformers needs no padding), in one run; with ``--compile``
raymoe's compiled decode steps are a third contender. Decode rate is
``batch * (N - 1) / (t(N new tokens) - t(1 new token))``, which removes prefill from all; prefill
is ``t(1 new token)``, the time to the first token of the whole batch. Each time is the best of
``--repeats``, and the contenders take turns within each repeat.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def _decode_rates(runs: dict, batch: int, new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """``runs``: name -> run(new_tokens). -> name -> (decode tokens/s, prefill ms), from the best of
    ``repeats`` timings each. The contenders take turns within each repeat, so a machine that slows
    down for a while slows them alike."""
    best: dict[tuple[str, int], float] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            for n in (new_tokens, 1):
                t0 = time.perf_counter()
                run(n)
                t = time.perf_counter() - t0
                best[name, n] = min(best.get((name, n), t), t)
    return {name: (batch * (new_tokens - 1) / max(best[name, new_tokens] - best[name, 1], 1e-9), best[name, 1] * 1e3)
            for name in runs}


def main(args) -> int:
    from cluster.options import model_dir
    from model.generate import LocalLLM
    from model.sampling import SamplingParams

    path = model_dir(args)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = LocalLLM(path, dtype=dtype, device=device, progress=False)
    # --compile: also raymoe with its decode steps through torch.compile (compiled before timing)
    compiled = None
    if args.compile:
        try:
            compiled = LocalLLM(path, dtype=dtype, device=device, progress=False, compile=True)
        except ValueError as e:
            print(f"compiled decode steps not measured: {e}")
    hf = None
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: measuring raymoe only (pip install -e '.[test]')")
    else:
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        except (ImportError, ValueError, OSError, RuntimeError) as e:  # an FP8 checkpoint on a CPU, say
            print(f"transformers cannot run this checkpoint here ({type(e).__name__}: {str(e)[:200]}): measuring "
                  "raymoe only")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"decode tokens/s on {device}, {args.dtype}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
    header = HEADER + (COMPILED if compiled is not None else "")
    print(header + "\n" + "-" * len(header))
    for batch in batch_sizes:
        prompts = torch.randint(5, llm.args.vocab_size, (batch, args.prompt_len), generator=gen).to(device)

        def generate(model, n, prompts=prompts):
            model.generate(prompts.tolist(), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))

        runs = {"raymoe": lambda n: generate(llm, n)}
        if compiled is not None:
            generate(compiled, args.new_tokens)  # compiles the shape classes the timed runs meet, if new
            runs["compiled"] = lambda n: generate(compiled, n)
        if hf is not None:
            def run_hf(n, prompts=prompts):
                with torch.inference_mode():
                    hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

            runs["transformers"] = run_hf
        rates = _decode_rates(runs, batch, args.new_tokens, args.repeats)
        row = {"batch": batch}
        for name, (rate, prefill) in rates.items():
            row[f"{name}_tok_s"], row[f"{name}_prefill_ms"] = rate, prefill
        if hf is not None:
            row["ratio"] = row["raymoe_tok_s"] / row["transformers_tok_s"]
            if compiled is not None:
                row["compiled_ratio"] = row["compiled_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        print(_format_row(row) + (_format_compiled(row) if compiled is not None else ""), flush=True)

    result = {
        "benchmark": "generate", "checkpoint": str(path), "dtype": args.dtype, "device": device,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "compiled": compiled is not None,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


HEADER = (f"{'batch':>5} | {'raymoe tok/s':>12} | {'transformers tok/s':>18} | {'ratio':>6} | "
          f"{'prefill ms raymoe / transformers':>32}")


def _format_row(row: dict) -> str:
    nan = float("nan")
    return (f"{row['batch']:>5} | {row['raymoe_tok_s']:12.1f} | {row.get('transformers_tok_s', nan):18.1f} | "
            f"{row.get('ratio', nan):6.2f} | {row['raymoe_prefill_ms']:15.1f} / "
            f"{row.get('transformers_prefill_ms', nan):<14.1f}")


COMPILED = f" | {'compiled tok/s':>14} | {'compiled ratio':>14}"


def _format_compiled(row: dict) -> str:
    return f" | {row['compiled_tok_s']:14.1f} | {row.get('compiled_ratio', float('nan')):14.2f}"
