"""The cluster serves DeepSeek-V3.2 (the indexer's keys live in each attention shard's cache pages)
and equals the single process, bf16 and FP8 checkpoints, with prompts longer than ``index_topk``,
chunked prefill and concurrent requests; and a live rebalance changes nothing."""

import pytest

from cluster.api import RayMoE
from model.generate import LocalLLM
from model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=2)
PROMPTS = [list(range(5, 45)), "The cluster of actors is large and the router sends tokens", [5, 6, 7],
           "Streaming tokens to the user please, many of them"]


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def v32(request, tmp_path_factory):
    from model.tiny import make_tiny

    path = make_tiny(tmp_path_factory.mktemp("ckpt") / f"v32-{request.param}", preset="tiny-v32", seed=5,
                     fp8=request.param == "fp8")
    return path, LocalLLM(path, dtype="float32", progress=False).generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("shards,experts", [(1, 1), (2, 2)])
def test_v32_cluster_matches_single_process(ray_local, v32, shards, experts):
    path, expected = v32
    with RayMoE.start(path, attention_shards=shards, expert_actors=experts, dtype="float32",
                      max_batch_tokens=16) as llm:
        ids = [llm.submit(p, GREEDY) for p in PROMPTS]
        results = [llm.result(i) for i in ids]
        version = llm.rebalance()  # one expert actor: nothing to move, the version stays
        again = llm.generate(PROMPTS[:2], GREEDY)
    assert version == (1 if experts > 1 else 0)
    assert [r.output_ids for r in again] == [r.output_ids for r in expected[:2]]
    for got, ref in zip(results, expected, strict=True):
        assert got.output_ids == ref.output_ids
        for pg, pr in zip(got.top_logprobs, ref.top_logprobs, strict=True):
            assert max(abs(a[1] - b[1]) for a, b in zip(pg, pr, strict=True)) < 1e-3


def test_v32_preempted_requests_are_recomputed_with_their_indexer_keys(ray_local, v32):
    """A cache too small for all requests at once: the newest are preempted and recomputed later
    (latents and indexer keys alike), and outputs still equal the single process."""
    path, expected = v32
    with RayMoE.start(path, attention_shards=1, expert_actors=2, dtype="float32", num_blocks=8, block_size=8,
                      max_batch_tokens=16) as llm:
        results = [llm.result(i) for i in [llm.submit(p, GREEDY) for p in PROMPTS]]
        preemptions = llm.stats()["preemptions"]
    assert preemptions > 0
    assert [r.output_ids for r in results] == [r.output_ids for r in expected]
