"""The router's load window, plan proposals and the autoscale policy (no Ray: the plain class)."""

import pytest

from actors.placement import Placement
from actors.planner import imbalance
from actors.router import AutoscalePolicy, BalancePolicy, Router


def _router(num_actors=2, spare=1, window=8):
    return Router(Placement.initial([1, 2], 4, num_actors, spare), n_experts=4, window=window)


def test_plan_on_the_window_and_min_gain():
    r = _router()
    for _ in range(4):
        r.record_load({1: [90, 5, 3, 2], 2: [10, 10, 10, 10]})
    result = r.plan(min_gain=0.05)
    assert result.placement is not None and result.placement.version == 1
    assert result.before == pytest.approx(95 / 50) and result.after == pytest.approx(1.0)
    assert imbalance(result.placement.layers[1], [90, 5, 3, 2], 2) == pytest.approx(1.0)
    # a gain below min_gain is not proposed unless forced
    assert r.plan(min_gain=0.5).placement is None
    assert r.plan(min_gain=0.5, force=True).placement is not None


def test_window_forgets_old_steps():
    r = _router(window=2)
    r.record_load({1: [90, 5, 3, 2], 2: [0, 0, 0, 0]})
    for _ in range(2):
        r.record_load({1: [10, 10, 10, 10], 2: [10, 10, 10, 10]})
    assert r.window_load() == {1: [20, 20, 20, 20], 2: [20, 20, 20, 20]}
    assert r.total[1] == [110, 25, 23, 22]
    assert r.plan().placement is None


def test_commit_switches_and_clears_actor_rows():
    r = _router()
    r.record_load({1: [90, 5, 3, 2], 2: [10, 10, 10, 10]})
    r.record_expert_rows([95, 5], [95, 5])
    assert r.actor_imbalance() == pytest.approx(1.9)
    new = r.plan().placement
    assert r.commit(new, 0.5) == 1
    stats = r.load_stats()
    assert stats["placement_version"] == 1 and stats["rebalances"] == 1 and stats["rebalance_seconds"] == 0.5
    assert stats["imbalance"] is None  # no rows measured on the new placement yet
    assert [e["slots"] for e in stats["experts"]] == [new.slot_contents(0), new.slot_contents(1)]
    assert [e["rows_total"] for e in stats["experts"]] == [95, 5]


def test_rescale_plan_places_every_layer_over_the_new_actors():
    r = _router()
    result = r.plan(force=True, num_actors=3, slots_per_actor=3)
    p = result.placement
    assert p.num_actors == 3 and p.slots_per_actor == 3
    for table in p.layers.values():
        assert all(replicas for replicas in table)


def test_autoscale_decides_on_a_sustained_mean():
    policy = AutoscalePolicy(min_expert_actors=1, max_expert_actors=3, scale_out_rows=100, scale_in_rows=10,
                             window_steps=3, cooldown_steps=0)
    assert policy.decide([[200, 200]] * 2, 2) == 2  # not sustained yet
    assert policy.decide([[200, 200]] * 3, 2) == 3
    assert policy.decide([[200, 200, 200]] * 3, 3) == 3  # at the maximum
    assert policy.decide([[5, 5]] * 3, 2) == 1
    assert policy.decide([[5]] * 3, 1) == 1  # at the minimum
    assert policy.decide([[50, 50]] * 3, 2) == 2
    assert policy.decide([[5, 5, 5]] * 2 + [[5, 5]], 2) == 2  # rows of another actor count do not count


@pytest.mark.parametrize("kw", [dict(min_expert_actors=3, max_expert_actors=2),
                                dict(scale_in_rows=10, scale_out_rows=5), dict(window_steps=0)])
def test_autoscale_bad_values(kw):
    with pytest.raises(ValueError, match="autoscale"):
        AutoscalePolicy(**kw)


def test_balance_bad_values():
    with pytest.raises(ValueError, match="balance"):
        BalancePolicy(every_steps=-1)
    with pytest.raises(ValueError, match="balance"):
        BalancePolicy(min_gain=1.5)


def test_plans_by_node_when_the_actors_span_several():
    r = Router(Placement.initial([1], 8, 4, 1), n_experts=8, window=8, n_group=4)
    r.set_actor_nodes(["node-a", "node-a", "node-b", "node-b"])
    r.record_load({1: [30, 30, 1, 1, 5, 5, 5, 5]})
    p = r.plan(force=True).placement
    node = {0: "node-a", 1: "node-a", 2: "node-b", 3: "node-b"}
    for group in ([0, 1], [2, 3], [4, 5], [6, 7]):
        assert len({node[a] for e in group for a, _ in p.layers[1][e]}) == 1, f"group {group} split over nodes"


def test_plan_uses_the_last_window_steps_only():
    r = _router(window=8)
    r.record_load({1: [90, 5, 3, 2], 2: [90, 5, 3, 2]})
    r.record_load({1: [10, 10, 10, 10], 2: [10, 10, 10, 10]})
    assert r.plan(window_steps=1).placement is None  # the last step alone is balanced
    assert r.plan(window_steps=2).placement is not None
