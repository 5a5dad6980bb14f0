"""Cluster layouts and expert placement (no Ray needed)."""

import re
from pathlib import Path

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
    (dict(attention_shards="2"), "attention_shards must be an integer, got '2'"),
    (dict(expert_actors=True), "expert_actors must be an integer, got True"),
    (dict(num_cpus_per_actor=0), "num_cpus_per_actor must be > 0, got 0"),
    (dict(expert_actor=2), r"unknown key\(s\) \['expert_actor'\]"),
])
def test_bad_layouts_are_named(overrides, match):
    with pytest.raises(ValueError, match=f"^layout: .*{match}"):
        ClusterLayout.load(**overrides)


def test_unknown_yaml_key(tmp_path):
    (tmp_path / "l.yaml").write_text("attention_shards: 1\nexpert_actor: 2\n")
    with pytest.raises(ValueError, match="expert_actor"):
        ClusterLayout.load(tmp_path / "l.yaml")


@pytest.mark.parametrize("text,match", [
    ("attention_shards: [1\n", r"not valid YAML: while parsing a flow sequence\n  in \".*l.yaml\", line 1"),
    ("- 1\n- 2\n", "must be a mapping of layout keys .*got list"),
    ("hello\n", "must be a mapping of layout keys .*got str 'hello'"),
    ("attention_shards: 1.5\n", "attention_shards must be an integer, got 1.5"),
    ('attention_shards: "2"\n', "attention_shards must be an integer, got '2'"),
    ("attention_shards: two\n", "attention_shards must be an integer, got 'two'"),
    ("attention_shards:\n", "attention_shards must be an integer, got None"),
    ("expert_actors: true\n", "expert_actors must be an integer, got True"),
    ('spare_slots: "2"\n', "spare_slots must be an integer, got '2'"),
    ("replicas: [1]\n", r"replicas must be a mapping of expert id .*, got \[1\]"),
    ("replicas: {0: 0}\n", r"replicas must be .*extra copies \(an integer >= 1\), got \{0: 0\}"),
    ("replicas: {x: 1}\n", "replicas must be a mapping of expert id"),
    ("resources: {attention: 5}\n", r"resources must be a mapping of role: \{resource name: amount >= 0\}"),
    ('local_pipes: "yes"\n', "local_pipes must be true or false, got 'yes'"),
    ("dtype: 3\n", "dtype must be a string, got 3"),
    ("num_cpus_per_actor: 0\n", "num_cpus_per_actor must be > 0, got 0"),
    ("collective_timeout_s: 0\n", "collective_timeout_s must be > 0, got 0"),
    ("startup_timeout_s: -1\n", "startup_timeout_s must be > 0, got -1"),
    ("collective_timeout_s: .inf\n", "collective_timeout_s must be a finite number, got inf"),
    ("balance: 3\n", "balance must be a mapping of name: number"),
    ("balance: {min_gain: 2}\n", "balance: balance needs .*0 <= min_gain < 1"),
    ("autoscale: {min_expert_actors: 3, max_expert_actors: 2}\n", "autoscale: autoscale needs"),
    ("autoscale: {max_actors: 3}\n", "autoscale: .*unexpected keyword argument 'max_actors'"),
    ("micro_batches: 3\n", "micro_batches must be 1 or 2, got 3"),
    ("placement_strategy: spread\n", "placement_strategy must be one of .*, got 'spread'"),
    ("1: 2\n", r"unknown key\(s\) \[1\]"),
])
def test_bad_layout_files_name_the_file_key_and_value(tmp_path, text, match):
    path = tmp_path / "l.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^layout {re.escape(str(path))}: {match}"):
        ClusterLayout.load(path)


def test_missing_or_unreadable_layout_files_are_named(tmp_path, monkeypatch):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match=f"^layout {re.escape(str(missing))}: layout file does not exist; .*--layout"):
        ClusterLayout.load(missing)
    with pytest.raises(ValueError, match=f"^layout {re.escape(str(tmp_path))}: is a directory, not a layout file"):
        ClusterLayout.load(tmp_path)
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="b.yaml: cannot read it .*utf-8"):
        ClusterLayout.load(tmp_path / "b.yaml")
    (tmp_path / "l.yaml").write_text("attention_shards: 1\n")

    def refuse(*args, **kwargs):  # chmod 000 does not stop root, so refuse the open itself
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m, pytest.raises(ValueError, match="l.yaml: layout file is not readable"):
        m.setattr(Path, "open", refuse)
        ClusterLayout.load(tmp_path / "l.yaml")


def test_overrides_and_the_file_are_blamed_apart(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("expert_actors: 0\nreplicas: {\"0\": 1}\nresources:\n")
    layout = ClusterLayout.load(path, expert_actors=3, spare_slots=None)  # the override mends the file's value
    assert (layout.expert_actors, layout.spare_slots, layout.replicas, layout.resources) == (3, 2, {0: 1}, {})
    with pytest.raises(ValueError, match=f"^layout {re.escape(str(path))}: expert_actors must be >= 1, got 0"):
        ClusterLayout.load(path, attention_shards=0)  # both are bad: the file is named first
    path.write_text("expert_actors: 2\n")
    with pytest.raises(ValueError, match="^layout: attention_shards must be >= 1, got 0"):
        ClusterLayout.load(path, attention_shards=0)
    assert ClusterLayout.load(tmp_path / "l.yaml").expert_actors == 2
    path.write_text("")
    assert ClusterLayout.load(path) == ClusterLayout()


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
