"""Command-line pieces that ``raymoe generate``/``batch``/``serve``/``bench`` share: the flags for
sampling and for the cluster layout, and what they mean. The entry point (``cluster/cli.py``) and
the commands import these; nothing imports the entry point back."""

from __future__ import annotations

import argparse


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=0, metavar="K", help="return the top K logprobs per token")


def sampling_from(args):
    from model.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=tuple(args.stop),
                          ignore_eos=args.ignore_eos, logprobs=args.logprobs)


def model_dir(args):
    if args.model:
        return args.model
    from model.tiny import default_checkpoint

    return str(default_checkpoint())


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="join this Ray cluster (default: start embedded Ray)")
    p.add_argument("--layout", help="cluster layout YAML (default: configs/cluster/local.yaml)")
    p.add_argument("--attention-shards", type=int)
    p.add_argument("--expert-actors", type=int)
    p.add_argument("--spare-slots", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--speculative-tokens", type=int, metavar="K",
                   help="MTP speculative decoding: draft K tokens per step with the model's MTP layer (0: off)")
    p.add_argument("--decode-steps", type=int, metavar="N",
                   help="model steps per actor call while every sequence decodes (default: the layout's)")
    p.add_argument("--micro-batches", type=int, choices=[1, 2],
                   help="2: overlap one micro-batch's attention with the other's experts (default: the layout's)")


def layout_overrides(args) -> dict:
    return {"attention_shards": args.attention_shards, "expert_actors": args.expert_actors,
            "spare_slots": args.spare_slots, "device": args.device, "dtype": args.dtype,
            "speculative_tokens": args.speculative_tokens, "decode_steps": args.decode_steps,
            "micro_batches": args.micro_batches}
