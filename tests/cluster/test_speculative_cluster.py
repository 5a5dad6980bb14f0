"""MTP speculative decoding and multi-step calls in the cluster: the attention shards verify drafts
(the verification rows go to the expert actors like any others), draft with their MTP layer, and
may run several model steps per call feeding back their own tokens, or split their batch in two
micro-batches; greedy output equals the single process without any of it, with continuous batching,
chunked prefill, preemption, stop strings."""

import pytest

from cluster.api import RayMoE
from model.generate import LocalLLM
from model.sampling import SamplingParams

PROMPTS = [list(range(5, 45)), "The cluster of actors is large and the router sends tokens", [5, 6, 7],
           "Streaming tokens to the user please, many of them"]


def _greedy(k=None, n=16):
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, speculative_tokens=k)


@pytest.fixture(scope="module")
def expected(tiny_dir):
    return LocalLLM(tiny_dir, dtype="float32", progress=False).generate(PROMPTS, _greedy(0))


@pytest.mark.parametrize("shards,experts,blocks,steps,micro", [(2, 1, 512, 1, 1), (1, 2, 10, 4, 1), (2, 2, 10, 2, 2)])
def test_cluster_speculative_greedy_equals_plain(ray_local, tiny_dir, expected, shards, experts, blocks, steps,
                                                 micro):
    """``micro`` 2: each shard runs its batch as two micro-batches interleaved at the MoE layers."""
    with RayMoE.start(tiny_dir, attention_shards=shards, expert_actors=experts, dtype="float32",
                      max_batch_tokens=16, num_blocks=blocks, block_size=8, speculative_tokens=2,
                      decode_steps=steps, micro_batches=micro) as llm:
        ids = [llm.submit(p, _greedy()) for p in PROMPTS]  # the layout's default: 2 drafts per step
        results = [llm.result(i) for i in ids]
        one = llm.generate(PROMPTS[:1], _greedy(1))[0]
        off = llm.generate(PROMPTS[:1], _greedy(0))[0]
        stats = llm.stats()
    assert [r.output_ids for r in results] == [r.output_ids for r in expected]
    assert one.output_ids == off.output_ids == expected[0].output_ids
    assert all(r.speculative_tokens == 2 and r.draft_tokens > 0 for r in results)
    assert one.speculative_tokens == 1 and off.speculative_tokens == 0 and off.draft_tokens == 0
    spec = stats["speculative"]
    assert spec["draft_tokens"] == sum(r.draft_tokens for r in results + [one])
    assert spec["accepted_tokens"] == sum(r.accepted_tokens for r in results + [one])
    if blocks == 10 and shards == 1:  # two shards hold twice the blocks
        assert stats["preemptions"] > 0
    if steps > 1:
        assert stats["totals"]["model_steps"] > stats["totals"]["steps"]


def test_multi_step_calls_stop_where_the_single_process_stops(ray_local, tiny_dir, expected):
    """Several model steps per call: stop strings, stop tokens and max_new_tokens end a request at the
    same token as one step per call (tokens computed past the end in the same call are dropped)."""
    stop_token = expected[1].output_ids[5]
    stop_text = expected[0].text[3:6]
    params = [SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=[stop_text]),
              SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, max_new_tokens=12)]
    want = LocalLLM(tiny_dir, dtype="float32", progress=False).generate(PROMPTS, params)
    with RayMoE.start(tiny_dir, attention_shards=1, expert_actors=2, dtype="float32", decode_steps=5) as llm:
        got = llm.generate(PROMPTS, params)
        stats = llm.stats()
    for g, w in zip(got, want, strict=True):
        assert (g.output_ids, g.text, g.finish_reason) == (w.output_ids, w.text, w.finish_reason)
    assert got[0].finish_reason == "stop" and got[1].output_ids[-1] == stop_token
    assert stats["totals"]["model_steps"] > stats["totals"]["steps"]


def test_cluster_without_mtp_refuses_drafts(ray_local, tiny_dir):
    with RayMoE.start(tiny_dir, attention_shards=1, expert_actors=1, dtype="float32") as llm:
        with pytest.raises(ValueError, match="MTP layer"):
            llm.submit("hello", _greedy(2))
