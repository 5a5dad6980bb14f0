"""Dispatch and combine: routed tokens go to the expert actors that hold their chosen physical
experts and come back, per MoE layer, as uneven all-to-alls (``actors.collective``: point-to-point
sends and receives between the pairs that move rows).

A token travels once to each expert actor that holds any of its chosen experts, not once per chosen
expert: its row, then for each of its ``top_k`` choices the slot on that actor (-1: the choice went
elsewhere) and the routing weight. The expert actor computes each choice it holds and sends back the
token's weighted sum over them (summed in float32, sent in the serving dtype); the shard adds the
actors' sums in float32. A token reaches at most ``top_k`` actors, so this is never more rows than
one per choice: with top-4 of 16 experts on 2 actors a token reaches 1.9 actors on average, half the
rows each way; DeepSeek-V3's top-8 of 256 on 8 actors reaches about 5.3.

Both sides run the same collectives per MoE layer, in order: counts, rows, results. When the step's
rows fit fixed-capacity buffers (the engine gives every actor the same bound on any shard's tokens
per model step, so all sides decide alike, and a token is at most one row per actor), the counts
exchange is skipped: each shard sends every expert actor exactly ``capacity`` rows, the unused ones
with every slot -1, and the expert actor counts the rows it got. Every tensor of the data plane stays
on the actor's device (NCCL takes device tensors only); the host reads the rows per destination once
per layer (and on CUDA, ``unique`` and ``bincount`` wait for the compute stream as well).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

import kernels
from actors.collective import Exchange, GroupInfo, all_to_all_rows, exchange_counts
from actors.expert_bank import ExpertBank
from actors.placement import RoutingTable
from kernels.moe import sort_by_expert
from model.moe import Routing

CAPACITY_BYTES = 16 * 2**20  # fixed-capacity buffers up to this size per rank and MoE layer


def fixed_capacity(capacity: int, info: GroupInfo, row_bytes: int) -> bool:
    """Whether a layer's rows go out in fixed-capacity buffers (``capacity`` rows, that is tokens, per
    shard and expert actor; 0: the step has no bound) instead of after a counts exchange. Both sides
    decide it from the same figures."""
    n_experts = info.world_size - info.num_attention
    return capacity > 0 and capacity * max(info.num_attention, n_experts) * row_bytes <= CAPACITY_BYTES


class RowFormat:
    """How a routed row's activation travels. For an FP8 checkpoint it is what the expert actor's
    grouped FP8 GEMM reads first anyway: the row quantised in 1x128 blocks (``act_quant``: FP8 values
    and their float32 scales), computed once per token on the shard rather than once per chosen
    expert on the expert actors. About half the bytes of bfloat16, and the same numbers. Otherwise the
    activation's own bytes. Both sides build it from the checkpoint, so they agree on the width."""

    def __init__(self, hidden: int, dtype: torch.dtype, fp8: bool):
        self.hidden, self.dtype, self.fp8 = hidden, dtype, fp8
        self.n_scales = -(-hidden // 128) if fp8 else 0
        self.width = hidden + 4 * self.n_scales if fp8 else hidden * dtype.itemsize  # bytes per row

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] activations -> [T, width] bytes."""
        if not self.fp8:
            return x.contiguous().view(torch.uint8).reshape(x.shape[0], self.width)
        if x.shape[0] == 0:  # a shard with no tokens (its empty scales may not be viewable as bytes)
            return x.new_empty(0, self.width, dtype=torch.uint8)
        a, a_s = kernels.act_quant(x)
        scales = a_s.contiguous().view(torch.uint8).reshape(x.shape[0], 4 * self.n_scales)
        return torch.cat([a.view(torch.uint8), scales], dim=1)

    def decode(self, payload: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[N, width] bytes -> ``(x,)`` in the serving dtype, or ``(a, a_s)`` quantised rows."""
        n = payload.shape[0]
        if not self.fp8:
            return (payload.contiguous().view(self.dtype).reshape(n, self.hidden),)
        a = payload[:, :self.hidden].contiguous().view(kernels.FP8_DTYPE)
        return a, payload[:, self.hidden:].contiguous().view(torch.float32).reshape(n, self.n_scales)


def pack_rows(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` [N, width] bytes with each row's ``top_k`` choices, ``slots`` [N, k] (int32, -1: not
    on this actor) and ``weights`` [N, k] (float32), as one byte matrix [N, width + 8k]."""
    n, k = slots.shape
    return torch.cat([x, slots.to(torch.int32).contiguous().view(torch.uint8).reshape(n, 4 * k),
                      weights.float().contiguous().view(torch.uint8).reshape(n, 4 * k)], dim=1)


def unpack_rows(packed: torch.Tensor, width: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack_rows``' inverse: (rows [N, width] bytes, slots [N, k] int32, weights [N, k] float32)."""
    n = packed.shape[0]
    choices = packed.new_empty(n, 8 * top_k).copy_(packed[:, width:])  # aligned for the views below
    slots = choices[:, :4 * top_k].contiguous().view(torch.int32).reshape(n, top_k)
    weights = choices[:, 4 * top_k:].contiguous().view(torch.float32).reshape(n, top_k)
    return packed[:, :width], slots, weights


def row_bytes(fmt: RowFormat, top_k: int) -> int:
    """Bytes of one row on the wire: the activation, then ``top_k`` slots and weights."""
    return fmt.width + 8 * top_k


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

    def __init__(self, info: GroupInfo, group, table: RoutingTable, n_experts: int, timer: Timer,
                 row_format: RowFormat):
        """``row_format``: how rows travel (the expert actors build the same from the checkpoint)."""
        self.info, self.group, self.table, self.timer = info, group, table, timer
        self.row_format = row_format
        self.n_experts = n_experts
        self.load: dict[int, torch.Tensor] = {}  # layer -> tokens per logical expert this step
        self.capacity = 0  # rows per expert actor and layer this step (0: exchange the counts)

    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> Callable[[], torch.Tensor]:
        """Send the routed rows of ``x`` out; returns the function that waits for the experts' results
        and sums them per token (the caller computes something else in between: ``MoE.stages``)."""
        t = time.perf_counter()
        info, cap, device = self.info, self.capacity, x.device
        tokens, top_k = routing.indices.shape
        load = torch.bincount(routing.indices.flatten(), minlength=self.n_experts)  # on the device; read later
        self.load[layer] = load if layer not in self.load else self.load[layer] + load
        rank, slot = self.table.choose(layer, routing.indices)  # [T * top_k] each
        # one row per (destination, token): sorted by destination, then token
        pairs, row_of = torch.unique(rank * tokens + torch.arange(tokens, device=device).repeat_interleave(top_k),
                                     return_inverse=True)
        dest, token = pairs // tokens, pairs % tokens
        choice = torch.arange(tokens * top_k, device=device) % top_k
        slots = torch.full((pairs.shape[0], top_k), -1, dtype=torch.int32, device=device)
        slots[row_of, choice] = slot.to(torch.int32)
        weights = torch.zeros(pairs.shape[0], top_k, dtype=torch.float32, device=device)
        weights[row_of, choice] = routing.weights.flatten().float()
        send = torch.bincount(dest, minlength=info.world_size)
        t = self.timer.add("gate", t)
        packed = pack_rows(self.row_format.encode(x)[token], slots, weights)  # encoded per token, then fanned out
        if fixed_capacity(cap, info, row_bytes(self.row_format, top_k)):  # as the expert actors decide it
            send_l, recv_l = send.tolist(), [0] * info.world_size
            if max(send_l) > cap:
                raise RuntimeError(f"layer {layer}: {max(send_l)} rows for one expert actor, capacity {cap}")
            offsets = torch.cumsum(send, 0) - send
            at = (dest - info.num_attention) * cap + torch.arange(len(dest), device=device) - offsets[dest]
            buffer = torch.zeros(cap * (info.world_size - info.num_attention), packed.shape[1], dtype=torch.uint8,
                                 device=device)
            buffer[:, self.row_format.width:self.row_format.width + 4 * top_k] = 255  # slot -1: an unused row
            buffer[at] = packed
            packed, out_l = buffer, [0] * info.num_attention + [cap] * (info.world_size - info.num_attention)
        else:
            recv = exchange_counts(send, self.group)
            send_l, recv_l = send.tolist(), recv.tolist()
            out_l = send_l
        # the rows go out and the receive of their results is posted in the same batch: the expert
        # actors may answer while this shard computes something else (its shared experts, the next
        # micro-batch); nothing here waits for the sends
        exchange = Exchange(self.group)
        exchange.rows(packed, out_l, recv_l)
        back = exchange.rows(x.new_empty(0, x.shape[1]), recv_l, send_l)  # [rows, hidden]
        done = exchange.start()
        self.timer.add("dispatch", t)

        def receive() -> torch.Tensor:
            t = time.perf_counter()
            done()
            sums = back()  # each row's weighted sum over the choices its expert actor holds
            t = self.timer.add("combine_wait", t)
            y = torch.zeros(x.shape, dtype=torch.float32, device=device).index_add_(0, token, sums.float())
            self.timer.add("combine", t)
            return y.to(x.dtype)
        return receive


def serve_expert_layer(info: GroupInfo, group, bank: ExpertBank, hidden: int, dtype: torch.dtype, top_k: int,
                       timer: Timer, capacity: int = 0) -> list[int]:
    """The expert actor's side of one MoE layer; returns the rows it computed per slot. ``capacity``:
    rows (tokens) per shard this step, as the shards' dispatchers have it."""
    t = time.perf_counter()
    device = bank.device
    fmt = RowFormat(hidden, dtype, bank.fp8)
    nothing = torch.empty(0, row_bytes(fmt, top_k), dtype=torch.uint8, device=device)
    if fixed_capacity(capacity, info, row_bytes(fmt, top_k)):
        send_l = [0] * info.world_size
        packed = all_to_all_rows(nothing, send_l, [capacity] * info.num_attention
                                 + [0] * (info.world_size - info.num_attention), group)
        rows, slots, weights = unpack_rows(packed, fmt.width, top_k)
        used = (slots >= 0).any(dim=1)
        recv_l = used.view(info.num_attention, capacity).sum(dim=1).tolist() + [0] * (
            info.world_size - info.num_attention)
        rows, slots, weights = rows[used], slots[used], weights[used]
    else:
        send = torch.zeros(info.world_size, dtype=torch.int64, device=device)
        recv = exchange_counts(send, group)
        send_l, recv_l = send.tolist(), recv.tolist()
        packed = all_to_all_rows(nothing, send_l, recv_l, group)
        rows, slots, weights = unpack_rows(packed, fmt.width, top_k)
    t = timer.add("dispatch", t)
    row, which = (slots >= 0).nonzero(as_tuple=True)  # the choices held here
    order, _, offsets = sort_by_expert(slots[row, which].long()[:, None], bank.num_slots)
    sums = torch.zeros(rows.shape[0], hidden, dtype=torch.float32, device=device)
    if row.shape[0]:
        src = row[order]
        sorted_rows = fmt.decode(rows[src])
        y = bank.forward_quantized(*sorted_rows, offsets) if fmt.fp8 else bank.forward_sorted(*sorted_rows, offsets)
        sums.index_add_(0, src, y.float() * weights[row, which][order, None])
    t = timer.add("experts", t)
    all_to_all_rows(sums.to(dtype), recv_l, send_l, group)
    timer.add("combine", t)
    return offsets.diff().tolist()
