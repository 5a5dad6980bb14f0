"""The cluster produces what the single process produces, for several layouts, on the tiny
checkpoint and its FP8 variant, with concurrent requests of different lengths.

Oracle: ``LocalLLM`` (the single-process model) on the same checkpoint, float32 both. Greedy ids
must be identical; top logprobs agree within 1e-3 (the expert rows are computed in different batch
groupings, so float32 sums may differ in their last bits).
"""

import pytest

from cluster.api import RayMoE
from model.generate import LocalLLM
from model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=3)
PROMPTS = ["Hello world, the expert", "A", "The cluster of actors is large and the router sends tokens", [5, 6, 7],
           "Streaming tokens to the user please"]


def _assert_same(results, reference):
    for got, ref in zip(results, reference, strict=True):
        assert got.output_ids == ref.output_ids
        assert got.text == ref.text
        for pg, pr in zip(got.top_logprobs, ref.top_logprobs, strict=True):
            assert [i for i, _ in pg] == [i for i, _ in pr]
            assert max(abs(a - b) for (_, a), (_, b) in zip(pg, pr, strict=True)) < 1e-3


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_fp8_dir):
    out = {}
    for name, path in (("bf16", tiny_dir), ("fp8", tiny_fp8_dir)):
        out[name] = LocalLLM(path, dtype="float32", progress=False).generate(PROMPTS, GREEDY)
    return out


@pytest.mark.parametrize("ckpt", ["bf16", "fp8"])
@pytest.mark.parametrize("shards,experts", [(1, 1), (1, 3), (2, 2)])
def test_cluster_matches_single_process(ray_local, tiny_dir, tiny_fp8_dir, reference, ckpt, shards, experts):
    path = tiny_dir if ckpt == "bf16" else tiny_fp8_dir
    with RayMoE.start(path, attention_shards=shards, expert_actors=experts, dtype="float32",
                      max_batch_tokens=16) as llm:  # small budget: prompts are chunked
        ids = [llm.submit(p, GREEDY) for p in PROMPTS]  # all in flight at once
        results = [llm.result(i) for i in ids]
        stats = llm.stats()
    _assert_same(results, reference[ckpt])
    assert stats["layout"]["transport"] == "pipes"  # every actor on this host: the rows went over pipes
    assert stats["totals"]["tokens_generated"] == 8 * len(PROMPTS)
    if shards > 1:  # the requests were spread over the shards
        assert stats["totals"]["steps"] < 8 * len(PROMPTS)


def test_cluster_over_gloo_matches_single_process(ray_local, tiny_dir, reference):
    """``local_pipes: false``: the same rows over gloo's point-to-point."""
    with RayMoE.start(tiny_dir, attention_shards=2, expert_actors=2, dtype="float32", max_batch_tokens=16,
                      local_pipes=False) as llm:
        assert llm.describe()["transport"] == "gloo"
        results = llm.generate(PROMPTS, GREEDY)
    _assert_same(results, reference["bf16"])


def test_cluster_matches_single_process_on_v2_lite_routing(ray_local, tmp_path):
    """DeepSeek-V2-Lite's shape of MoE: softmax scores, greedy top-6 of 32 experts without
    renormalisation, two shared experts, no q-lora; over 3 expert actors (a token's six choices reach
    most of them) with several model steps per call."""
    from model.tiny import make_tiny

    path = make_tiny(tmp_path / "v2", seed=5, model_type="deepseek_v2", scoring_func="softmax",
                     topk_method="greedy", norm_topk_prob=False, n_group=1, topk_group=1, q_lora_rank=0,
                     n_shared_experts=2, routed_scaling_factor=1.0, n_routed_experts=32, num_experts_per_tok=6)
    reference = LocalLLM(path, dtype="float32", progress=False).generate(PROMPTS, GREEDY)
    with RayMoE.start(path, attention_shards=1, expert_actors=3, dtype="float32", decode_steps=4) as llm:
        _assert_same(llm.generate(PROMPTS, GREEDY), reference)


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_dir):
    """2 attention shards x 2 expert actors, experts 0 and 12 with a second copy on the other actor."""
    with RayMoE.start(tiny_dir, attention_shards=2, expert_actors=2, dtype="float32", spare_slots=1,
                      replicas={0: 1, 12: 1}) as llm:
        yield llm


def test_replicated_experts_give_same_outputs_and_share_tokens(cluster, reference):
    import ray

    _assert_same(cluster.generate(PROMPTS, GREEDY), reference["bf16"])
    contents = [ray.get(e.slot_contents.remote()) for e in cluster.experts]
    loads = [ray.get(e.slot_load.remote()) for e in cluster.experts]
    for expert in (0, 12):
        for layer in cluster.args.moe_layers:
            holders = [(a, c[layer].index(expert)) for a, c in enumerate(contents) if expert in c[layer]]
            assert len(holders) == 2  # two physical copies on two actors
        # over all MoE layers, each copy took part of the expert's tokens
        for a, _ in holders:
            total = sum(loads[a][layer][contents[a][layer].index(expert)] for layer in cluster.args.moe_layers)
            assert total > 0, f"replica of expert {expert} on actor {a} got no tokens"


def test_seeded_sampling_matches_single_process(cluster, tiny_llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=11, max_new_tokens=10, ignore_eos=True)
    got = cluster.generate(["Hello", "The router"], params)
    ref = tiny_llm.generate(["Hello", "The router"], params)
    assert [r.output_ids for r in got] == [r.output_ids for r in ref]


def test_stop_string_and_streaming(cluster, tiny_llm):
    base = tiny_llm.generate(["The expert"], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0]
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    params = SamplingParams(temperature=0, max_new_tokens=12, stop=(stop,), ignore_eos=True)
    rid = cluster.submit("The expert", params)
    events = list(cluster.stream(rid))
    assert events[-1].finished and events[-1].result.finish_reason == "stop"
    assert "".join(e.text for e in events) == base.text[: base.text.find(stop)] == events[-1].result.text


def test_prompt_too_long_is_rejected_and_cluster_keeps_serving(cluster, reference):
    too_long = [5] * cluster.args.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        cluster.submit(too_long, GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        cluster.submit("hi", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cluster.submit([1, 10**7], GREEDY)
    _assert_same(cluster.generate(PROMPTS[:2], GREEDY), reference["bf16"][:2])


def test_cancel_frees_blocks(cluster):
    rid = cluster.submit("Hello there", SamplingParams(temperature=0, max_new_tokens=3000, ignore_eos=True))
    stream = cluster.stream(rid)
    first = next(stream)
    assert not first.finished
    assert sum(s["blocks_used"] for s in cluster.stats()["shards"]) > 0
    cluster.cancel(rid)
    last = [e for e in stream][-1]
    assert last.finished and last.result.finish_reason == "cancelled"
    assert len(last.result.output_ids) < 3000
    assert sum(s["blocks_used"] for s in cluster.stats()["shards"]) == 0
