"""Applying a new expert placement live, at a step boundary, without a stall.

The engine owns one ``PlacementSwitch``; a change goes through three moves:

1. **prepare**: each staying expert actor starts loading the banks of the new placement in a
   background thread (``ExpertGroup.prepare``); new expert actors (scaling out) load theirs in their
   constructors. Steps go on with the old table meanwhile.
2. **ready**: every staying expert actor reports the new version staged (in its step output) and
   every new actor is up.
3. **switch**: the next step tells every attention shard the new placement and every expert actor
   to switch to it before serving a row; when the expert actors change (scaling), the process group
   is rebuilt over the new set at that step boundary instead, and removed actors are stopped.

A recovery (an actor lost) during a change aborts it: the cluster is rebuilt on the placement in
force, and the caller of ``rebalance()``/``scale_experts()`` gets the error.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import ray

from actors.placement import Placement

log = logging.getLogger("raymoe.rebalance")


@dataclass
class Change:
    placement: Placement
    future: Future = field(default_factory=Future)
    started: float = field(default_factory=time.perf_counter)
    experts: list | None = None  # the expert actors after the change (scaling); None: the same actors
    ready_refs: list = field(default_factory=list)  # new actors' first answers
    prepared: bool = False  # prepare() sent to the staying actors
    staged: bool = False  # every staying actor reported the version staged

    @property
    def version(self) -> int:
        return self.placement.version


class PlacementSwitch:
    def __init__(self, placement: Placement, router, balance=None, autoscale=None, scale=None):
        """``balance``/``autoscale``: the layout's policies (``actors.router``); ``scale(n)``: starts
        scaling to ``n`` expert actors in the background (the cluster handle's ``scale_experts``)."""
        self.placement, self.router, self.balance = placement, router, balance
        self.autoscale, self.scale = autoscale, scale
        self.change: Change | None = None
        self._plan_ref = None  # the router's answer to an automatic plan request
        self._scale_ref = None
        self._last_plan_step = 0
        self._last_scale_step = 0
        self.scaling = False  # a scale_experts() is under way (set by the cluster handle)
        self.switch_steps: list[float] = []  # seconds of each step that carried a switch

    @property
    def busy(self) -> bool:
        """A change is under way: the engine runs (empty) steps until it is switched."""
        return self.change is not None

    def request(self, placement: Placement, experts: list | None = None, ready_refs: list | None = None) -> Future:
        if self.change is not None:
            raise RuntimeError("a placement change is already under way; wait for it to finish")
        if placement.version <= self.placement.version:
            raise ValueError(f"placement version {placement.version} is not newer than {self.placement.version}")
        self.change = Change(placement, experts=experts, ready_refs=list(ready_refs or []))
        return self.change.future

    def tick(self, steps: int, engine) -> None:
        """The automatic policies, never waiting on the router: every ``balance.every_steps`` steps ask
        it for a plan and apply the plan it proposes; every ``autoscale.cooldown_steps`` ask it how many
        expert actors the load needs and start scaling when that differs."""
        self._tick_autoscale(steps)
        if self.balance is None or not self.balance.every_steps:
            return
        if self._plan_ref is not None:
            result = self._answer("_plan_ref", "planning")
            if result is None:
                return
            stale = result.placement is not None and (result.placement.version != self.placement.version + 1
                                                      or result.placement.num_actors != self.placement.num_actors)
            with engine._cv:  # user threads request changes under the same lock
                if result.placement is not None and self.change is None and not self.scaling and not stale:
                    log.info("rebalancing: predicted max/mean %.3f -> %.3f, %d expert weights to load",
                             result.before, result.after, result.moved)
                    self.request(result.placement)
            return
        if self.change is None and steps - self._last_plan_step >= self.balance.every_steps:
            self._last_plan_step = steps
            self._plan_ref = self.router.plan.remote(min_gain=self.balance.min_gain,
                                                     window_steps=self.balance.window_steps)

    def _answer(self, attr: str, what: str):
        """The router's answer to the call held in ``self.<attr>``, without waiting: ``None`` while it
        is not back; once back the ref is cleared and the value returned, or ``None`` when the call
        failed (logged: a failed decision is skipped, serving goes on)."""
        ref = getattr(self, attr)
        if not ray.wait([ref], timeout=0)[0]:
            return None
        setattr(self, attr, None)
        try:
            return ray.get(ref)
        except Exception as e:  # noqa: BLE001
            log.warning("%s failed: %s", what, e)
            return None

    def idle_tick(self, steps: int) -> None:
        """The engine is idle: the autoscale window sees a step with no rows on any expert actor, and
        the policy is asked as after a step (so a cluster that stopped getting traffic scales in)."""
        if self.autoscale is None:
            return
        n = self.placement.num_actors
        self.router.record_idle_step.remote(n)
        self._tick_autoscale(steps)

    def _tick_autoscale(self, steps: int) -> None:
        if self.autoscale is None or self.scale is None:
            return
        if self._scale_ref is not None:
            target = self._answer("_scale_ref", "autoscaling decision")
            if target not in (None, self.placement.num_actors) and self.change is None and not self.scaling:
                log.info("autoscaling the expert actors: %d -> %d", self.placement.num_actors, target)
                self.scale(target)
            return
        if steps - self._last_scale_step >= max(1, self.autoscale.cooldown_steps) and not self.scaling:
            self._last_scale_step = steps
            self._scale_ref = self.router.scale_target.remote(self.autoscale)

    def before_step(self, engine) -> tuple[Placement | None, int | None]:
        """What this step must carry: (placement for the attention shards, version the expert actors
        switch to), or (None, None). Sends ``prepare`` first; rebuilds the group when scaling is ready."""
        c = self.change
        if c is None:
            return None, None
        staying = engine.experts if c.experts is None else [e for e in c.experts if e in engine.experts]
        if not c.prepared:
            for e in staying:
                e.prepare.remote(c.placement)
            c.prepared = True
            return None, None
        if not c.staged:
            return None, None
        if c.experts is None:
            return c.placement, c.version
        if c.ready_refs:
            ready, _ = ray.wait(c.ready_refs, num_returns=len(c.ready_refs), timeout=0)
            if len(ready) < len(c.ready_refs):
                return None, None
            try:
                ray.get(ready)
            except Exception as e:  # noqa: BLE001 - a new actor that failed to start fails the change, not the step
                self.abort(f"a new expert actor failed to start: {e}", engine.experts)
                return None, None
        t0 = time.perf_counter()
        engine.regroup(c.experts, c.placement)  # a failure here is a failed step: the engine recovers
        self.switch_steps.append(time.perf_counter() - t0)
        self._done(c)
        return None, None

    def after_step(self, experts: list, expert_outputs, switched: int | None, seconds: float) -> None:
        """``expert_outputs[i]``: what ``experts[i]`` (the actors of the step just run) reported."""
        c = self.change
        if c is None:
            return
        if switched is not None and switched == c.version:
            self.switch_steps.append(seconds)
            self._done(c)
            return
        staying = [o for e, o in zip(experts, expert_outputs, strict=True) if c.experts is None or e in c.experts]
        failed = [o.stage_error for o in staying if o.stage_error]
        if c.prepared and failed:
            self.abort(f"an expert actor could not stage placement version {c.version}: {failed[0]}", experts)
            return
        if c.prepared and staying and all(o.staged_version == c.version for o in staying):
            c.staged = True  # actors that scaling removes never stage: they are not waited for

    def _done(self, c: Change) -> None:
        seconds = time.perf_counter() - c.started
        self.placement, self.change = c.placement, None
        self.router.commit.remote(c.placement, seconds)
        log.info("placement version %d in force after %.2f s", c.version, seconds)
        c.future.set_result(c.version)

    def abort(self, error: str, current_experts: list) -> None:
        """A recovery rebuilds the cluster on the placement in force: the change is dropped, and the
        actors it had started (scaling out) are stopped."""
        c, self.change = self.change, None
        if c is None:
            return
        for e in c.experts or []:
            if e not in current_experts:
                ray.kill(e, no_restart=True)
        c.future.set_exception(RuntimeError(f"the placement change was interrupted: {error}"))
