import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Triton kernels run on CPU only in the interpreter, which must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
