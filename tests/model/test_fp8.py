"""An FP8 checkpoint (block-quantised weights + float32 scale_inv) agrees with its dequantised twin."""

import json

import torch
from safetensors import safe_open

from model.checkpoint import CheckpointReader, load_model
from model.tiny import quantize_weight
from tests.helpers import full_logits


def test_fp8_checkpoint_layout(tiny_fp8_dir):
    cfg = json.loads((tiny_fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    reader = CheckpointReader(tiny_fp8_dir)
    name = "model.layers.1.self_attn.q_b_proj.weight"  # [heads*qk_head_dim=192, q_lora_rank=96]: ragged
    t = reader.read([name, name + "_scale_inv"])
    assert t[name].dtype == torch.float8_e4m3fn and list(t[name].shape) == [192, 96]
    assert t[name + "_scale_inv"].dtype == torch.float32 and list(t[name + "_scale_inv"].shape) == [2, 1]
    assert "model.embed_tokens.weight" in reader and "lm_head.weight" in reader
    with safe_open(tiny_fp8_dir / reader.weight_map["lm_head.weight"], "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # head stays bf16, as in DeepSeek-V3


def test_quantize_weight_round_trip():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, s = quantize_weight(w)
    assert list(s.shape) == [3, 2]
    from kernels.reference import weight_dequant_float

    back = weight_dequant_float(q, s)
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 of each value, block-scaled
    assert ((back - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-9).all()


def _median_rel_err(a, b):
    return ((a - b).abs().mean(-1) / b.abs().mean()).median().item()


def test_fp8_model_matches_dequantised_twin(tiny_fp8_dir):
    """The FP8 path quantises activations per token (groups of 128, e4m3: ~3% rounding per value),
    the twin runs the same dequantised weights on unquantised activations. Tolerance: median
    per-position mean |diff| <= 12% of mean |logit| (4 layers of a random model, where near-tie
    expert choices flip for some tokens), and most greedy tokens agree."""
    fp8 = load_model(tiny_fp8_dir, torch.float32, progress=False)
    twin = load_model(tiny_fp8_dir, torch.float32, progress=False, dequantize_fp8=True)
    assert fp8.model.layers[1].self_attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
    assert twin.model.layers[1].self_attn.q_b_proj.weight.dtype == torch.float32
    rows = [list(range(1, 30)), list(range(200, 230))]
    for a, b in zip(full_logits(fp8, rows), full_logits(twin, rows), strict=True):
        assert _median_rel_err(a, b) < 0.12
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.7


def test_fp8_linear_close_to_dequantised_matmul(tiny_fp8_dir):
    fp8 = load_model(tiny_fp8_dir, torch.float32, progress=False)
    lin = fp8.model.layers[1].self_attn.q_b_proj
    x = torch.randn(16, lin.in_features, generator=torch.Generator().manual_seed(0))
    want = x @ lin.dense_weight(torch.float32).T
    # activation rounding (<= 2^-4 relative per value) averages down over the 96-long dot products
    assert ((lin(x) - want).abs().mean() / want.abs().mean()).item() < 0.03


def test_fp8_close_to_bf16_original(tiny_dir, tiny_fp8_dir):
    """Quantisation error of the FP8 checkpoint vs the bf16 one made from the same seed."""
    fp8 = load_model(tiny_fp8_dir, torch.float32, progress=False)
    ref = load_model(tiny_dir, torch.float32, progress=False)
    rows = [list(range(1, 30))]
    a, b = full_logits(fp8, rows)[0], full_logits(ref, rows)[0]
    assert _median_rel_err(a, b) < 0.15
