"""Same-host transport for the data plane: one named pipe (FIFO) per ordered pair of ranks.

On one machine gloo moves each point-to-point message over a loopback TCP pair with three socket
writes (send-ready, receive-ready, the data), each of which wakes a process. A pipe needs one write
and wakes the reader once: a 21 KB round trip between two processes took 16-39 us against 156-173 us
with gloo's ``send``/``recv`` on this 2-core machine. ``init_group`` opens pipes when every rank of
a gloo group runs on the same host (and the layout allows it); NCCL groups never use them.

Pipes carry the small messages, the latency-bound ones; a message over half its pipe's buffer goes
by gloo (``PipeGroup.fits``: both ends see the same buffer, so both choose the same way). A pipe
moves bytes only while its ranks are inside ``post`` or ``wait``, whereas gloo's own thread moves a
large message while the ranks compute (the shard's shared experts, the other micro-batch). Each
message is framed by its length (8 bytes, in the same write): both ends know each size, as with
``isend``/``irecv``, and a disagreement fails at once rather than shifting every later message.
Each pair's messages are read in the order they were posted. Every descriptor is non-blocking and
``PipeGroup.wait`` progresses every queued send and receive of the group (not only its own), so a
full pipe never holds up the receives it waits behind.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import socket
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # fcntl.h: a pipe's buffer size (Linux)
# the buffer asked for on the pipes that carry rows (shard <-> expert actor); the others keep the
# default 64 KiB: every byte counts against the user's pipe quota (pipe-user-pages-soft, 64 MiB)
PIPE_BYTES = 1 << 20
HEADER = struct.Struct("<Q")  # each message's length


class PeerGone(RuntimeError):
    """A peer closed its end of a pipe: its actor stopped or failed."""


class _Message:
    """One message on one pipe: its length header, then the tensor's bytes; ``done`` of them moved."""

    def __init__(self, t: torch.Tensor):
        assert t.is_contiguous(), "a pipe reads into and writes from contiguous tensors only"
        self.data = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # keeps the tensor alive
        self.header = bytearray(HEADER.pack(len(self.data)))
        self.size = HEADER.size + len(self.data)
        self.done = 0

    def buffers(self) -> list:
        if self.done < HEADER.size:
            return [memoryview(self.header)[self.done:], self.data]
        return [self.data[self.done - HEADER.size:]]


class PipeGroup:
    """The pipes of one rank: a read end from every peer and a write end to every peer."""

    def __init__(self, rank: int, reads: dict[int, int], writes: dict[int, int], timeout_s: float):
        self.rank, self.reads, self.writes, self.timeout_s = rank, reads, writes, timeout_s
        self.sendq: dict[int, deque[_Message]] = {peer: deque() for peer in writes}
        self.recvq: dict[int, deque[_Message]] = {peer: deque() for peer in reads}
        # the largest message each pipe carries: half its buffer (the two ends read the same size)
        self.out_limit = {p: fcntl.fcntl(fd, F_GETPIPE_SZ) // 2 for p, fd in writes.items()}
        self.in_limit = {p: fcntl.fcntl(fd, F_GETPIPE_SZ) // 2 for p, fd in reads.items()}

    def fits(self, peer: int, nbytes: int, sending: bool) -> bool:
        """Whether a message of ``nbytes`` to (or from) ``peer`` goes by pipe; else by gloo."""
        return HEADER.size + nbytes <= (self.out_limit if sending else self.in_limit)[peer]

    def post(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> Callable[[], None]:
        """Queue ``(peer, tensor)`` sends and receives (receives fill their tensors in place) and
        write what fits now; returns the function that waits for all of them."""
        items = []
        for queues, ops in ((self.sendq, sends), (self.recvq, recvs)):
            for peer, t in ops:
                message = _Message(t)
                queues[peer].append(message)
                items.append(message)
        self._progress()
        return lambda: self.wait(items)

    def wait(self, items: list[_Message]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._progress()
            if all(m.done == m.size for m in items):
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
                raise TimeoutError(f"data plane: rank {self.rank} waited {self.timeout_s:.0f} s for ranks {waiting} "
                                   "to finish a message (collective_timeout_s in the layout)")

    def _progress(self) -> None:
        """Write and read whatever the pipes take and hold now, in each pair's order."""
        for peer, q in self.sendq.items():
            while q:
                m = q[0]
                try:
                    m.done += os.writev(self.writes[peer], m.buffers())
                except BlockingIOError:
                    break
                except BrokenPipeError:
                    raise PeerGone(f"data plane: rank {peer} closed its pipe from rank {self.rank} "
                                   "(its actor stopped or failed)") from None
                if m.done < m.size:
                    break
                q.popleft()
        for peer, q in self.recvq.items():
            while q:
                m = q[0]
                expected = len(m.data)
                try:
                    n = os.readv(self.reads[peer], m.buffers())
                except BlockingIOError:
                    break
                if n == 0:
                    raise PeerGone(f"data plane: rank {peer} closed its pipe to rank {self.rank} "
                                   "(its actor stopped or failed)")
                m.done += n
                if m.done >= HEADER.size and HEADER.unpack(m.header)[0] != expected:
                    raise RuntimeError(f"data plane: rank {peer} sent {HEADER.unpack(m.header)[0]} bytes where rank "
                                       f"{self.rank} expected {expected}: the two sides disagree on the step")
                if m.done < m.size:
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


def _all(ok: bool, world: int) -> bool:
    """Collective: whether every rank's ``ok`` is true."""
    flags: list = [None] * world
    dist.all_gather_object(flags, ok)
    return all(flags)


def open_pipes(rank: int, world: int, num_attention: int, timeout_s: float) -> PipeGroup | None:
    """Collective over the (initialised) default gloo group: every rank gets its ``PipeGroup``, or
    every rank gets ``None`` (gloo alone) when the ranks are not all on one host or any pipe cannot
    be made or opened. Every rank makes the same collective calls whatever fails, so none hangs;
    the FIFOs' names are removed once all are open (or on failure), and descriptors of a failed
    attempt are closed."""
    hosts: list = [None] * world
    dist.all_gather_object(hosts, host_id())
    if len(set(hosts)) != 1 or os.name != "posix":
        return None
    directory = None
    if rank == 0:
        try:
            directory = tempfile.mkdtemp(prefix="raymoe-pipes-")
            for a in range(world):
                for b in range(world):
                    if a != b:
                        os.mkfifo(os.path.join(directory, f"{a}-{b}"), 0o600)
        except OSError:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            directory = None
    where = [directory]
    dist.broadcast_object_list(where, src=0)
    directory = where[0]
    if directory is None:
        return None
    peers = [p for p in range(world) if p != rank]
    reads: dict[int, int] = {}
    writes: dict[int, int] = {}
    try:
        ok = True
        try:  # a read end opens without a writer when non-blocking; a write end needs its reader open
            for p in peers:
                reads[p] = os.open(os.path.join(directory, f"{p}-{rank}"), os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            ok = False
        ok = _all(ok, world)
        if ok:
            try:
                for p in peers:
                    writes[p] = os.open(os.path.join(directory, f"{rank}-{p}"), os.O_WRONLY | os.O_NONBLOCK)
                    if (rank < num_attention) != (p < num_attention):  # the pipes that carry rows
                        try:
                            fcntl.fcntl(writes[p], F_SETPIPE_SZ, PIPE_BYTES)
                        except OSError:
                            pass  # over the quota: a smaller buffer, so more of the rows go by gloo
            except OSError:
                ok = False
            ok = _all(ok, world)  # every end is open (or not): the names can go
    finally:
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
    if not ok:
        for fd in (*reads.values(), *writes.values()):
            os.close(fd)
        return None
    return PipeGroup(rank, reads, writes, timeout_s)
