"""The data plane: one torch.distributed process group over all attention and expert actors.

Rank and group are data: ``GroupInfo`` is given to each actor; the helpers take the group as an
argument. Tensors cross as raw bytes (a ``uint8`` view), so any dtype travels, FP8 included, on
gloo as well as NCCL.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.pipes import PipeGroup, open_pipes


@dataclass(frozen=True)
class GroupInfo:
    rank: int
    world_size: int
    num_attention: int  # ranks 0..num_attention-1 are attention shards, the rest expert actors
    backend: str = "gloo"
    timeout_s: float = 120.0
    local_pipes: bool = False  # gloo on one host: move the data plane over named pipes (``actors.pipes``)

    @property
    def expert_ranks(self) -> range:
        return range(self.num_attention, self.world_size)


def node_address() -> tuple[str, int]:
    """This node's IP and a free TCP port on it (for the group's rendezvous)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def init_group(info: GroupInfo, master_addr: str, master_port: int, previous=None) -> dist.ProcessGroup | PipeGroup:
    """Join the group; returns what the data plane's exchanges take: the pipes when every rank is on
    this host and ``info.local_pipes`` allows them, else the gloo or NCCL group. ``previous``: the group
    this actor used before (its pipes are closed)."""
    if isinstance(previous, PipeGroup):
        previous.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(info.backend, init_method=f"tcp://{master_addr}:{master_port}", rank=info.rank,
                            world_size=info.world_size, timeout=timedelta(seconds=info.timeout_s))
    if info.backend == "nccl":
        # Ray gives each actor one visible GPU; the first call on the group is one every rank makes, as
        # NCCL wants before batched point-to-point calls
        torch.cuda.set_device(0)
        dist.barrier(device_ids=[0])
        return dist.group.WORLD
    pipes = open_pipes(info.rank, info.world_size, info.num_attention, info.timeout_s) if info.local_pipes else None
    return pipes or dist.group.WORLD


def transport(group) -> str:
    """What the data plane's rows travel over: ``pipes``, ``gloo`` or ``nccl``."""
    return "pipes" if isinstance(group, PipeGroup) else dist.get_backend(group)


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """Each rank's per-destination row counts [world] -> rows it will receive from each source."""
    world = send_counts.shape[0]
    return all_to_all_rows(send_counts.view(world, 1), [1] * world, [1] * world, group).view(world)


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Send the rows of ``x`` [N, width], ``send_counts[r]`` of them to rank ``r`` (in rank order);
    receive the rows sent to this rank, ``recv_counts[r]`` from rank ``r``, concatenated in rank order."""
    exchange = Exchange(group)
    received = exchange.rows(x, send_counts, recv_counts)
    exchange.start()()
    return received()


class Exchange:
    """Point-to-point sends and receives of one or more all-to-alls, posted together.

    The all-to-alls are built on this rather than on ``all_to_all_single``: only the pairs with rows
    to move exchange anything (rows never go from shard to shard, nor from expert actor to expert
    actor; only the counts exchange is a full mesh), no pair waits for another, and a shard can post
    the receive of its results in the same batch as the rows they answer (``Dispatcher``): one
    ``batch_isend_irecv``, which on NCCL is one group, so its sends and receives progress together (a
    receive in a group of its own, issued first, would block the sends queued behind it on the
    communicator's stream). Within a group NCCL runs one peer's operations in order, so ``start``
    posts every send before any receive: a shard's receive of results never waits ahead of the send
    of the rows they answer. On gloo over 3 ranks a layer's round trip took a third to a quarter of
    the time of two ``all_to_all_single`` calls (``raymoe bench collective``). Peers are ranks of the
    group, which is the whole world (``init_group``).
    """

    def __init__(self, group):
        self.group = group
        self.me = group.rank if isinstance(group, PipeGroup) else dist.get_rank(group)
        self.sends: list[tuple[int, torch.Tensor]] = []  # (peer, rows)
        self.recvs: list[tuple[int, torch.Tensor]] = []

    def rows(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> Callable[[], torch.Tensor]:
        """Add the all-to-all of ``all_to_all_rows``; returns the function that gives the received rows
        (once ``start``'s wait has returned)."""
        assert x.dim() == 2, "rows must be a 2-D tensor"
        row_bytes = x.shape[1] * x.element_size()
        send = x.contiguous().view(torch.uint8).reshape(x.shape[0], row_bytes)
        recv = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8, device=x.device)
        for peer, (out_rows, in_rows) in enumerate(zip(send.split(send_counts), recv.split(recv_counts),
                                                       strict=True)):
            if peer == self.me:
                in_rows.copy_(out_rows)
                continue
            if out_rows.shape[0]:
                self.sends.append((peer, out_rows))
            if in_rows.shape[0]:
                self.recvs.append((peer, in_rows))
        return lambda: recv.view(x.dtype).reshape(-1, x.shape[1])

    def start(self) -> Callable[[], None]:
        """Post every send and receive added so far; returns the function that waits for all of them
        (the tensors stay referenced until then)."""
        sends, recvs, group, by_pipe = self.sends, self.recvs, self.group, None
        if isinstance(group, PipeGroup):  # the small messages by pipe, the others by gloo (PipeGroup.fits)
            pipes, group = group, dist.group.WORLD
            to_pipe = [pipes.fits(p, t.nbytes, sending=True) for p, t in sends]
            from_pipe = [pipes.fits(p, t.nbytes, sending=False) for p, t in recvs]
            by_pipe = pipes.post([op for op, f in zip(sends, to_pipe, strict=True) if f],
                                 [op for op, f in zip(recvs, from_pipe, strict=True) if f])
            sends = [op for op, f in zip(sends, to_pipe, strict=True) if not f]
            recvs = [op for op, f in zip(recvs, from_pipe, strict=True) if not f]
        ops = [dist.P2POp(dist.isend, t, peer, group) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, group) for peer, t in recvs]
        works = dist.batch_isend_irecv(ops) if ops else []

        def wait() -> None:
            if by_pipe is not None:
                by_pipe()
            for work in works:
                work.wait()
        return wait
