"""AttentionActor: one data-parallel shard of the running sequences.

Holds every non-expert weight (embedding, attention, dense MLPs, shared experts, gates, norms,
head) and the paged compressed MLA cache of its sequences; the routed experts are reached through
the dispatcher. Samples its sequences' next tokens itself.
"""

from __future__ import annotations

import time

import ray
import torch

from actors.collective import GroupInfo, init_group, node_address, transport
from actors.dispatch import Dispatcher, RowFormat, Timer
from actors.messages import StepOutput, StepPlan
from actors.placement import Placement, RoutingTable
from model.cache import MLACache
from model.checkpoint import load_model
from model.generate import DTYPES
from model.sampling import SamplingParams
from model.speculative import ChunkWork, assign_micro_batches, mtp_cache_layers, run_chunks


class AttentionShard:
    """The shard's logic, usable without Ray (the actor below wraps it)."""

    def __init__(self, model_dir: str, dtype: str, num_blocks: int, block_size: int, torch_threads: int = 1,
                 device: str = "cpu", index_fp8: bool = False, mtp: bool = False):
        """``mtp``: load the MTP layer (its routed experts run here) for speculative decoding."""
        torch.set_num_threads(torch_threads)
        self.device = device
        self.model = load_model(model_dir, DTYPES[dtype], device, with_mtp=mtp, progress=False,
                                routed_experts=self._routed_experts, index_fp8=index_fp8)
        self.args = self.model.args
        self.block_size = block_size
        self.cache = MLACache(self.args, mtp_cache_layers(self.model), num_blocks, block_size, DTYPES[dtype],
                              device)
        self.samplers: dict[int, SamplingParams] = {}
        self.timer = Timer()
        self.info: GroupInfo | None = None
        self.group = None
        self.dispatcher: Dispatcher | None = None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def address(self) -> tuple[str, int]:
        return node_address()

    def init_group(self, info: GroupInfo, master_addr: str, master_port: int, placement: Placement) -> str:
        self.info = info
        self.group = init_group(info, master_addr, master_port, previous=self.group)
        self.set_placement(placement)
        return transport(self.group)

    def set_placement(self, placement: Placement) -> int:
        table = RoutingTable(placement, self.info.num_attention, self.device)
        self.dispatcher = Dispatcher(self.info, self.group, table, self.args.n_routed_experts, self.timer,
                                     RowFormat(self.args.hidden_size, self.model.dtype, self.args.quant is not None))
        return placement.version

    def _routed_experts(self, layer_id: int, x: torch.Tensor, routing):
        """The model's routed experts: out to the expert actors (returns the wait for the way back),
        with the current table."""
        return self.dispatcher(layer_id, x, routing)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        t0 = time.perf_counter()
        self.timer.seconds.clear()
        if plan.placement is not None:
            self.set_placement(plan.placement)
        for seq_id in plan.release:
            self.samplers.pop(seq_id, None)
        for c in plan.chunks:
            if c.params is not None:
                self.samplers[c.seq_id] = c.params
        parts = assign_micro_batches([len(c.tokens) for c in plan.chunks], plan.micro_batches)
        works = [ChunkWork(c.seq_id, c.start, c.tokens, c.sample, self.samplers.get(c.seq_id), c.drafts, c.propose,
                           c.next_token, len(c.block_table) * self.block_size, part)
                 for c, part in zip(plan.chunks, parts, strict=True)]
        tables = {c.seq_id: c.block_table for c in plan.chunks}
        self.dispatcher.capacity = plan.capacity_tokens  # a token is at most one row per expert actor
        chunks = {c.seq_id: c for c in plan.chunks}
        sampled, drafts, computed = {}, {}, 0
        for _ in range(plan.decode_steps):  # every call runs them all: the expert actors step in lockstep
            self.dispatcher.load.clear()  # the load of the call's last model step is reported
            results = run_chunks(self.model, self.cache, works, tables, plan.micro_batches)
            computed += sum(len(w.tokens) for w in works)
            follow = []
            for w in works:
                r = results.get(w.seq_id)
                if r is None or not r.tokens:
                    continue
                sampled.setdefault(w.seq_id, []).extend(r.tokens)
                verified, kept, _ = drafts.get(w.seq_id, (0, 0, []))
                drafts[w.seq_id] = (verified + w.drafts, kept + r.accepted, r.drafts)
                nxt = _follow_on(w, r, chunks[w.seq_id], len(sampled[w.seq_id]))
                if nxt is not None:
                    follow.append(nxt)
            works = follow
        load = {layer: t.tolist() for layer, t in self.dispatcher.load.items()}
        self.dispatcher.load.clear()
        seconds = dict(self.timer.seconds)
        moe_time = sum(seconds.values())
        seconds["attention_and_dense"] = time.perf_counter() - t0 - moe_time
        return StepOutput(sampled, load, seconds, computed, plan.decode_steps, drafts)


def _follow_on(w: ChunkWork, r, chunk, emitted: int) -> ChunkWork | None:
    """The sequence's next model step within a multi-step call: its last token (and the drafts just
    proposed, as far as its block table reaches), or ``None`` when it stopped or has no room."""
    if any(t in chunk.stop_ids for t, _, _ in r.tokens) or emitted >= chunk.max_tokens:
        return None
    start = w.start + len(w.tokens) - w.drafts + r.accepted  # the position of the last emitted token
    room = w.capacity - start - 1
    if room < 0:
        return None
    k = max(0, min(len(r.drafts), room, chunk.max_tokens - emitted - 1))
    return ChunkWork(w.seq_id, start, [r.tokens[-1][0]] + r.drafts[:k], True, w.params, k, w.propose, None,
                     w.capacity, w.micro_batch)


@ray.remote
class AttentionActor(AttentionShard):
    pass
