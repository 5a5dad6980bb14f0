"""The ``raymoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from cluster.options import add_cluster_flags, add_sampling_flags, layout_overrides, model_dir, sampling_from


def cmd_make_tiny(args) -> int:
    from model.tiny import make_tiny

    out = make_tiny(args.out, preset=args.preset, fp8=args.fp8, seed=args.seed, hot_experts=args.hot_experts,
                    hot_bias=args.hot_bias)
    print(f"wrote {out}")
    return 0


def cmd_generate(args) -> int:
    from model.generate import LocalLLM

    prompts: list = list(args.prompt)
    for ids in args.prompt_ids:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            raise ValueError(f"--prompt-ids takes comma-separated integers, got {ids!r}") from None
    if not prompts:
        raise ValueError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    params = sampling_from(args)
    if args.chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    if args.local:
        given = {**layout_overrides(args), "layout": args.layout, "address": args.address}
        cluster_only = [f"--{key.replace('_', '-')}" for key, value in given.items()
                        if value is not None and key not in ("dtype", "device", "speculative_tokens")]
        if cluster_only:
            raise ValueError(f"{', '.join(cluster_only)} set(s) up a cluster; --local runs one process: drop one "
                             "or the other")
        llm = LocalLLM(model_dir(args), dtype=args.dtype or "bfloat16", device=args.device or "cpu",
                       progress=not args.json, speculative_tokens=args.speculative_tokens or 0, compile=args.compile)
        results = llm.generate(prompts, params)
    elif args.compile:
        raise ValueError("--compile is for the single process (--local); the cluster's attention shards run eagerly")
    else:
        from cluster.api import RayMoE

        print("starting the cluster ...", file=sys.stderr, flush=True)
        with RayMoE.start(model_dir(args), args.layout, address=args.address, **layout_overrides(args)) as llm:
            results = llm.generate(prompts, params)
    for r in results:
        if args.json:
            print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
        else:
            print(r.text)
            print(f"[{len(r.output_ids)} tokens, finish: {r.finish_reason}]", file=sys.stderr)
        if r.error:
            print(f"error: {r.error}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def cmd_bench(args) -> int:
    if args.what == "generate":
        from cluster.bench_generate import main as bench_main
    elif args.what == "cluster":
        from cluster.bench_cluster import main as bench_main
    elif args.what == "balance":
        from cluster.bench_balance import main as bench_main
    elif args.what == "spec":
        from cluster.bench_spec import main as bench_main
    elif args.what == "sparse":
        from cluster.bench_sparse import main as bench_main
    elif args.what == "collective":
        from cluster.bench_collective import main as bench_main
    else:
        from cluster.bench_kernels import main as bench_main
    if args.out is None:
        args.out = f"bench-results/{args.what}.json"
    if args.batch_sizes is None:
        args.batch_sizes = {"spec": "1,8", "sparse": "1"}.get(args.what, "1,8,32")
    return bench_main(args)


def cmd_serve(args) -> int:
    from ui.serve import main as serve_main

    return serve_main(args)


def cmd_batch(args) -> int:
    from cluster.batch import main as batch_main

    return batch_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Serve DeepSeek-V3-architecture MoE models on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the Hugging Face format")
    p.add_argument("out")
    p.add_argument("--fp8", action="store_true", help="block-FP8 weights with *_scale_inv, as DeepSeek-V3")
    p.add_argument("--preset", default="tiny", help="a preset from configs/models (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hot-experts", type=int, default=0,
                   help="per MoE layer, favour this many experts in the gate (a skewed workload; default 0)")
    p.add_argument("--hot-bias", type=float, default=1.0, help="gate bias added to each hot expert (default 1.0)")
    p.set_defaults(func=cmd_make_tiny)

    sub.add_parser("train-tiny",  # its own parser reads its flags: main() hands it the rest of the line
                   help="train the default model on Shakespeare's plays (raymoe train-tiny --help)")

    p = sub.add_parser("generate", help="generate text for prompts")
    p.add_argument("--model", help="checkpoint folder (default: the default model, model/weights/shakespeare)")
    p.add_argument("--local", action="store_true", help="run the whole model in this process, without Ray")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], help="a prompt as token ids: 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the chat template as a user turn")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute dtype (default: the layout's, bfloat16 in configs/cluster/local.yaml)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--compile", action="store_true",
                   help="with --local: decode steps through torch.compile (a CPU, float weights, the dense "
                        "expert form of small models; 10-30 s to compile on first use)")
    add_sampling_flags(p)
    add_cluster_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="start the cluster and the web page (chat + cluster dashboard)")
    p.add_argument("--model", help="checkpoint folder (default: the default model, model/weights/shakespeare)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback")
    p.add_argument("--share", action="store_true",
                   help="also open a public Gradio share link (needs --allow-remote; GRADIO_SHARE is ignored)")
    p.add_argument("--refresh", type=float, default=2.0, help="cluster tab refresh interval, seconds")
    p.add_argument("--max-sessions", type=int, default=64, help="chat requests served at once")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $RAYMOE_API_KEY; unset: no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id of the OpenAI API (default: the checkpoint folder's name)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute dtype (default: the layout's, bfloat16 in configs/cluster/local.yaml)")
    add_cluster_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="generate for a JSON-lines file (resumable; works as a Ray job)")
    p.add_argument("--input", required=True, help="JSON lines: {id, prompt | messages, sampling fields...}")
    p.add_argument("--output", required=True, help="JSON lines, one per input id; re-runs resume")
    p.add_argument("--model", help="checkpoint folder (default: the default model, model/weights/shakespeare)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="compute dtype (default: the layout's, bfloat16 in configs/cluster/local.yaml)")
    p.add_argument("--no-progress", action="store_true")
    add_sampling_flags(p)
    add_cluster_flags(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("bench", help="benchmarks: print a table and write JSON")
    p.add_argument("what", choices=["generate", "cluster", "balance", "sparse", "kernels", "spec", "collective"])
    p.add_argument("--ks", default=None, help="spec: draft tokens per step to measure (default 1,2,3)")
    p.add_argument("--decode-steps", default=None,
                   help="cluster: model steps per actor call to measure, e.g. 1,4 (default 1)")
    p.add_argument("--micro-batches", default=None,
                   help="cluster: micro-batches per shard to measure, e.g. 1,2 (default 1)")
    p.add_argument("--transports", default=None,
                   help="cluster: what rows travel over on one host, to measure (pipes,gloo; default pipes)")
    p.add_argument("--contexts", default=None, help="sparse: context lengths (default 512,...,16384)")
    p.add_argument("--rows", default=None, help="collective: rows per expert actor (default 4,32,128)")
    p.add_argument("--model", help="checkpoint folder (default: the default model, model/weights/shakespeare)")
    p.add_argument("--batch-sizes", default=None, help="default 1,8,32 (spec: 1,8; sparse: 1, the largest given)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", default=None,
                   help="cluster layouts to measure, shards x experts (default: 1x2,2x2; balance: 1x3,1x4)")
    p.add_argument("--spare-slots", type=int, default=2, help="balance: free slots per expert actor (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="generate: where both models run (default: cuda when present, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="generate: also measure raymoe with its decode steps through torch.compile")
    p.add_argument("--out", default=None, help="JSON file (default: bench-results/WHAT.json)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-tiny"]:  # its flags are its own parser's (argparse's REMAINDER drops '--out')
        from model.train import main as train_main

        run = lambda: train_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        run = lambda: args.func(args)
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # bad input, a file that cannot be read, a failed start
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a Ray error during start-up, say: one line, not a traceback
        import ray.exceptions

        if not isinstance(e, ray.exceptions.RayError):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
