"""Dispatch and combine: routed tokens go to the expert actors that hold their chosen physical
experts and come back, per MoE layer, over ``all_to_all_single`` with uneven splits.

Both sides run the same three collectives per MoE layer, in order: counts, rows (each row's bytes
followed by the 8 bytes of its slot id), results. Every tensor of the data plane stays on the
actor's device (NCCL takes device tensors only); the one host sync per layer is reading the counts.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from actors.collective import GroupInfo, all_to_all_rows, exchange_counts
from actors.expert_bank import ExpertBank
from actors.placement import RoutingTable
from kernels.moe import sort_by_expert
from model.moe import Routing

SLOT_BYTES = 8  # an int64 slot id rides at the end of each row


def pack_rows(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` [N, hidden] and their slot ids [N] as one byte matrix [N, hidden bytes + 8]."""
    raw = x.contiguous().view(torch.uint8).reshape(x.shape[0], x.shape[1] * x.element_size())
    ids = slot.to(torch.int64).contiguous().view(torch.uint8).reshape(x.shape[0], SLOT_BYTES)
    return torch.cat([raw, ids], dim=1)


def unpack_rows(packed: torch.Tensor, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n, width = packed.shape[0], packed.shape[1] - SLOT_BYTES
    rows = packed[:, :width].contiguous().view(dtype).reshape(n, hidden)
    slots = packed.new_empty(n, SLOT_BYTES).copy_(packed[:, width:]).view(torch.int64).reshape(n)  # aligned copy
    return rows, slots


class Timer:
    """Accumulated seconds per phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now


class Dispatcher:
    """The attention shard's side: sends routed rows out and sums the experts' results back."""

    def __init__(self, info: GroupInfo, group, table: RoutingTable, n_experts: int, timer: Timer):
        self.info, self.group, self.table, self.timer = info, group, table, timer
        self.n_experts = n_experts
        self.load: dict[int, torch.Tensor] = {}  # layer -> tokens per logical expert this step

    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        t = time.perf_counter()
        flat = routing.indices.flatten()
        self.load[layer] = torch.bincount(flat, minlength=self.n_experts)  # on the device; read after the step
        rank, slot = self.table.choose(layer, routing.indices)  # [T * top_k] each
        # group the rows by destination rank
        order, token, offsets = sort_by_expert(rank.view_as(routing.indices), self.info.world_size)
        send = offsets.diff()
        t = self.timer.add("gate", t)
        recv = exchange_counts(send, self.group)
        send_l, recv_l = send.tolist(), recv.tolist()
        all_to_all_rows(pack_rows(x[token], slot[order]), send_l, recv_l, self.group)
        t = self.timer.add("dispatch", t)
        back = all_to_all_rows(x.new_empty(0, x.shape[1]), recv_l, send_l, self.group)  # [T*k, hidden]
        t = self.timer.add("combine_wait", t)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, token, back.float() * routing.weights.flatten()[order, None])
        self.timer.add("combine", t)
        return y.to(x.dtype)


def serve_expert_layer(info: GroupInfo, group, bank: ExpertBank, hidden: int, dtype: torch.dtype,
                       timer: Timer) -> list[int]:
    """The expert actor's side of one MoE layer; returns the rows it computed per slot."""
    t = time.perf_counter()
    device = bank.device
    send = torch.zeros(info.world_size, dtype=torch.int64, device=device)
    recv = exchange_counts(send, group)
    send_l, recv_l = send.tolist(), recv.tolist()
    row_bytes = hidden * dtype.itemsize + SLOT_BYTES
    packed = all_to_all_rows(torch.empty(0, row_bytes, dtype=torch.uint8, device=device), send_l, recv_l, group)
    rows, slots = unpack_rows(packed, hidden, dtype)
    t = timer.add("dispatch", t)
    order, _, offsets = sort_by_expert(slots[:, None], bank.num_slots)
    counts = offsets.diff()
    out = torch.empty_like(rows)
    if rows.shape[0]:
        out[order] = bank.forward_sorted(rows[order], offsets).to(dtype)
    t = timer.add("experts", t)
    all_to_all_rows(out, recv_l, send_l, group)
    timer.add("combine", t)
    return counts.tolist()
