"""PlacementSwitch on stand-in step outputs (no Ray): a change is switched only when every staying
expert actor has staged it, and a staging failure aborts the change instead of leaving it pending."""

from types import SimpleNamespace

import pytest

from actors.messages import ExpertStepOutput
from actors.placement import Placement
from cluster.rebalance import PlacementSwitch


def _out(staged=None, error=None):
    return ExpertStepOutput([0], {}, 0, staged, 0, error)


def _switch():
    p = Placement.initial([1], 4, 2, 1)
    new = Placement(p.num_actors, p.slots_per_actor, p.layers, version=1)
    return PlacementSwitch(p, router=None), new


def test_waits_for_every_actor_then_switches(monkeypatch):
    sw, new = _switch()
    committed = []
    sw.router = SimpleNamespace(commit=SimpleNamespace(remote=lambda p, s: committed.append(p.version)))
    future = sw.request(new)
    sw.change.prepared = True
    sw.after_step(["e0", "e1"], [_out(1), _out(None)], None, 0.01)
    assert not sw.change.staged
    sw.after_step(["e0", "e1"], [_out(1), _out(1)], None, 0.01)
    assert sw.change.staged
    sw.after_step(["e0", "e1"], [_out(), _out()], 1, 0.02)
    assert future.result(1) == 1 and sw.placement is new and committed == [1] and not sw.busy


def test_a_staging_failure_aborts_the_change():
    sw, new = _switch()
    future = sw.request(new)
    sw.change.prepared = True
    sw.after_step(["e0", "e1"], [_out(None, "OSError: disk gone"), _out(1)], None, 0.01)
    assert not sw.busy and sw.placement.version == 0
    with pytest.raises(RuntimeError, match="could not stage placement version 1: OSError: disk gone"):
        future.result(1)
    # and a new change can be requested
    sw.request(new)
