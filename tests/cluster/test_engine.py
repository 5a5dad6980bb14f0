"""The engine's loop without Ray: a stand-in for the actors' step shows that every failure ends in
finished events (never a hang), recovery goes on for as long as it works, an unhealthy cluster says so,
and nothing the loop owes the actors (releases) is dropped."""

import threading

import pytest

from actors.messages import StepOutput
from cluster.engine import HEALTHY, UNHEALTHY, ClusterUnavailable, Engine
from cluster.scheduler import Scheduler
from model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=5)
TOKEN = 7


class _Remote:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def remote(self, *args):
        self.log.append((self.name, args))


class FakeRouter:
    def __init__(self):
        self.calls = []
        self.record_step = _Remote(self.calls, "record_step")
        self.set_health = _Remote(self.calls, "set_health")


class FakeEngine(Engine):
    """Steps answer at once: every sampled position gets ``TOKEN``. ``fail`` decides per call
    whether a step raises (as a lost actor does); ``gate`` can hold a step."""

    def __init__(self, shards=1, rebuild=None, fail=None, gate=None, **kw):
        self.plans_seen, self.fail, self.gate, self.calls = [], fail or (lambda n, plans: False), gate, 0
        sch = Scheduler(shards, num_blocks=64, block_size=4, max_batch_tokens=64, max_running=64)
        super().__init__(["a"] * shards, ["e"], FakeRouter(), sch, None, None, max_len=256,
                         rebuild=rebuild or (lambda: (["a"] * shards, ["e"])), backoff_s=(0.01, 0.05), **kw)

    def _run(self, plans, switch_to=None):
        self.calls += 1
        self.plans_seen.append(plans)
        if self.gate is not None:
            self.gate.wait()
        if self.fail(self.calls, plans):
            raise RuntimeError("an actor died")
        return [StepOutput({c.seq_id: [(TOKEN, [], None)] for c in p.chunks if c.sample}, {}, {}, 0) for p in plans], []


def _result(engine, rid, timeout=30):
    """The request's last event (waits at most ``timeout`` s: a hang fails the test instead of stalling it)."""
    return _final(engine.requests[rid], timeout)


def _final(req, timeout):
    while True:
        ev = req.events.get(timeout=timeout)
        if ev.finished:
            return ev.result


@pytest.fixture
def engines():
    made = []
    yield made
    for e in made:
        e.stop(timeout=5)


def test_fake_engine_generates(engines):
    engines.append(e := FakeEngine())
    r = _result(e, e.submit([1, 2, 3], GREEDY))
    assert r.output_ids == [TOKEN] * 5 and r.finish_reason == "length" and r.error is None


@pytest.mark.parametrize("where", ["schedule", "post_process"])
def test_a_failure_outside_the_step_ends_requests_with_an_error(engines, monkeypatch, where):
    engines.append(e := FakeEngine())
    target = e.scheduler if where == "schedule" else e
    name = "schedule" if where == "schedule" else "_post_process"
    original, raised = getattr(target, name), []

    def broken(*args):
        if not raised:
            raised.append(1)
            raise KeyError("boom")
        return original(*args)

    monkeypatch.setattr(target, name, broken)
    r = _result(e, e.submit([1, 2, 3], GREEDY))
    assert r.finish_reason == "error" and "boom" in r.error
    # and the engine still serves
    assert _result(e, e.submit([4, 5], GREEDY)).output_ids == [TOKEN] * 5


def test_recovery_is_not_a_lifetime_budget(engines):
    """Five actor losses, each followed by good steps: every request completes, five recoveries."""
    failing_calls = {2, 5, 8, 11, 14}  # a step fails, the probe after the rebuild passes, steps go on
    rebuilds = []

    def rebuild():
        rebuilds.append(1)
        return ["a"], ["e"]

    engines.append(e := FakeEngine(rebuild=rebuild, fail=lambda n, plans: n in failing_calls))
    ids = [e.submit([1, 2, 3 + i], SamplingParams(temperature=0, max_new_tokens=12)) for i in range(3)]
    results = [_result(e, i) for i in ids]
    assert [r.output_ids for r in results] == [[TOKEN] * 12] * 3
    assert e.totals["recoveries"] == 5 and len(rebuilds) == 5 and e.health == HEALTHY


def test_the_same_requests_failing_every_step_are_failed_not_retried_forever(engines):
    poison = {"on": True}
    engines.append(e := FakeEngine(fail=lambda n, plans: poison["on"] and any(p.chunks for p in plans)))
    r = _result(e, e.submit([1, 2, 3], GREEDY))
    assert r.finish_reason == "error" and "3 times in a row" in r.error
    poison["on"] = False
    assert _result(e, e.submit([1, 2], GREEDY)).output_ids == [TOKEN] * 5 and e.health == HEALTHY


def test_unhealthy_cluster_refuses_new_requests_and_heals_when_a_rebuild_works(engines):
    can_rebuild = threading.Event()

    def rebuild():
        if not can_rebuild.is_set():
            raise RuntimeError("no node can take the actors")
        return ["a"], ["e"]

    first = {"done": False}

    def fail(n, plans):  # the first real step loses an actor
        if not first["done"] and any(p.chunks for p in plans):
            first["done"] = True
            return True
        return False

    engines.append(e := FakeEngine(rebuild=rebuild, fail=fail))
    r = _result(e, e.submit([1, 2, 3], GREEDY))
    assert r.finish_reason == "error" and "cannot serve" in r.error
    assert e.figures()["health"]["state"] == UNHEALTHY
    assert ("set_health", (UNHEALTHY, e.health_error)) in e.router.calls
    with pytest.raises(ClusterUnavailable, match="cannot serve now"):
        e.submit([1, 2], GREEDY)
    can_rebuild.set()
    for _ in range(500):
        if e.health == HEALTHY:
            break
        threading.Event().wait(0.01)
    assert e.health == HEALTHY and e.totals["recoveries"] == 1
    assert _result(e, e.submit([1, 2], GREEDY)).output_ids == [TOKEN] * 5


def test_stop_ends_open_streams_while_a_step_is_still_running(engines):
    gate = threading.Event()
    engines.append(e := FakeEngine(gate=gate))
    rid = e.submit([1, 2, 3], GREEDY)
    while not e.plans_seen:
        threading.Event().wait(0.01)
    e.stop(timeout=0)  # the step is stuck in _run
    r = _result(e, rid, timeout=5)
    assert r.finish_reason == "error" and "stopped" in r.error
    with pytest.raises(ClusterUnavailable):
        e.submit([1], GREEDY)
    gate.set()
    e.join(timeout=10)
    assert not e._thread.is_alive()


def test_stop_ends_every_open_stream_when_finishing_forgets_old_requests(engines):
    """Failing the open requests forgets the oldest finished ones (``keep_finished``) while it goes
    through the requests: it must not stop at the first (a dict changed during iteration), leaving
    the other streams open for ever."""
    gate = threading.Event()
    gate.set()
    engines.append(e := FakeEngine(gate=gate))
    e.keep_finished = 1
    for prompt in ([1], [2]):
        _result(e, e.submit(prompt, GREEDY))
    gate.clear()
    reqs = [e.requests[e.submit([3 + i, 4], GREEDY)] for i in range(3)]  # forgotten once finished
    while not any(p.chunks for plans in e.plans_seen for p in plans if plans):
        threading.Event().wait(0.01)
    e.stop(timeout=0)
    assert [_final(req, timeout=5).finish_reason for req in reqs] == ["error"] * 3
    gate.set()


def test_releases_are_not_dropped_when_a_step_has_no_chunks(engines):
    gate = threading.Event()
    engines.append(e := FakeEngine(gate=gate))
    a = e.submit([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=200))
    while not e.plans_seen:  # the first step is held
        threading.Event().wait(0.01)
    e.cancel(a)
    gate.set()
    assert _result(e, a).finish_reason == "cancelled"
    while e.scheduler.has_work():
        threading.Event().wait(0.01)
    threading.Event().wait(0.1)  # the loop runs its empty iteration
    b = e.submit([4, 5], GREEDY)
    _result(e, b)
    released = [sid for plans in e.plans_seen for p in plans for sid in p.release]
    assert released.count(a) == 1


def test_latency_figures_stay_bounded(engines):
    engines.append(e := FakeEngine())
    ids = [e.submit([1, 2], SamplingParams(temperature=0, max_new_tokens=2)) for _ in range(1100)]
    for i in ids:
        _result(e, i)
    assert len(e.ttft) == 1000 and len(e.tpot) == 1000 and len(e.recent) <= 200
    sent = sum(len(args[0]["ttft"]) for name, args in e.router.calls if name == "record_step")
    assert sent == 1100  # every figure reached the router once


def test_capacity_bounds_every_micro_batch_of_every_model_step():
    """The bound the engine announces holds for each micro-batch the shard cuts with the same rule, in
    the call's first model step (its chunks) and the ones the shard feeds itself (1 + drafts each)."""
    from actors.messages import ChunkPlan, StepPlan
    from model.speculative import assign_micro_batches

    def chunk(n, sample=True, propose=0):
        return ChunkPlan(seq_id=0, tokens=[5] * n, start=0, block_table=[], sample=sample, propose=propose)

    plans = [StepPlan([chunk(100, sample=False), chunk(1), chunk(1)]), StepPlan([chunk(1, propose=3)] * 6)]
    assert assign_micro_batches([100, 1, 1], 2) == [0, 1, 1]
    assert assign_micro_batches([1] * 6, 2) == [0, 0, 0, 1, 1, 1]
    assert assign_micro_batches([7], 2) == [0] and assign_micro_batches([], 2) == []
    assert Engine._capacity_tokens(plans, 1) == max(102, 6 * 4)
    # micro-batches: [100] | [1, 1] and [1, 1, 1] | [1, 1, 1] with 4 tokens each in later model steps
    assert Engine._capacity_tokens(plans, 2) == max(100, 3 * 4)
