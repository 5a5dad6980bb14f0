"""Same-host transport for the data plane: one named pipe (FIFO) per ordered pair of ranks.

On one machine gloo moves each point-to-point message over a loopback TCP pair with three socket
writes (send-ready, receive-ready, the data), each of which wakes a process. A pipe needs one write
and wakes the reader once: a 21 KB round trip between two processes took 16-39 us against 156-173 us
with gloo's ``send``/``recv`` on this 2-core machine. ``init_group`` opens pipes when every rank of
a gloo group runs on the same host (and the layout allows it); NCCL groups never use them.

Messages carry no header: as with ``isend``/``irecv``, both ends know each message's size, and each
pair's messages are read in the order they were posted. Every descriptor is non-blocking and
``PipeGroup.wait`` progresses every queued send and receive of the group (not only its own), so a
send that does not fit in the pipe never holds up the receives it waits behind.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

F_SETPIPE_SZ = 1031  # fcntl.h: grow a pipe's buffer (Linux)
PIPE_BYTES = 1 << 20  # the default limit for unprivileged processes (/proc/sys/fs/pipe-max-size)


class PeerGone(RuntimeError):
    """A peer closed its end of a pipe: its actor stopped or failed."""


class PipeGroup:
    """The pipes of one rank: a read end from every peer and a write end to every peer."""

    def __init__(self, rank: int, reads: dict[int, int], writes: dict[int, int], timeout_s: float):
        self.rank, self.reads, self.writes, self.timeout_s = rank, reads, writes, timeout_s
        self.sendq: dict[int, deque[list]] = {peer: deque() for peer in writes}  # [bytes view, offset]
        self.recvq: dict[int, deque[list]] = {peer: deque() for peer in reads}

    def post(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> Callable[[], None]:
        """Queue ``(peer, uint8 tensor)`` sends and receives (receives fill their tensors in place) and
        write what fits now; returns the function that waits for all of them."""
        items = []
        for queues, ops in ((self.sendq, sends), (self.recvq, recvs)):
            for peer, t in ops:
                assert t.is_contiguous(), "a pipe reads into and writes from contiguous tensors only"
                item = [memoryview(t.reshape(-1).numpy()), 0]
                queues[peer].append(item)
                items.append(item)
        self._progress()
        return lambda: self.wait(items)

    def wait(self, items: list[list]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._progress()
            if all(offset == len(view) for view, offset in items):
                return
            poller = select.poll()
            for peer, q in self.sendq.items():
                if q:
                    poller.register(self.writes[peer], select.POLLOUT)
            for peer, q in self.recvq.items():
                if q:
                    poller.register(self.reads[peer], select.POLLIN)
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                waiting = sorted({p for p, q in (*self.sendq.items(), *self.recvq.items()) if q})
                raise TimeoutError(f"data plane: rank {self.rank} made no progress for {self.timeout_s:.0f} s "
                                   f"with ranks {waiting} (collective_timeout_s in the layout)")

    def _progress(self) -> None:
        """Write and read whatever the pipes take and hold now, in each pair's order."""
        for peer, q in self.sendq.items():
            while q:
                item = q[0]
                try:
                    item[1] += os.write(self.writes[peer], item[0][item[1]:])
                except BlockingIOError:
                    break
                except BrokenPipeError:
                    raise PeerGone(f"data plane: rank {peer} closed its pipe from rank {self.rank} "
                                   "(its actor stopped or failed)") from None
                if item[1] < len(item[0]):
                    break
                q.popleft()
        for peer, q in self.recvq.items():
            while q:
                item = q[0]
                try:
                    n = os.readv(self.reads[peer], [item[0][item[1]:]])
                except BlockingIOError:
                    break
                if n == 0:
                    raise PeerGone(f"data plane: rank {peer} closed its pipe to rank {self.rank} "
                                   "(its actor stopped or failed)")
                item[1] += n
                if item[1] < len(item[0]):
                    break
                q.popleft()

    def close(self) -> None:
        for fd in (*self.reads.values(), *self.writes.values()):
            os.close(fd)
        self.reads, self.writes = {}, {}


def host_id() -> str:
    """Processes with the same id share a kernel and a /tmp: they can open each other's pipes."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}/{tempfile.gettempdir()}"


def open_pipes(rank: int, world: int, timeout_s: float) -> PipeGroup | None:
    """Collective over the (initialised) default gloo group: every rank gets its ``PipeGroup``, or
    every rank gets ``None`` when the ranks are not all on one host or a pipe cannot be opened."""
    hosts: list = [None] * world
    dist.all_gather_object(hosts, host_id())
    if len(set(hosts)) != 1 or os.name != "posix":
        return None
    where = [tempfile.mkdtemp(prefix="raymoe-pipes-") if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    directory = where[0]
    peers = [p for p in range(world) if p != rank]
    reads: dict[int, int] = {}
    writes: dict[int, int] = {}
    error = None
    try:
        if rank == 0:
            for a in range(world):
                for b in range(world):
                    if a != b:
                        os.mkfifo(os.path.join(directory, f"{a}-{b}"), 0o600)
        dist.barrier()
        for p in peers:  # a read end opens without a writer when non-blocking; a write end needs a reader
            reads[p] = os.open(os.path.join(directory, f"{p}-{rank}"), os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        error = e
    ok: list = [None] * world
    dist.all_gather_object(ok, error is None)
    if all(ok):
        for p in peers:
            writes[p] = os.open(os.path.join(directory, f"{rank}-{p}"), os.O_WRONLY | os.O_NONBLOCK)
            try:
                fcntl.fcntl(writes[p], F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # the default 64 KiB: larger messages take more wake-ups, nothing else changes
    dist.barrier()  # every end is open: the names can go
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
    if not all(ok):
        for fd in (*reads.values(), *writes.values()):
            os.close(fd)
        return None
    return PipeGroup(rank, reads, writes, timeout_s)
