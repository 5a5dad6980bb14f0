"""RouterActor: owns the expert placement (logical -> physical table with replicas) and the
per-(layer, expert) load statistics. It publishes a table version; it is never on the token path."""

from __future__ import annotations

import ray
import torch

from actors.placement import Placement


class Router:
    def __init__(self, placement: Placement, n_experts: int, window: int = 64):
        self.placement = placement
        self.n_experts = n_experts
        self.window = window
        self.history: list[dict[int, list[int]]] = []
        self.total = {layer: [0] * n_experts for layer in placement.layers}

    def record_load(self, load: dict[int, list[int]]) -> None:
        """Tokens per logical expert of one step (summed over shards)."""
        self.history.append(load)
        del self.history[:-self.window]
        for layer, counts in load.items():
            self.total[layer] = [a + b for a, b in zip(self.total[layer], counts, strict=True)]

    def load_stats(self) -> dict:
        """Total tokens per (layer, logical expert) since start, and over the recent window."""
        window = {layer: torch.zeros(self.n_experts, dtype=torch.long) for layer in self.total}
        for step in self.history:
            for layer, counts in step.items():
                window[layer] += torch.tensor(counts)
        replicas = {layer: [len(r) for r in table] for layer, table in self.placement.layers.items()}
        return {"total": self.total, "window": {k: v.tolist() for k, v in window.items()}, "replicas": replicas}


@ray.remote(num_cpus=0)
class RouterActor(Router):
    """In its own process, the router also exports the cluster's metrics to Ray (dashboard, Prometheus)."""

    def __init__(self, placement: Placement, n_experts: int, window: int = 64):
        super().__init__(placement, n_experts, window)
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
        self.metrics.step(step)
