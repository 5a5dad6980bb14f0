"""The model gives the same outputs through the Triton kernels (interpreted on CPU, compiled on a
GPU host: the model runs on the GPU there) and the torch twins."""

import pytest
import torch

from model.generate import LocalLLM
from model.sampling import SamplingParams
from tests.helpers import full_logits

pytest.importorskip("triton")
PARAMS = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, logprobs=5)
PROMPTS = ["Hello experts", [7, 8, 9, 10, 11, 12, 13, 14, 15]]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton kernels take device tensors only


def _run(path, backend, monkeypatch):
    monkeypatch.setenv("RAYMOE_KERNELS", backend)
    llm = LocalLLM(path, dtype="float32", device=DEVICE, progress=False)
    logits = full_logits(llm.model, [list(range(3, 20))])[0]
    return llm.generate(PROMPTS, PARAMS), logits


@pytest.mark.parametrize("fixture", ["tiny_fp8_dir", "tiny_dir"])
def test_triton_path_matches_torch_path(fixture, request, monkeypatch):
    path = request.getfixturevalue(fixture)
    torch_out, torch_logits = _run(path, "torch", monkeypatch)
    triton_out, triton_logits = _run(path, "triton", monkeypatch)
    # both accumulate FP8 products per 128-block in float32 and round GEMM outputs to bf16 the same way;
    # only the summation order inside a block differs, so a rare bf16 rounding flip is all that may differ
    assert ((triton_logits - torch_logits).abs().mean() / torch_logits.abs().mean()).item() < 1e-3
    for a, b in zip(torch_out, triton_out, strict=True):
        assert a.output_ids == b.output_ids
        for pa, pb in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert abs(pa[0][1] - pb[0][1]) < 0.05


def test_v32_sparse_attention_through_triton_matches_torch(tmp_path, monkeypatch):
    """DeepSeek-V3.2 past index_topk: MLA reads the selected slots through ``mla_sparse``."""
    from model.tiny import make_tiny

    path = make_tiny(tmp_path / "v32", preset="tiny-v32", seed=5)
    prompts = [list(range(5, 30)), [9, 8, 7]]
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RAYMOE_KERNELS", backend)
        llm = LocalLLM(path, dtype="float32", device=DEVICE, progress=False)
        outs[backend] = llm.generate(prompts, PARAMS)
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        assert a.output_ids == b.output_ids
        for pa, pb in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert abs(pa[0][1] - pb[0][1]) < 1e-4


def test_backend_override_is_validated(monkeypatch):
    import kernels

    monkeypatch.setenv("RAYMOE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RAYMOE_KERNELS"):
        kernels.backend_for(torch.zeros(1))
