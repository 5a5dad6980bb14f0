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
