"""Decode steps through ``torch.compile`` (``Transformer.compile_decode``) against the eager model."""

import pytest
import torch

from model.generate import LocalLLM
from model.sampling import SamplingParams
from model.tiny import make_tiny

PROMPTS = [[5, 6, 7], list(range(10, 50)), [300, 2, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]


def _count_compiled_steps(llm: LocalLLM) -> list[int]:
    calls, compiled = [0], llm.model._decode

    def counted(*args):
        calls[0] += 1
        return compiled(*args)

    llm.model._decode = counted
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},  # the default tiny model: DeepSeek-V3 routing, q_lora
    dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=1,
         topk_group=1, q_lora_rank=0, n_shared_experts=2, routed_scaling_factor=1.0),
], ids=["v3", "v2-no-qlora"])
def test_compiled_decode_matches_eager(tmp_path, overrides):
    torch._dynamo.reset()  # each model gets the compiler's whole budget of recompiles
    path = make_tiny(tmp_path / "ckpt", seed=5, **overrides)
    eager = LocalLLM(path, dtype="float32", progress=False)
    compiled = LocalLLM(path, dtype="float32", progress=False, compile=True)
    calls = _count_compiled_steps(compiled)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, logprobs=3)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20, ignore_eos=True, seed=11, logprobs=3)
    for prompts, params in [(PROMPTS, greedy), (PROMPTS[:1], greedy), (PROMPTS, [greedy, sampled, sampled])]:
        want, got = eager.generate(prompts, params), compiled.generate(prompts, params)
        for w, g in zip(want, got, strict=True):
            assert g.output_ids == w.output_ids
            assert max(abs(a - b) for a, b in zip(w.token_logprobs, g.token_logprobs, strict=True)) < 1e-4
    # every step with the paged view ran as one graph (fullgraph: a break would have raised, and the model
    # would have gone eager, dropping its compiled step): 19 decode steps per generate, and the lone
    # 3-token prompt's prefill
    assert calls[0] == 3 * 19 + 1 and compiled.model._decode is not None


@pytest.mark.slow
def test_compiled_speculative_decoding_matches_eager(tiny_dir):
    torch._dynamo.reset()
    eager = LocalLLM(tiny_dir, dtype="float32", progress=False, speculative_tokens=2)
    compiled = LocalLLM(tiny_dir, dtype="float32", progress=False, speculative_tokens=2, compile=True)
    calls = _count_compiled_steps(compiled)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    want, got = eager.generate(PROMPTS, params), compiled.generate(PROMPTS, params)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    assert [g.accepted_tokens for g in got] == [w.accepted_tokens for w in want]
    # the verification steps (each sequence's token and its drafts) ran compiled, without a fallback
    assert calls[0] > 0 and compiled.model._decode is not None


def test_a_failing_compiled_step_warns_and_runs_eagerly(tiny_llm, monkeypatch):
    prompts, params = PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    want = tiny_llm.generate(prompts, params)

    def broken(*args):
        raise RuntimeError("recompile limit")

    monkeypatch.setattr(tiny_llm.model, "_decode", broken)
    monkeypatch.setattr(tiny_llm.model, "_decode_tokens", 64)
    with pytest.warns(RuntimeWarning, match="compiled decode step failed .*recompile limit.*runs eagerly"):
        got = tiny_llm.generate(prompts, params)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    assert tiny_llm.model._decode is None


def test_compile_refuses_fp8_weights(tiny_fp8_dir):
    with pytest.raises(ValueError, match="block-FP8"):
        LocalLLM(tiny_fp8_dir, dtype="bfloat16", progress=False, compile=True)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2), "routes 4 of 32 experts"),
    (dict(preset="tiny-v32"), "V3.2's indexer"),
], ids=["sorted-experts", "v32"])
def test_compile_refuses_what_it_cannot_run_as_one_graph(tmp_path, overrides, message):
    path = make_tiny(tmp_path / "ckpt", seed=1, **overrides)
    with pytest.raises(ValueError, match=message):
        LocalLLM(path, dtype="float32", progress=False, compile=True)


def test_compile_refuses_a_model_without_its_routed_experts(tiny_dir):
    from model.checkpoint import load_model
    from model.moe import experts_elsewhere

    model = load_model(tiny_dir, routed_experts=experts_elsewhere, progress=False)
    with pytest.raises(ValueError, match="whole model in one process"):
        model.compile_decode()


def test_generate_compile_needs_local(tiny_dir, capsys):
    from cluster.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--compile"]) == 2
    assert "--compile is for the single process (--local)" in capsys.readouterr().err
