"""Single-process generation: batching, sampling, stop conditions, errors."""

import pytest
import torch

from model.sampling import SamplingParams, sample

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=3)
PROMPTS = ["Hello world, the expert", "A", "The cluster of actors is large and the router", [5, 6, 7, 8, 9, 10]]


def test_batched_equals_one_by_one(tiny_llm):
    batched = tiny_llm.generate(PROMPTS, GREEDY)
    for prompt, b in zip(PROMPTS, batched, strict=True):
        single = tiny_llm.generate([prompt], GREEDY)[0]
        assert single.output_ids == b.output_ids
        assert len(b.output_ids) == 10 and b.finish_reason == "length"
        for ps, pb in zip(single.top_logprobs, b.top_logprobs, strict=True):
            assert [i for i, _ in ps] == [i for i, _ in pb]
            assert max(abs(x - y) for (_, x), (_, y) in zip(ps, pb, strict=True)) < 1e-4


def test_greedy_matches_argmax_of_full_forward(tiny_llm):
    from tests.helpers import full_logits

    prompt = tiny_llm.encode("Hello world")
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0]
    logits = full_logits(tiny_llm.model, [prompt + out.output_ids])[0]
    expected = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert out.output_ids == expected


def test_logprobs_are_log_softmax_of_logits(tiny_llm):
    from tests.helpers import full_logits

    prompt = tiny_llm.encode("tokens")
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True,
                                                     logprobs=4))[0]
    logits = full_logits(tiny_llm.model, [prompt + out.output_ids])[0]
    for k, top in enumerate(out.top_logprobs):
        lp = torch.log_softmax(logits[len(prompt) - 1 + k], -1)
        vals, idx = lp.topk(4)
        assert [i for i, _ in top] == idx.tolist()
        assert max(abs(a - b) for (_, a), b in zip(top, vals.tolist(), strict=True)) < 1e-4
        assert out.output_ids[k] == top[0][0]


def test_picked_token_logprob_when_sampling(tiny_llm):
    from tests.helpers import full_logits

    prompt = tiny_llm.encode("tokens")
    out = tiny_llm.generate([prompt], SamplingParams(temperature=1.5, seed=3, max_new_tokens=6, ignore_eos=True,
                                                     logprobs=1))[0]
    logits = full_logits(tiny_llm.model, [prompt + out.output_ids])[0]
    assert len(out.token_logprobs) == len(out.output_ids) == 6
    for k, (token, got) in enumerate(zip(out.output_ids, out.token_logprobs, strict=True)):
        assert abs(got - float(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[token])) < 1e-4


def test_seeded_sampling_is_reproducible_and_varies(tiny_llm):
    p = dict(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, ignore_eos=True)
    a = tiny_llm.generate(["Hello"], SamplingParams(seed=7, **p))[0].output_ids
    b = tiny_llm.generate(["Hello"], SamplingParams(seed=7, **p))[0].output_ids
    others = {tuple(tiny_llm.generate(["Hello"], SamplingParams(seed=s, **p))[0].output_ids) for s in range(4)}
    assert a == b
    assert len(others) > 1


def test_top_k_one_is_greedy(tiny_llm):
    greedy = tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0]
    topk1 = tiny_llm.generate(["Hello"], SamplingParams(temperature=1.5, top_k=1, seed=3, max_new_tokens=8,
                                                        ignore_eos=True))[0]
    assert greedy.output_ids == topk1.output_ids


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(top_k=2), gen)[0] for _ in range(200)}
    assert picks == {0, 1}
    # probabilities ~[0.66, 0.24, 0.09, ...]: top_p 0.7 keeps the first two
    picks = {sample(logits, SamplingParams(top_p=0.7), gen)[0] for _ in range(300)}
    assert picks == {0, 1}


def test_stop_token_and_eos(tiny_llm):
    base = tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0]
    stop_at = base.output_ids[3]
    first = base.output_ids.index(stop_at)
    out = tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=8,
                                                      stop_token_ids=(stop_at,)))[0]
    assert out.output_ids == base.output_ids[:first + 1] and out.finish_reason == "stop"


def test_stop_string_truncates_text(tiny_llm):
    base = tiny_llm.generate(["The expert"], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0]
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    out = tiny_llm.generate(["The expert"], SamplingParams(temperature=0, max_new_tokens=12, stop=(stop,),
                                                           ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]


def test_streamed_pieces_add_up_to_text(tiny_llm):
    pieces = {}
    res = tiny_llm.generate(["Hello", "World"], SamplingParams(temperature=0, max_new_tokens=15, ignore_eos=True),
                            on_token=lambda i, p: pieces.setdefault(i, []).append(p))
    for i, r in enumerate(res):
        assert "".join(pieces[i]) == r.text


def test_prompt_too_long_is_a_clear_error(tiny_llm):
    n = tiny_llm.args.max_position_embeddings
    with pytest.raises(ValueError, match="context is"):
        tiny_llm.generate([[5] * n], GREEDY)


def test_max_new_tokens_beyond_the_context_is_a_clear_error(tiny_llm):
    n = tiny_llm.args.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_new_tokens {n + 1} is more than the model's context of {n}"):
        tiny_llm.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=n + 1))


def test_max_new_tokens_capped_by_context(tiny_llm):
    n = tiny_llm.args.max_position_embeddings
    out = tiny_llm.generate([[5] * (n - 3)], SamplingParams(temperature=0, max_new_tokens=50,
                                                            ignore_eos=True))[0]
    assert len(out.output_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(logprobs=-1), dict(temperature=float("inf")),
                                 dict(top_k=2.5), dict(top_k=True), dict(seed="7"), dict(seed=1.5),
                                 dict(logprobs=1.5), dict(max_new_tokens=2**40), dict(stop=[1]),
                                 dict(ignore_eos="yes")])
def test_invalid_sampling_rejected(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        SamplingParams(**bad)


def test_out_of_vocab_ids_rejected(tiny_llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.generate([[1, 2, 10**6]], GREEDY)


@pytest.mark.parametrize("temperature", [1e-38, 1e-6])
def test_a_vanishing_temperature_is_greedy(tiny_llm, temperature):
    """logits / 1e-38 overflow to inf, and the draw failed the whole step (every request of the
    batch): under ``GREEDY_BELOW`` a temperature is greedy, as vLLM treats it."""
    params = SamplingParams(temperature=temperature, max_new_tokens=8, ignore_eos=True)
    assert params.greedy and params.temperature == 0
    prompt = [[5, 6, 7, 8]]
    assert tiny_llm.generate(prompt, params)[0].output_ids == tiny_llm.generate(
        prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0].output_ids


def test_logits_that_are_not_finite_pick_the_best_finite_token():
    from model.sampling import sample

    logits = torch.tensor([0.0, float("nan"), 3.0, float("-inf"), 1.0])
    params = SamplingParams(temperature=0.7, seed=3)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, params, gen)[0] == 2
    assert sample(torch.full((4,), float("nan")), params, gen)[0] in range(4)


def test_every_eos_id_of_generation_config_ends_a_sequence(tiny_dir, tmp_path):
    """generation_config.json's eos_token_id list stops generation on each id (as transformers'
    generate and vLLM stop), unless ignore_eos."""
    import json
    import shutil

    from model.generate import LocalLLM

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, path)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    plain = LocalLLM(path, dtype="float32", progress=False)
    free = plain.generate([[5, 6, 7, 8]], params)[0].output_ids
    extra = free[2]
    first = free.index(extra)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [*plain.eos_token_ids, extra]}))
    llm = LocalLLM(path, dtype="float32", progress=False)
    assert extra in llm.eos_token_ids
    stopped = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert stopped.output_ids == free[:first + 1] and stopped.finish_reason == "stop"
    assert llm.generate([[5, 6, 7, 8]], params)[0].output_ids == free
