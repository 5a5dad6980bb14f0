"""The float routed-expert path: both of ``swiglu_sorted``'s strategies (padded batched matmuls for
small batches, a loop over experts for skewed large ones) equal each expert's SwiGLU written out."""

import pytest
import torch
import torch.nn.functional as F

from kernels.moe import pad_experts, sort_by_expert, swiglu_sorted


@pytest.mark.parametrize("tokens,skew,padded", [(1, False, True), (9, False, True), (64, False, True),
                                                (2000, True, False)])
def test_swiglu_sorted_equals_each_expert(tokens, skew, padded):
    g = torch.Generator().manual_seed(tokens)
    e, hidden, inter, top_k = 8, 24, 40, 2
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    gate, up = torch.randn(e, inter, hidden, generator=g, dtype=torch.float64), torch.randn(
        e, inter, hidden, generator=g, dtype=torch.float64)
    down = torch.randn(e, hidden, inter, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(tokens)])
    if skew:  # every token's first choice is expert 3: padding would waste 4x, so it loops
        idx[:, 0] = 3
        idx[:, 1] = torch.where(idx[:, 1] == 3, 4, idx[:, 1])
    order, rows, offsets = sort_by_expert(idx, e)
    assert pad_experts(offsets.tolist(), hidden, inter, "cpu") == padded
    got = swiglu_sorted(x[rows], offsets, gate, up, down)
    expert = idx.flatten()[order]
    want = torch.stack([F.linear(F.silu(F.linear(x[r], gate[k])) * F.linear(x[r], up[k]), down[k])
                        for r, k in zip(rows.tolist(), expert.tolist(), strict=True)])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_pad_experts_weighs_padding_flops_against_loop_operations():
    """Padding wins while its flops cost less than a loop's extra operations: the default model's
    decode batches pad, its skewed prefill loops, and big experts (V2-Lite's 2048 x 1408) loop as soon
    as a few rows would be padding; a GPU launch costs more flops than a CPU operation."""
    balanced, skewed = [0, 30, 58, 96, 128], [0, 763, 1600, 2900, 4096]
    assert pad_experts(balanced, 160, 64, "cpu")
    assert not pad_experts(skewed + [4096] * 12, 160, 64, "cpu")  # 16 experts, 4 of them busy
    assert not pad_experts(balanced, 2048, 1408, "cpu")
    assert pad_experts(balanced, 2048, 1408, "cuda")
    assert pad_experts([0, 0, 0], 160, 64, "cpu")  # nothing to pad


@pytest.mark.parametrize("tokens", [0, 5, 64, 65])
def test_moe_dense_form_equals_sorted_experts(tiny_dir, tokens):
    """Small batches of a model with few experts take every expert and the shared ones in two matmuls
    (``swiglu_dense``); the output equals the sorted routed experts plus the shared MLP, computed in
    float64 from the same weights. 65 tokens x 16 experts is past ``DENSE_ROWS``: the sorted path."""
    from model.checkpoint import load_model
    from model.moe import DENSE_ROWS

    model = load_model(tiny_dir, torch.float64, with_mtp=False, progress=False)
    moe = model.moe_modules[model.args.moe_layers[0]]
    assert moe.shared_experts is not None and (moe.dense(tokens) is not None) == (tokens * 16 <= DENSE_ROWS)
    x = torch.randn(tokens, model.args.hidden_size, generator=torch.Generator().manual_seed(tokens),
                    dtype=torch.float64)
    routing = moe.gate(x)
    order, rows, offsets = sort_by_expert(routing.indices, model.args.n_routed_experts)
    want = torch.zeros_like(x).index_add_(0, rows, swiglu_sorted(x[rows], offsets, *moe.stacked())
                                          * routing.weights.flatten()[order, None].double())
    want = want + moe.shared_experts(x)
    # both forms sum in float32 at least (the routing weights are float32): 1e-6
    torch.testing.assert_close(moe(x), want, atol=1e-6, rtol=1e-6)
