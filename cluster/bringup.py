"""Bringing up the data plane on Ray: placement-group bundles, attention and expert actors, and one
process group over them. Used at start, after a fault (rebuild) and when the expert actors scale.

Expert actor ``i`` always runs in the same bundle: the first ``layout.expert_actors`` in the cluster's
placement group (next to the attention shards), later ones each in a one-bundle placement group of
their own, created when the cluster scales out (so Ray's autoscaler, where the cluster has one, sees
the demand and adds a node) and removed when it scales back in.
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.collective import GroupInfo
from actors.placement import Placement
from cluster.layout import ClusterLayout


class DataPlane:
    def __init__(self, model_dir: Path, layout: ClusterLayout):
        self.model_dir, self.layout = model_dir, layout
        self.pg = self._placement_group([self._bundle("attention")] * layout.attention_shards
                                        + [self._bundle("expert")] * layout.expert_actors)
        self.extra: dict[int, object] = {}  # expert index -> its own placement group (scaled out)
        self.transport = ""  # what the rows travel over since the last join: pipes, gloo or nccl

    def _bundle(self, role: str) -> dict:
        gpus = 1 if self.layout.device == "cuda" else 0
        b = {"CPU": self.layout.num_cpus_per_actor, "GPU": gpus, **self.layout.resources.get(role, {})}
        return {k: v for k, v in b.items() if v}

    def _placement_group(self, bundles: list[dict], timeout: float = 120):
        pg = placement_group(bundles, strategy=self.layout.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=timeout)
        except Exception as e:
            remove_placement_group(pg)
            raise RuntimeError(
                f"the cluster cannot place {len(bundles)} actor(s) with {bundles} "
                f"({self.layout.placement_strategy}); available: {ray.available_resources()}. "
                "Lower num_cpus_per_actor or the actor counts, or add nodes"
            ) from e
        return pg

    def _common(self) -> dict:
        return dict(num_cpus=self.layout.num_cpus_per_actor, num_gpus=1 if self.layout.device == "cuda" else 0)

    def _expert_strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        if index < self.layout.expert_actors:
            return PlacementGroupSchedulingStrategy(self.pg,
                                                    placement_group_bundle_index=self.layout.attention_shards + index)
        if index not in self.extra:
            self.extra[index] = self._placement_group([self._bundle("expert")])
        return PlacementGroupSchedulingStrategy(self.extra[index], placement_group_bundle_index=0)

    def spawn_attention(self) -> list:
        from actors.attention import AttentionActor

        lay = self.layout
        return [AttentionActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            **self._common()).remote(str(self.model_dir), lay.dtype, lay.num_blocks, lay.block_size,
                                     lay.torch_threads, lay.device, lay.index_fp8,
                                     lay.speculative_tokens > 0)
            for i in range(lay.attention_shards)]

    def spawn_experts(self, indices, placement: Placement) -> list:
        """Expert actors ``indices`` of ``placement`` (each loads its slots' weights as it starts)."""
        from actors.expert import ExpertActor

        lay = self.layout
        return [ExpertActor.options(scheduling_strategy=self._expert_strategy(i), **self._common()).remote(
            str(self.model_dir), i, placement, lay.dtype, lay.torch_threads, lay.device) for i in indices]

    def join(self, attention: list, experts: list, placement: Placement, timeout: float | None = None) -> None:
        """One process group over ``attention + experts`` (ranks in that order), routing by ``placement``."""
        actors = attention + experts
        timeout = timeout or self.layout.startup_timeout_s
        master_addr, master_port = ray.get(actors[0].address.remote(), timeout=timeout)
        lay = self.layout
        infos = [GroupInfo(rank, len(actors), len(attention), lay.backend, lay.collective_timeout_s, lay.local_pipes)
                 for rank in range(len(actors))]
        self.transport = ",".join(sorted(set(ray.get([a.init_group.remote(info, master_addr, master_port, placement)
                                                      for a, info in zip(actors, infos, strict=True)],
                                                     timeout=timeout))))

    def spawn(self, placement: Placement) -> tuple[list, list]:
        """Every data-plane actor for ``placement``, joined (at start and after a fault)."""
        attention = self.spawn_attention()
        experts = self.spawn_experts(range(placement.num_actors), placement)
        try:  # loading weights happens in the actors' constructors: bounded by the startup timeout
            self.join(attention, experts, placement)
        except Exception:
            for a in attention + experts:
                ray.kill(a, no_restart=True)
            raise
        return attention, experts

    def release_experts_from(self, n: int) -> None:
        """Expert actors ``n..`` are gone: give their own placement groups back."""
        for index in [i for i in self.extra if i >= n]:
            remove_placement_group(self.extra.pop(index))

    def shutdown(self) -> None:
        for pg in [self.pg, *self.extra.values()]:
            remove_placement_group(pg)
        self.extra.clear()
