"""Expert-placement planner: a load window in, a placement with redundant experts out (pure Python).

Glossary (as in ``actors.placement``):
- logical expert: an expert of the checkpoint, ``0..n_routed_experts-1`` in each MoE layer;
- physical expert (slot): a place for one expert's weights on an expert actor, ``slots_per_actor``
  of them per actor and MoE layer; a slot may stay empty;
- redundant expert (replica): a second or later physical copy of a logical expert, always on another
  actor. The runtime sends the n-th token of expert e to copy ``n % copies(e)``, so each copy takes a
  share ``load[e] / copies(e)``;
- predicted load of an actor: the sum of its copies' shares; imbalance: max / mean over actors.

Per MoE layer, after DeepSeek's EPLB (github.com/deepseek-ai/EPLB):
1. groups of experts to nodes, when the actors span several nodes: heaviest group first onto the
   node with the least load per actor (all copies of an expert stay on its node);
2. replicate: one more copy for the expert with the highest share, until its node's slots are used
   (at most one copy per actor of the node);
3. balanced packing: copies heaviest first onto the least-loaded actor of their node that has a free
   slot and no copy of that expert yet.
Then, to move few weights:
4. also try fewer redundant experts (a prefix of step 2's order); keep the plan with the lowest
   imbalance, then the fewest weights moved;
5. ties go to the actor that holds the expert now; packs are relabelled among the actors of a node
   and copies exchanged between actors so that experts stay where they are, as long as the layer's
   max load does not rise; a copy that stays keeps its slot;
6. a layer keeps its current placement unless the plan lowers its imbalance on this window.

Example: 4 experts, 2 actors with 3 slots, load [90, 5, 3, 2]. Now actor 0 = [0, 1, -] (95 tokens),
actor 1 = [2, 3, -] (5): mean 50, imbalance 1.90. Expert 0 gets a redundant copy in actor 1's spare
slot, so two shares of 45: actor 0 = [0, 1, -] (45 + 5 = 50), actor 1 = [2, 3, 0] (3 + 2 + 45 = 50),
imbalance 1.00, one weight moved; expert 0 -> [(0, 0), (1, 2)]. A second redundant expert (expert 1
in actor 0's spare slot) would do worse: 49.5 and 50.5, imbalance 1.01.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from actors.placement import Placement

_TIE = 1e-9  # relative: loads this close count as equal

Table = list[list[tuple[int, int]]]  # logical expert -> replicas [(actor, slot), ...]


@dataclass(frozen=True)
class PlanReport:
    """Per MoE layer, the predicted imbalance (max / mean load over expert actors) on the window."""

    before: dict[int, float]  # the current placement
    after: dict[int, float]  # the returned placement
    moved: int  # expert weights to load: slots whose content changes to another expert
    changed_layers: list[int]


@dataclass(frozen=True)
class _Layout:
    """The target expert actors: ``node_actors[k]`` lists the actors of node k."""

    num_actors: int
    slots_per_actor: int
    node_actors: list[list[int]]


def actor_loads(placement_layer: Table, load_layer: Sequence[float], num_actors: int) -> list[float]:
    """Predicted tokens per expert actor: each copy of expert e takes ``load[e] / copies(e)``."""
    loads = [0.0] * num_actors
    for e, replicas in enumerate(placement_layer):
        for a, _ in replicas:
            loads[a] += load_layer[e] / len(replicas)
    return loads


def imbalance(placement_layer: Table, load_layer: Sequence[float], num_actors: int) -> float:
    """max / mean predicted load over the expert actors (1.0: perfect balance, or no load)."""
    return _ratio(actor_loads(placement_layer, load_layer, num_actors))


def plan(load: dict[int, Sequence[float]], current: Placement, num_actors: int | None = None,
         slots_per_actor: int | None = None, actor_node: Sequence[int] | None = None,
         n_group: int | None = None) -> tuple[Placement, PlanReport]:
    """A placement for ``load`` (tokens per MoE layer and logical expert over a window).

    ``num_actors``/``slots_per_actor`` (default: ``current``'s) may differ from ``current``'s, then
    every layer is placed anew onto the new actors, experts staying where they are when possible.
    ``actor_node[a]``: the node of expert actor ``a``; ``n_group``: contiguous groups of experts
    (``n_group`` of ``config.json``) kept on one node (default: each expert is its own group).
    Returns ``current`` itself when nothing changes, else a placement with version + 1."""
    layout = _layout(current, num_actors, slots_per_actor, actor_node)
    loads = _check_load(load, current, layout, n_group)
    rescale = (layout.num_actors, layout.slots_per_actor) != (current.num_actors, current.slots_per_actor)
    layers, before, after, moved, changed = {}, {}, {}, 0, []
    for layer, table in current.layers.items():
        w = loads[layer]
        before[layer] = imbalance(table, w, current.num_actors)
        new, after[layer], n_moved = _plan_layer(w, table, layout, n_group)
        if not rescale and after[layer] >= before[layer] * (1 - _TIE):
            new, after[layer], n_moved = table, before[layer], 0
        layers[layer] = new
        if new != table:
            changed.append(layer)
            moved += n_moved
    report = PlanReport(before, after, moved, changed)
    if not rescale and not changed:
        return current, report
    return Placement(layout.num_actors, layout.slots_per_actor, layers, current.version + 1), report


def _plan_layer(w: list[float], table: Table, layout: _Layout, n_group: int | None) -> tuple[Table, float, int]:
    """Steps 1-5 for one layer: (table, imbalance, weights moved)."""
    held = _held(table, layout)
    home = _pack_groups(w, held, layout, _groups(len(w), n_group))
    order = _replicate(w, home, table, layout)
    best = None
    for r in _budgets(len(order)):
        cnt = [1] * len(w)  # [n_experts] copies per logical expert
        for e in order[:r]:
            cnt[e] += 1
        share = [x / c for x, c in zip(w, cnt, strict=True)]
        bins = _pack_copies(share, cnt, home, held, layout)
        _relabel(bins, held, layout)
        _keep_in_place(bins, share, held, layout)
        ratio = _ratio([sum(share[e] for e in b) for b in bins])
        moved = sum(len(b - held[a].keys()) for a, b in enumerate(bins))
        if best is None or ratio < best[0] * (1 - _TIE) or (ratio <= best[0] * (1 + _TIE) and moved < best[1]):
            best = (ratio, moved, bins)
    ratio, moved, bins = best
    return _to_table(bins, held, table, layout.slots_per_actor), ratio, moved


def _held(table: Table, layout: _Layout) -> list[dict[int, int]]:
    """Per target actor: logical expert -> the slot it holds now (slots that still exist)."""
    held: list[dict[int, int]] = [{} for _ in range(layout.num_actors)]
    for e, replicas in enumerate(table):
        for a, s in replicas:
            if a < layout.num_actors and s < layout.slots_per_actor:
                held[a][e] = s
    return held


def _pack_groups(w: list[float], held: list[dict[int, int]], layout: _Layout, groups: list[list[int]]) -> list[int]:
    """Step 1: the node of each logical expert. Groups heaviest first onto the node with the least load
    per actor and room for them (a group that fits on no node whole is split); ties toward the node
    that holds most of the group now."""
    nodes = layout.node_actors
    home = [0] * len(w)  # [n_experts] node index
    if len(nodes) == 1:
        return home
    room = [len(actors) * layout.slots_per_actor for actors in nodes]
    per_actor = [0.0] * len(nodes)
    for g in sorted(groups, key=lambda g: (-_q(sum(w[e] for e in g)), g[0])):
        now = [sum(e in held[a] for a in actors for e in g) for actors in nodes]
        parts = [g] if max(room) >= len(g) else [[e] for e in g]
        for part in parts:
            k = min((k for k in range(len(nodes)) if room[k] >= len(part)),
                    key=lambda k: (_q(per_actor[k]), -now[k], k))
            for e in part:
                home[e] = k
            room[k] -= len(part)
            per_actor[k] += sum(w[e] for e in part) / len(nodes[k])
    return home


def _replicate(w: list[float], home: list[int], table: Table, layout: _Layout) -> list[int]:
    """Step 2: the logical experts that get one more copy, in order: the highest share first (ties toward
    experts with more copies now), while their node has a free slot and an actor without a copy."""
    cnt = [1] * len(w)
    free = [len(actors) * layout.slots_per_actor for actors in layout.node_actors]
    for k in home:
        free[k] -= 1
    order = []
    while True:
        ok = [e for e in range(len(w))
              if w[e] > 0 and free[home[e]] > 0 and cnt[e] < len(layout.node_actors[home[e]])]
        if not ok:
            return order
        e = max(ok, key=lambda e: (_q(w[e] / cnt[e]), len(table[e]) > cnt[e], -e))
        order.append(e)
        cnt[e] += 1
        free[home[e]] -= 1


def _pack_copies(share: list[float], cnt: list[int], home: list[int], held: list[dict[int, int]],
                 layout: _Layout) -> list[set[int]]:
    """Step 3, balanced packing: copies heaviest first onto the least-loaded actor of their node with a
    free slot and no copy of that expert yet; ties toward the actor that holds the expert now.
    Returns the logical experts of each actor."""
    bins: list[set[int]] = [set() for _ in range(layout.num_actors)]
    loads = [0.0] * layout.num_actors
    for e in sorted(range(len(share)), key=lambda e: (-share[e], e)):
        actors = layout.node_actors[home[e]]
        for _ in range(cnt[e]):
            free = [a for a in actors if len(bins[a]) < layout.slots_per_actor and e not in bins[a]]
            if free:
                a = min(free, key=lambda a: (_q(loads[a]), e not in held[a], a))
            else:
                a = _make_room(e, bins, loads, share, actors, layout.slots_per_actor)
            bins[a].add(e)
            loads[a] += share[e]
    return bins


def _make_room(e: int, bins: list[set[int]], loads: list[float], share: list[float], actors: list[int],
               slots: int) -> int:
    """Every actor with a free slot has a copy of ``e`` already: move the lightest copy that one of them
    lacks off a full actor without ``e``, and return that actor. Such a copy exists: the full actor
    holds ``slots`` experts other than ``e``, the other fewer than ``slots - 1``."""
    moves = [(share[f], f, a, b) for a in actors if e not in bins[a] for f in sorted(bins[a])
             for b in actors if len(bins[b]) < slots and f not in bins[b]]
    assert moves, f"no room for another copy of expert {e}"
    _, f, a, b = min(moves)
    bins[a].remove(f)
    bins[b].add(f)
    loads[a] -= share[f]
    loads[b] += share[f]
    return a


def _relabel(bins: list[set[int]], held: list[dict[int, int]], layout: _Layout) -> None:
    """Swap whole packs between actors of a node when more experts then stay where they are."""
    def kept(b: set[int], a: int) -> int:
        return len(b & held[a].keys())

    swapped = True
    while swapped:
        swapped = False
        for actors in layout.node_actors:
            for i, j in combinations(actors, 2):
                if kept(bins[i], j) + kept(bins[j], i) > kept(bins[i], i) + kept(bins[j], j):
                    bins[i], bins[j] = bins[j], bins[i]
                    swapped = True


def _keep_in_place(bins: list[set[int]], share: list[float], held: list[dict[int, int]], layout: _Layout) -> None:
    """Bring copies back to an actor of their node that holds the expert now, into a free slot or in
    exchange for another copy, while no actor goes over the layer's max load. Each step keeps at least
    one more expert in place, so this ends."""
    loads = [sum(share[e] for e in b) for b in bins]
    top = max(loads) * (1 + _TIE)
    improved = True
    while improved:
        improved = False
        for actors in layout.node_actors:
            for a in actors:
                for e in sorted(bins[a] - held[a].keys()):
                    home = [h for h in actors if e in held[h] and e not in bins[h]]
                    if any(_bring_home(e, a, h, bins, loads, share, held, layout.slots_per_actor, top) for h in home):
                        improved = True


def _bring_home(e: int, a: int, h: int, bins: list[set[int]], loads: list[float], share: list[float],
                held: list[dict[int, int]], slots: int, top: float) -> bool:
    """Move the copy of ``e`` from actor ``a`` to ``h`` (which holds ``e`` now), alone or in exchange for
    the copy of ``h`` whose move keeps the most experts in place; False when none fits under ``top``."""
    options: list[tuple[int, int | None]] = []
    if len(bins[h]) < slots and loads[h] + share[e] <= top:
        options.append((1, None))
    for f in sorted(bins[h] - bins[a]):
        gain = 1 + (f in held[a]) - (f in held[h])
        if gain > 0 and loads[a] - share[e] + share[f] <= top and loads[h] - share[f] + share[e] <= top:
            options.append((gain, f))
    if not options:
        return False
    _, f = max(options, key=lambda o: (o[0], o[1] is None))
    bins[a].remove(e)
    bins[h].add(e)
    loads[a] -= share[e]
    loads[h] += share[e]
    if f is not None:
        bins[h].remove(f)
        bins[a].add(f)
        loads[h] -= share[f]
        loads[a] += share[f]
    return True


def _to_table(bins: list[set[int]], held: list[dict[int, int]], current: Table, slots: int) -> Table:
    """Slots for the packs: a copy that stays keeps its slot, new copies take the lowest free slots.
    Replicas that stay come first, in their current order, so an unchanged layer compares equal."""
    table: Table = [[] for _ in current]
    for a, experts in enumerate(bins):
        stay = {e: held[a][e] for e in experts if e in held[a]}
        free = sorted(set(range(slots)) - set(stay.values()))
        for e, s in [*stay.items(), *zip(sorted(experts - stay.keys()), free, strict=False)]:
            table[e].append((a, s))
    return [[r for r in now if r in new] + sorted(set(new) - set(now)) for now, new in zip(current, table, strict=True)]


def _layout(current: Placement, num_actors: int | None, slots_per_actor: int | None,
            actor_node: Sequence[int] | None) -> _Layout:
    num_actors = current.num_actors if num_actors is None else num_actors
    slots = current.slots_per_actor if slots_per_actor is None else slots_per_actor
    if num_actors < 1:
        raise ValueError(f"num_actors must be at least 1, got {num_actors}")
    if slots < 1:
        raise ValueError(f"slots_per_actor must be at least 1, got {slots}")
    nodes = [0] * num_actors if actor_node is None else list(actor_node)
    if len(nodes) != num_actors:
        raise ValueError(f"actor_node has {len(nodes)} entries for {num_actors} expert actors; give one node per actor")
    return _Layout(num_actors, slots, [[a for a in range(num_actors) if nodes[a] == k] for k in sorted(set(nodes))])


def _check_load(load: dict[int, Sequence[float]], current: Placement, layout: _Layout,
                n_group: int | None) -> dict[int, list[float]]:
    if set(load) != set(current.layers):
        raise ValueError(f"load has MoE layers {sorted(load)} but the placement has {sorted(current.layers)}; "
                         "give the load of every MoE layer")
    out = {}
    for layer, table in current.layers.items():
        w = [float(x) for x in load[layer]]
        n = len(table)
        if len(w) != n:
            raise ValueError(f"load[{layer}] has {len(w)} values for {n} logical experts")
        bad = [(e, x) for e, x in enumerate(w) if not (math.isfinite(x) and x >= 0)]
        if bad:
            raise ValueError(f"load[{layer}][{bad[0][0]}] is {bad[0][1]}: loads are token counts (finite, >= 0)")
        if n > layout.num_actors * layout.slots_per_actor:
            raise ValueError(f"layer {layer}: {n} logical experts do not fit in {layout.num_actors} expert actors "
                             f"x {layout.slots_per_actor} slots; raise slots_per_actor or add expert actors")
        if n_group is not None and (n_group < 1 or n % n_group):
            raise ValueError(f"n_group {n_group} does not divide the {n} logical experts of layer {layer}")
        out[layer] = w
    return out


def _groups(n: int, n_group: int | None) -> list[list[int]]:
    size = n // n_group if n_group else 1
    return [list(range(i, i + size)) for i in range(0, n, size)]


def _budgets(n: int) -> list[int]:
    """How many redundant experts to try: every count up to 8, then powers of two, and all ``n``."""
    return sorted({n, *range(min(n, 8) + 1), *(1 << k for k in range(n.bit_length()))})


def _ratio(loads: list[float]) -> float:
    total = sum(loads)
    return max(loads) / (total / len(loads)) if total > 0 else 1.0


def _q(x: float) -> float:
    """``x`` to 12 significant digits, so that sums taken in another order still tie."""
    return float(f"{x:.12g}")
