"""transformers looks for a top-level ``kernels`` package (hub kernels); ours must not be taken for it."""

import pytest
import torch


def test_transformers_does_not_mistake_our_kernels_package(tiny_dir):
    transformers = pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_kernels_available

    import kernels

    assert hasattr(kernels, "fp8_gemm")  # ours is the one importable
    assert not is_kernels_available()
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
