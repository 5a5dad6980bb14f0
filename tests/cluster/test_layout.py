"""Cluster layouts and expert placement (no Ray needed)."""

import pytest

from actors.placement import Placement, RoutingTable
from cluster.layout import ClusterLayout


def test_default_layout_loads():
    layout = ClusterLayout.load()
    assert (layout.attention_shards, layout.expert_actors, layout.backend) == (1, 2, "gloo")
    assert ClusterLayout.load(attention_shards=3, expert_actors=None).attention_shards == 3


@pytest.mark.parametrize("overrides,match", [
    (dict(resources={"expert": {"gpu_group_0": 1}}), "_group_"),
    (dict(resources={"workers": {"x": 1}}), "unknown roles"),
    (dict(device="tpu"), "device"),
    (dict(expert_actors=0), "expert_actors"),
])
def test_bad_layouts_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        ClusterLayout.load(**overrides)


def test_unknown_yaml_key(tmp_path):
    (tmp_path / "l.yaml").write_text("attention_shards: 1\nexpert_actor: 2\n")
    with pytest.raises(ValueError, match="expert_actor"):
        ClusterLayout.load(tmp_path / "l.yaml")


def test_placement_and_replica_choice():
    p = Placement.initial([1, 2], n_experts=8, num_actors=2, spare_slots=1, replicas={0: 1, 6: 1})
    assert p.slot_contents(0)[1] == [0, 1, 2, 3, 6] and p.slot_contents(1)[1] == [4, 5, 6, 7, 0]
    table = RoutingTable(p, first_expert_rank=2)
    import torch

    rank, slot = table.choose(1, torch.tensor([[0, 4], [0, 6], [0, 1], [0, 6]]))
    experts = [0, 4, 0, 6, 0, 1, 0, 6]
    picks = [(e, r, s) for e, r, s in zip(experts, rank.tolist(), slot.tolist(), strict=True)]
    # expert 0's four tokens alternate between its copies (rank 2 slot 0, rank 3 slot 4); so do expert 6's
    assert [(r, s) for e, r, s in picks if e == 0] == [(2, 0), (3, 4), (2, 0), (3, 4)]
    assert [(r, s) for e, r, s in picks if e == 6] == [(3, 2), (2, 4)]
    assert [(r, s) for e, r, s in picks if e in (1, 4)] == [(3, 0), (2, 1)]
    with pytest.raises(ValueError, match="spare slot"):
        Placement.initial([1], n_experts=8, num_actors=2, spare_slots=0, replicas={0: 1})
