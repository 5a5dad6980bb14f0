import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The default tiny checkpoint (bf16), written once per session."""
    from model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory) -> Path:
    from model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-fp8", fp8=True, seed=0)


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir):
    from model.generate import LocalLLM

    return LocalLLM(tiny_dir, dtype="float32", progress=False)


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
    cache = MLACache(model.args, model.num_layers, total // 4 + len(token_rows), 4, model.dtype)
    meta = cache.build_meta([(i, 0, len(r)) for i, r in enumerate(token_rows)])
    ids = torch.tensor([t for r in token_rows for t in r])
    logits = model.logits(model(ids, meta, cache, absorb=absorb))
    return [logits[meta.query_starts[i]:meta.query_starts[i + 1]] for i in range(len(token_rows))]
