"""Helpers shared by the test suites."""

import json
from pathlib import Path

import torch


def rewrite_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def remove_tensors(ckpt: Path, names: list[str]) -> None:
    """Delete ``names`` from a sharded checkpoint's files and from its index."""
    from safetensors.torch import load_file, save_file

    from model.checkpoint import INDEX_FILE

    index = json.loads((ckpt / INDEX_FILE).read_text())
    for file in {index["weight_map"][n] for n in names}:
        tensors = load_file(ckpt / file)
        for n in names:
            tensors.pop(n, None)
        save_file(tensors, ckpt / file, metadata={"format": "pt"})
    for n in names:
        del index["weight_map"][n]
    (ckpt / INDEX_FILE).write_text(json.dumps(index))


def full_logits(model, token_rows: list[list[int]], absorb: bool = True) -> list[torch.Tensor]:
    """Logits of every position of each sequence, all sequences in one flattened forward."""
    from model.cache import MLACache

    total = sum(len(r) for r in token_rows)
    device = model.lm_head.weight.device
    cache = MLACache(model.args, model.num_layers, total // 4 + len(token_rows), 4, model.dtype, device)
    meta = cache.build_meta([(i, 0, len(r)) for i, r in enumerate(token_rows)])
    ids = torch.tensor([t for r in token_rows for t in r], device=device)
    logits = model.logits(model(ids, meta, cache, absorb=absorb))
    return [logits[meta.query_starts[i]:meta.query_starts[i + 1]] for i in range(len(token_rows))]
