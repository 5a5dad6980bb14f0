"""RouterActor: owns the expert placement (logical -> physical table with replicas, and its version),
the per-(layer, expert) load statistics and the rows each expert actor computes, and plans new
placements from them (``actors.planner``). It is never on the token path: the engine asks it for a
plan, applies the plan at a step boundary and then tells it the switch is done (``commit``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import ray
import torch

from actors.placement import Placement
from actors.planner import plan as plan_placement


@dataclass(frozen=True)
class BalancePolicy:
    """``balance`` in the layout: plan every ``every_steps`` steps on the load of the last
    ``window_steps`` and apply a plan only when it lowers the predicted max/mean rows per expert
    actor (the worst MoE layer) by at least ``min_gain`` (0.05 = 5%)."""

    every_steps: int = 0  # 0: no automatic balancing
    window_steps: int = 64
    min_gain: float = 0.05

    def __post_init__(self):
        if self.every_steps < 0 or self.window_steps < 1 or not 0 <= self.min_gain < 1:
            raise ValueError("layout: balance needs every_steps >= 0, window_steps >= 1 and 0 <= min_gain < 1, "
                             f"got {self}")


@dataclass(frozen=True)
class AutoscalePolicy:
    """``autoscale`` in the layout. The signal is the mean number of rows an expert actor computes per
    step over the last ``window_steps`` steps (the routed work per actor, whatever the hardware):
    above ``scale_out_rows`` one actor is added, below ``scale_in_rows`` one is removed, within
    ``min_expert_actors..max_expert_actors`` and at most once per ``cooldown_steps``."""

    min_expert_actors: int = 1
    max_expert_actors: int = 1
    scale_out_rows: float = 2048.0
    scale_in_rows: float = 256.0
    window_steps: int = 32
    cooldown_steps: int = 64

    def __post_init__(self):
        if not 1 <= self.min_expert_actors <= self.max_expert_actors:
            raise ValueError("autoscale needs 1 <= min_expert_actors <= max_expert_actors, "
                             f"got {self.min_expert_actors}, {self.max_expert_actors}")
        if not 0 <= self.scale_in_rows < self.scale_out_rows:
            raise ValueError(f"autoscale needs 0 <= scale_in_rows < scale_out_rows, got {self.scale_in_rows}, "
                             f"{self.scale_out_rows}")
        if self.window_steps < 1 or self.cooldown_steps < 0:
            raise ValueError("autoscale needs window_steps >= 1 and cooldown_steps >= 0")

    def decide(self, rows_per_step: list[list[int]], num_actors: int) -> int:
        """The expert actor count to run with, from rows per actor of recent steps (oldest first)."""
        recent = [r for r in rows_per_step[-self.window_steps:] if len(r) == num_actors]
        if len(recent) < self.window_steps:
            return num_actors  # not a sustained signal yet
        mean = sum(map(sum, recent)) / (len(recent) * num_actors)
        if mean > self.scale_out_rows and num_actors < self.max_expert_actors:
            return num_actors + 1
        if mean < self.scale_in_rows and num_actors > self.min_expert_actors:
            return num_actors - 1
        return num_actors


@dataclass(frozen=True)
class PlanResult:
    placement: Placement | None  # None: nothing worth changing
    before: float  # predicted max/mean of the worst layer, current placement, on the window
    after: float
    moved: int  # expert weights to load
    reason: str = ""


class Router:
    def __init__(self, placement: Placement, n_experts: int, window: int = 64, n_group: int | None = None):
        """``window``: steps of load kept; ``n_group``: the checkpoint's expert groups, kept on one node
        when the expert actors span several nodes."""
        self.placement = placement
        self.n_experts = n_experts
        self.window = window
        self.n_group = n_group if n_group and n_group > 1 and n_experts % n_group == 0 else None
        self.actor_nodes: list[str] | None = None  # the node of each expert actor
        self.history: deque[dict[int, list[int]]] = deque(maxlen=window)
        self.total = {layer: [0] * n_experts for layer in placement.layers}
        self.actor_rows: deque[list[int]] = deque(maxlen=window)  # per step: rows per expert actor
        self.actor_rows_total: list[int] = [0] * placement.num_actors
        self.rebalances, self.rebalance_seconds = 0, 0.0

    def record_load(self, load: dict[int, list[int]]) -> None:
        """Tokens per logical expert of one step (summed over shards)."""
        self.history.append(load)
        for layer, counts in load.items():
            self.total[layer] = [a + b for a, b in zip(self.total[layer], counts, strict=True)]

    def record_idle_step(self, num_actors: int) -> None:
        """An idle second counts as a step in which no expert actor computed a row."""
        if num_actors == self.placement.num_actors:
            self.actor_rows.append([0] * num_actors)

    def record_expert_rows(self, rows: list[int], totals: list[int]) -> None:
        """Rows each expert actor computed in one step, and since it started."""
        self.actor_rows.append(rows)
        self.actor_rows_total = list(totals)

    def set_actor_nodes(self, nodes: list[str]) -> None:
        """The Ray node of each expert actor (for planning by node)."""
        self.actor_nodes = list(nodes)

    def window_load(self, steps: int | None = None) -> dict[int, list[int]]:
        """Tokens per (MoE layer, logical expert) over the last ``steps`` steps (default: all kept)."""
        window = {layer: torch.zeros(self.n_experts, dtype=torch.long) for layer in self.total}
        history = list(self.history)[-steps:] if steps else self.history
        for step in history:
            for layer, counts in step.items():
                window[layer] += torch.tensor(counts)
        return {k: v.tolist() for k, v in window.items()}

    def actor_imbalance(self) -> float | None:
        """max/mean rows per expert actor over the window (1.0 is perfect balance)."""
        if not self.actor_rows or len(self.actor_rows[-1]) != self.placement.num_actors:
            return None
        sums = [sum(step[a] for step in self.actor_rows if len(step) == self.placement.num_actors)
                for a in range(self.placement.num_actors)]
        mean = sum(sums) / len(sums)
        return max(sums) / mean if mean else None

    def load_stats(self) -> dict:
        """Total tokens per (layer, logical expert) since start and over the recent window, the
        placement and its version, and per expert actor: rows since start, rows over the window and
        the logical expert in each slot per MoE layer."""
        replicas = {layer: [len(r) for r in table] for layer, table in self.placement.layers.items()}
        n = self.placement.num_actors
        window_rows = [sum(step[a] for step in self.actor_rows if len(step) == n) for a in range(n)]
        totals = self.actor_rows_total + [0] * (n - len(self.actor_rows_total))
        experts = [{"index": a, "rows_total": totals[a], "rows_window": window_rows[a],
                    "slots": self.placement.slot_contents(a)} for a in range(n)]
        return {"total": self.total, "window": self.window_load(), "replicas": replicas,
                "placement_version": self.placement.version, "experts": experts,
                "imbalance": self.actor_imbalance(), "rebalances": self.rebalances,
                "rebalance_seconds": self.rebalance_seconds}

    def plan(self, force: bool = False, min_gain: float = 0.0, num_actors: int | None = None,
             slots_per_actor: int | None = None, window_steps: int | None = None) -> PlanResult:
        """A new placement for the load of the last ``window_steps`` steps (default: the whole
        window). Without ``force`` (or with the same actors), a plan that does not lower the worst
        layer's predicted max/mean by ``min_gain`` is not proposed. When the expert actors span
        several nodes, the checkpoint's expert groups are kept on one node (hierarchical planning)."""
        load = self.window_load(window_steps)
        if not any(sum(v) for v in load.values()):
            load = {layer: [1] * self.n_experts for layer in load}  # no traffic yet: balance the counts
        n = self.placement.num_actors if num_actors is None else num_actors
        actor_node = None
        if self.actor_nodes is not None and len(set(self.actor_nodes)) > 1 and n == len(self.actor_nodes):
            ids = {node: k for k, node in enumerate(dict.fromkeys(self.actor_nodes))}
            actor_node = [ids[node] for node in self.actor_nodes]
        new, report = plan_placement(load, self.placement, num_actors, slots_per_actor, actor_node,
                                     self.n_group if actor_node else None)
        before = max(report.before.values(), default=1.0)
        after = max(report.after.values(), default=1.0)
        rescale = new.num_actors != self.placement.num_actors or new.slots_per_actor != self.placement.slots_per_actor
        if new is self.placement or new.layers == self.placement.layers and not rescale:
            return PlanResult(None, before, after, 0, "the current placement is already the best found")
        if not force and not rescale and before - after < min_gain * before:
            return PlanResult(None, before, after, report.moved,
                              f"gain {before:.3f} -> {after:.3f} is below min_gain {min_gain}")
        return PlanResult(new, before, after, report.moved)

    def scale_target(self, policy: AutoscalePolicy) -> int:
        """How many expert actors the load asks for now (the current count when nothing should change)."""
        return policy.decide(list(self.actor_rows), self.placement.num_actors)

    def commit(self, placement: Placement, seconds: float) -> int:
        """The engine switched every actor to ``placement`` (``seconds`` from plan to switch)."""
        self.actor_rows.clear()  # rows per actor of the old placement say nothing about the new one
        if placement.num_actors != self.placement.num_actors:
            self.actor_rows_total = self.actor_rows_total[:placement.num_actors]
        self.placement = placement
        self.rebalances += 1
        self.rebalance_seconds += seconds
        return placement.version


@ray.remote(num_cpus=0)
class RouterActor(Router):
    """In its own process, the router also exports the cluster's metrics to Ray (dashboard, Prometheus)."""

    def __init__(self, placement: Placement, n_experts: int, window: int = 64, n_group: int | None = None):
        super().__init__(placement, n_experts, window, n_group)
        from actors.metrics import ClusterMetrics

        self.metrics = ClusterMetrics()

    def set_health(self, state: str, error: str | None) -> None:
        """The engine's view of the data plane: healthy, recovering (rebuilding) or unhealthy."""
        self.metrics.health(state)

    def record_step(self, step: dict) -> None:
        """One engine step's figures: expert load (kept for placement decisions) and the rest (metrics)."""
        if step.get("load"):
            self.record_load(step["load"])
            self.metrics.expert_load(step["load"])
        if step.get("expert_rows") is not None:
            self.record_expert_rows(step["expert_rows"], step["expert_rows_total"])
            imbalance = self.actor_imbalance()
            if imbalance is not None:
                self.metrics.imbalance.set(imbalance)
        self.metrics.step(step)

    def commit(self, placement: Placement, seconds: float) -> int:
        version = super().commit(placement, seconds)
        self.metrics.rebalances.inc()
        self.metrics.rebalance_seconds.inc(seconds)
        self.metrics.placement_version.set(version)
        return version
