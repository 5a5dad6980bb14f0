"""Logits agree with transformers' DeepSeek models on the same checkpoint (float32).

Which oracle: transformers' ``DeepseekV3ForCausalLM`` always routes the V3 way (sigmoid, bias for
selection, group score = sum of the top two), so softmax-routed ``deepseek_v2`` checkpoints are
checked against ``DeepseekV2ForCausalLM`` (softmax, group max, no renormalisation).
Tolerance: max |logit difference| <= 2e-4 for logits of magnitude ~10 (float32 everywhere; the
two implementations differ only in summation order).
"""

import json

import pytest
import torch

from model.checkpoint import load_model
from model.tiny import make_tiny
from tests.helpers import full_logits, remove_tensors, rewrite_config

TOL = 2e-4

CASES = {
    # the default tiny: q_lora present, sigmoid/noaux_tc with 4 groups and a non-zero bias, yarn (mscale 1/1),
    # first_k_dense_replace 1, DeepSeek's own `rope_scaling` form
    "v3-default": dict(),
    # q_lora absent, first_k_dense_replace 2, two shared experts, yarn with mscale != mscale_all_dim,
    # written in transformers 5's `rope_parameters` form
    "v3-noqlora-rope_parameters": dict(
        overrides=dict(q_lora_rank=0, first_k_dense_replace=2, n_shared_experts=2),
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
                         "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
    # DeepSeek-V2-Lite's routing: softmax, greedy, no renormalisation, no q_lora, 2 shared experts
    "v2-greedy": dict(
        overrides=dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                       norm_topk_prob=False, n_group=1, topk_group=1, q_lora_rank=0, n_shared_experts=2,
                       routed_scaling_factor=1.0),
    ),
    # DeepSeek-V2's group-limited greedy routing, q_lora present, plain RoPE (no yarn)
    "v2-group-limited": dict(
        overrides=dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                       norm_topk_prob=False, n_group=4, topk_group=2, routed_scaling_factor=16.0),
        rope_scaling=False,
    ),
    # top-1 routing renormalised (weight 1 x the scaling, as transformers and DeepSeek's V3 code do),
    # a large rms_norm_eps (the q/kv latent norms keep 1e-6), linear RoPE scaling
    "v3-top1-eps-linear": dict(
        overrides=dict(num_experts_per_tok=1),
        config=dict(rms_norm_eps=0.05, rope_scaling={"type": "linear", "factor": 4.0}),
    ),
    # MoE keys left out of config.json (transformers' config class values: 1 shared expert, scaling
    # 2.5, 8 groups, top-4 groups) and a tied head with no lm_head.weight, as transformers saves one
    "v3-keys-left-out-tied": dict(
        overrides=dict(n_shared_experts=1, routed_scaling_factor=2.5, n_group=8, topk_group=4),
        config=dict(n_shared_experts=None, routed_scaling_factor=None, n_group=None, topk_group=None,
                    tie_word_embeddings=True),
        drop=["lm_head.weight"],
    ),
    # YaRN with its attention factor given outright and no original_max_position_embeddings
    # (transformers takes max_position_embeddings)
    "v3-yarn-attention-factor": dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.3},
    ),
}


def _make_case(root, name):
    case = CASES[name]
    path = make_tiny(root / name, seed=3, num_shards=3, **case.get("overrides", {}))
    if "rope_parameters" in case:
        rewrite_config(path, rope_scaling=None, rope_theta=None, rope_parameters=case["rope_parameters"],
                       max_position_embeddings=4096)
    if case.get("rope_scaling") is False:
        rewrite_config(path, rope_scaling=None)
    rewrite_config(path, **case.get("config", {}))
    if case.get("drop"):
        remove_tensors(path, case["drop"])
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    path = _make_case(tmp_path, name)
    cfg = json.loads((path / "config.json").read_text())
    oracle_cls = (transformers.DeepseekV2ForCausalLM if cfg["model_type"] == "deepseek_v2"
                  else transformers.DeepseekV3ForCausalLM)
    oracle = oracle_cls.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, torch.float32, progress=False)

    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in (17, 9)]
    ours = full_logits(model, rows)
    for row, got in zip(rows, ours, strict=True):
        with torch.no_grad():
            ref = oracle(torch.tensor([row])).logits[0].float()
        assert ref.abs().max() > 1.0  # a live model, not an all-zero one
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"{name}: max logit difference {diff:.2e} > {TOL}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_v2_routing_differs_from_v3_oracle(tmp_path):
    """The oracle choice matters: a softmax-routed checkpoint run through the V3 class disagrees."""
    transformers = pytest.importorskip("transformers")
    path = _make_case(tmp_path, "v2-group-limited")
    rewrite_config(path, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    oracle = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rewrite_config(path, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
    model = load_model(path, torch.float32, progress=False)
    row = list(range(5, 25))
    with torch.no_grad():
        ref = oracle(torch.tensor([row])).logits[0]
    assert (full_logits(model, [row])[0] - ref).abs().max() > 1e-2
