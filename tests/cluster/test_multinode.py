"""A simulated three-node Ray cluster: attention and expert actors land on different nodes (by
custom resources) and the outputs still match the single process."""

import os

import pytest

from cluster.api import RayMoE
from model.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    attention_node = cluster.add_node(num_cpus=2, resources={"attention_node": 2})
    expert_node = cluster.add_node(num_cpus=2, resources={"expert_node": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield {"attention": attention_node.node_id, "expert": expert_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def test_actors_on_their_nodes_and_outputs_match(three_nodes, tiny_dir, tiny_llm):
    import ray

    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = ["Hello world", "The expert router", [9, 8, 7, 6]]
    with RayMoE.start(tiny_dir, attention_shards=1, expert_actors=2, dtype="float32",
                      resources={"attention": {"attention_node": 1}, "expert": {"expert_node": 1}}) as llm:
        attention_nodes = {ray.get(a.node_id.remote()) for a in llm.attention}
        expert_nodes = {ray.get(e.node_id.remote()) for e in llm.experts}
        results = llm.generate(prompts, params)
    assert attention_nodes == {three_nodes["attention"]}
    assert expert_nodes == {three_nodes["expert"]}
    ref = tiny_llm.generate(prompts, params)
    assert [r.output_ids for r in results] == [r.output_ids for r in ref]
