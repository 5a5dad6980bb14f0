"""Expert placement: which physical slot of which expert actor holds each logical expert.

Glossary:
- logical expert: an expert of the checkpoint, ``0..n_routed_experts-1`` in each MoE layer;
- physical expert (slot): a place for one expert's weights on an expert actor; each expert actor
  has ``slots_per_actor`` slots per MoE layer;
- redundant expert (replica): a second or later physical copy of a logical expert, in another
  actor's spare slot, that takes part of its tokens.

Example: 8 experts, 2 actors, 1 spare slot each, expert 0 replicated once: actor 0 holds
logical [0, 1, 2, 3, -], actor 1 holds [4, 5, 6, 7, 0]; expert 0 -> [(0, 0), (1, 4)].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.moe import sort_by_expert


@dataclass(frozen=True)
class Placement:
    num_actors: int
    slots_per_actor: int
    # layer -> logical expert -> replicas [(actor, slot), ...]
    layers: dict[int, list[list[tuple[int, int]]]]
    version: int = 0

    @classmethod
    def initial(cls, moe_layers: list[int], n_experts: int, num_actors: int, spare_slots: int,
                replicas: dict[int, int] | None = None) -> Placement:
        """Contiguous groups of experts per actor; ``replicas[e]`` extra copies of expert ``e`` go to
        spare slots of other actors (the one with the most free slots first), the same in every layer."""
        per_actor = -(-n_experts // num_actors)
        slots = per_actor + spare_slots
        table = [[(e // per_actor, e % per_actor)] for e in range(n_experts)]
        used = [min(per_actor, max(0, n_experts - a * per_actor)) for a in range(num_actors)]
        for e, extra in sorted((replicas or {}).items()):
            if not 0 <= e < n_experts:
                raise ValueError(f"replicas: expert {e} does not exist (0..{n_experts - 1})")
            for _ in range(extra):
                # the actor with the most free slots among those without a copy yet
                free = [(slots - used[a], -a) for a in range(num_actors) if all(a != h for h, _ in table[e])]
                if not free or max(free)[0] <= 0:
                    raise ValueError(f"replicas: no spare slot left for another copy of expert {e}; "
                                     "raise spare_slots or add expert actors")
                a = -max(free)[1]
                table[e].append((a, used[a]))
                used[a] += 1
        return cls(num_actors, slots, {layer: [list(r) for r in table] for layer in moe_layers})

    def slot_contents(self, actor: int) -> dict[int, list[int | None]]:
        """For one expert actor: per MoE layer, the logical expert in each slot (``None``: empty)."""
        out = {}
        for layer, table in self.layers.items():
            slots: list[int | None] = [None] * self.slots_per_actor
            for e, replicas in enumerate(table):
                for a, s in replicas:
                    if a == actor:
                        slots[s] = e
            out[layer] = slots
        return out


class RoutingTable:
    """The attention side's view of a placement: picks a physical replica for each routed token."""

    def __init__(self, placement: Placement, first_expert_rank: int, device: str | torch.device = "cpu"):
        self.version = placement.version
        self.tensors = {}
        for layer, table in placement.layers.items():
            width = max(len(r) for r in table)
            count = torch.tensor([len(r) for r in table], device=device)
            rank = torch.tensor([[first_expert_rank + a for a, _ in r] + [0] * (width - len(r)) for r in table],
                                device=device)
            slot = torch.tensor([[s for _, s in r] + [0] * (width - len(r)) for r in table], device=device)
            self.tensors[layer] = (count, rank, slot)

    def choose(self, layer: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``indices`` [T, top_k] logical -> (destination rank, slot), both [T * top_k]; the copies
        of a replicated expert take its tokens in turn."""
        count, rank, slot = self.tensors[layer]
        flat = indices.flatten().to(count.device)
        # the n-th token routed to expert e goes to copy n % copies(e)
        order, _, offsets = sort_by_expert(flat[:, None], count.numel())
        ordinal = torch.empty_like(flat)
        ordinal[order] = torch.arange(flat.numel(), device=flat.device) - offsets[flat[order]]
        which = ordinal % count[flat]
        return rank[flat, which], slot[flat, which]
