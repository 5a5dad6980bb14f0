"""The expert-placement planner: exact small cases and invariants on random loads."""

import random

import pytest

from actors.placement import Placement
from actors.planner import actor_loads, imbalance, plan


def _check_valid(p: Placement, n_experts: int) -> None:
    """Every logical expert has >= 1 copy, copies on distinct actors, no slot used twice, slots in range."""
    for layer, table in p.layers.items():
        assert len(table) == n_experts
        used = set()
        for e, replicas in enumerate(table):
            assert replicas, f"layer {layer}: expert {e} has no copy"
            actors = [a for a, _ in replicas]
            assert len(set(actors)) == len(actors), f"layer {layer}: two copies of {e} on one actor"
            for a, s in replicas:
                assert 0 <= a < p.num_actors and 0 <= s < p.slots_per_actor
                assert (a, s) not in used, f"layer {layer}: slot {(a, s)} used twice"
                used.add((a, s))


def test_docstring_example_one_replica_in_the_spare_slot():
    current = Placement(2, 3, {1: [[(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)]]})
    new, report = plan({1: [90, 5, 3, 2]}, current)
    assert new.layers[1] == [[(0, 0), (1, 2)], [(0, 1)], [(1, 0)], [(1, 1)]]
    assert new.version == 1
    assert report.before[1] == pytest.approx(95 / 50)
    assert report.after[1] == pytest.approx(1.0)
    assert report.moved == 1 and report.changed_layers == [1]


def test_balanced_load_keeps_the_current_placement_object():
    current = Placement.initial([1, 2], 8, 2, spare_slots=1)
    new, report = plan({1: [10] * 8, 2: [10] * 8}, current)
    assert new is current
    assert report.moved == 0 and report.changed_layers == []


def test_no_load_changes_nothing():
    current = Placement.initial([1], 4, 2, spare_slots=1)
    new, _ = plan({1: [0, 0, 0, 0]}, current)
    assert new is current


def test_swaps_experts_without_replicas_when_there_is_no_spare_slot():
    # actor 0 holds the two hot experts; one of them must change places with a cold one
    current = Placement.initial([3], 4, 2, spare_slots=0)
    new, report = plan({3: [40, 40, 10, 10]}, current)
    _check_valid(new, 4)
    assert report.before[3] == pytest.approx(80 / 50)
    assert actor_loads(new.layers[3], [40, 40, 10, 10], 2) == [50, 50]
    assert report.moved == 2  # one hot expert out, one cold one in


def test_hot_expert_replicated_onto_every_actor_when_it_dominates():
    current = Placement.initial([1], 6, 3, spare_slots=2)
    w = [600, 1, 1, 1, 1, 1]
    new, report = plan({1: w}, current)
    _check_valid(new, 6)
    assert len(new.layers[1][0]) == 3
    assert report.after[1] < 1.02
    assert report.after[1] == pytest.approx(imbalance(new.layers[1], w, 3))


def test_only_changed_layers_are_replanned():
    current = Placement.initial([1, 2], 4, 2, spare_slots=1)
    new, report = plan({1: [10, 10, 10, 10], 2: [90, 5, 3, 2]}, current)
    assert report.changed_layers == [2]
    assert new.layers[1] == current.layers[1]
    assert new.version == current.version + 1


def test_rescale_to_more_actors_places_every_layer_and_keeps_experts_in_place():
    current = Placement.initial([1], 8, 2, spare_slots=1)  # 2 actors x 5 slots
    w = [10] * 8
    new, report = plan({1: w}, current, num_actors=4, slots_per_actor=3)
    _check_valid(new, 8)
    assert new.num_actors == 4 and new.slots_per_actor == 3 and new.version == 1
    assert report.after[1] == pytest.approx(1.0)
    # experts that stay on actors 0 and 1 keep their slot
    kept = [(e, r) for e, reps in enumerate(new.layers[1]) for r in reps if r in current.layers[1][e]]
    assert len(kept) >= 4


def test_rescale_to_fewer_actors():
    current = Placement.initial([1], 8, 4, spare_slots=1)  # 4 actors x 3 slots
    new, report = plan({1: [50, 1, 1, 1, 1, 1, 1, 1]}, current, num_actors=2, slots_per_actor=5)
    _check_valid(new, 8)
    assert new.num_actors == 2
    assert len(new.layers[1][0]) == 2  # the hot expert on both actors
    assert report.after[1] <= report.before[1]


def test_hierarchical_keeps_groups_on_one_node():
    current = Placement.initial([1], 8, 4, spare_slots=1)
    w = [30, 30, 1, 1, 5, 5, 5, 5]
    new, _ = plan({1: w}, current, actor_node=[0, 0, 1, 1], n_group=2)
    _check_valid(new, 8)
    node = [0, 0, 1, 1]
    for g in range(4):
        nodes = {node[a] for e in (2 * g, 2 * g + 1) for a, _ in new.layers[1][e]}
        assert len(nodes) == 1, f"group {g} split over nodes {nodes}"


@pytest.mark.parametrize("seed", range(25))
def test_random_loads_valid_and_never_worse_than_current(seed):
    rng = random.Random(seed)
    n_experts = rng.choice([4, 8, 16, 32])
    num_actors = rng.choice([1, 2, 3, 4])
    spare = rng.choice([0, 1, 2, 3])
    layers = [1, 2, 3]
    current = Placement.initial(layers, n_experts, num_actors, spare)
    load = {layer: [rng.paretovariate(1.2) * 10 * (rng.random() < 0.9) for _ in range(n_experts)] for layer in layers}
    new, report = plan(load, current)
    _check_valid(new, n_experts)
    for layer in layers:
        got = imbalance(new.layers[layer], load[layer], num_actors)
        assert got == pytest.approx(report.after[layer])
        assert got <= report.before[layer] * (1 + 1e-9)
        assert report.before[layer] == pytest.approx(imbalance(current.layers[layer], load[layer], num_actors))
    # replanning on the same window from the new placement changes nothing more
    again, report2 = plan(load, new)
    for layer in layers:
        assert report2.after[layer] <= report.after[layer] * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_skewed_load_reaches_the_goal_with_a_spare_slot_per_actor(seed):
    rng = random.Random(100 + seed)
    current = Placement.initial([1], 16, 3, spare_slots=2)
    w = [rng.random() for _ in range(16)]
    for e in rng.sample(range(16), 3):
        w[e] *= 20
    new, report = plan({1: w}, current)
    _check_valid(new, 16)
    assert report.after[1] <= 1.10


def test_bad_inputs_name_the_problem():
    current = Placement.initial([1], 4, 2, spare_slots=0)
    with pytest.raises(ValueError, match="every MoE layer"):
        plan({2: [1, 1, 1, 1]}, current)
    with pytest.raises(ValueError, match="4 logical experts"):
        plan({1: [1, 1, 1]}, current)
    with pytest.raises(ValueError, match="finite"):
        plan({1: [1, float("nan"), 1, 1]}, current)
    with pytest.raises(ValueError, match="do not fit"):
        plan({1: [1, 1, 1, 1]}, current, num_actors=1, slots_per_actor=3)
    with pytest.raises(ValueError, match="one node per actor"):
        plan({1: [1, 1, 1, 1]}, current, actor_node=[0])
