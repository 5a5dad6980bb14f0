"""The same-host pipe transport (``actors.pipes``) against gloo's point-to-point on the same
exchanges, among three local processes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 3


def _rows(src: int, dst: int, n: int, width: int) -> torch.Tensor:
    """The rows ``src`` sends ``dst``: distinct per pair, so a mix-up shows."""
    g = torch.Generator().manual_seed(100 * src + dst + 7 * n)
    return torch.randint(0, 256, (n, width), dtype=torch.uint8, generator=g)


def _counts(round_: int) -> list[list[int]]:
    """counts[src][dst] rows; round 1 sends one message of 3 MiB, over the pipes' 1 MiB buffer."""
    if round_ == 0:
        return [[0, 5, 1], [2, 0, 0], [7, 3, 0]]
    return [[0, 3 * 1024 * 1024 // 64, 4], [1, 0, 9], [0, 2, 0]]


def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from actors.collective import Exchange, all_to_all_rows
    from actors.pipes import PeerGone, open_pipes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    pipes = open_pipes(rank, WORLD, num_attention=1, timeout_s=60)
    assert pipes is not None, "three processes on one host got no pipes"
    width = 64
    for round_ in (0, 1):
        counts = _counts(round_)
        send_l = counts[rank]
        recv_l = [counts[src][rank] for src in range(WORLD)]
        x = torch.cat([_rows(rank, dst, send_l[dst], width) for dst in range(WORLD)])
        by_gloo = all_to_all_rows(x, send_l, recv_l, None)
        by_pipes = all_to_all_rows(x, send_l, recv_l, pipes)
        expected = torch.cat([_rows(src, rank, recv_l[src], width) for src in range(WORLD)])
        assert torch.equal(by_gloo, expected), f"rank {rank} round {round_}: gloo itself disagrees"
        assert torch.equal(by_pipes, expected), f"rank {rank} round {round_}: pipes delivered other bytes"

    # two exchanges posted before either is waited for, waited for in reverse order (the second's
    # bytes queue behind the first's on each pair)
    first, second = Exchange(pipes), Exchange(pipes)
    counts = _counts(1)
    send_l = counts[rank]
    recv_l = [counts[src][rank] for src in range(WORLD)]
    got = []
    for ex, salt in ((first, 0), (second, 1)):
        x = torch.cat([_rows(rank + 10 * salt, dst, send_l[dst], width) for dst in range(WORLD)])
        got.append(ex.rows(x, send_l, recv_l))
    wait_first, wait_second = first.start(), second.start()
    wait_second()
    wait_first()
    for salt, received in enumerate(got):
        expected = torch.cat([_rows(src + 10 * salt, rank, recv_l[src], width) for src in range(WORLD)])
        assert torch.equal(received(), expected), f"rank {rank}: exchange {salt} got the other's bytes"

    # rows between shard (0) and expert actors take pipes of 1 MiB, the counts' pipes keep 64 KiB; a
    # message over half its pipe goes by gloo, whose thread moves it while this rank computes
    assert pipes.out_limit[1 if rank == 0 else 0] == (1 << 20) // 2
    if rank != 0:
        assert pipes.out_limit[3 - rank] == (1 << 16) // 2
    big = Exchange(pipes)
    n_big = (1 << 20) // width if rank == 0 else 0
    big.rows(torch.ones(n_big, width, dtype=torch.uint8), [0, n_big, 0] if rank == 0 else [0] * WORLD,
             [0, 0, 0] if rank != 1 else [(1 << 20) // width, 0, 0])
    got_big = big.rows(torch.empty(0, width, dtype=torch.uint8), [0] * WORLD, [0] * WORLD)
    done_big = big.start()
    assert not any(pipes.sendq.values()) and not any(pipes.recvq.values()), "a 1 MiB message went by pipe"
    done_big()
    assert got_big().shape[0] == 0

    # both ends disagreeing on a message's size fails at once (gloo aborts too), not a shifted stream
    dist.barrier()
    if rank == 0:
        all_to_all_rows(torch.zeros(3, width, dtype=torch.uint8), [0, 3, 0], [0] * WORLD, pipes)
    elif rank == 1:
        try:
            all_to_all_rows(torch.empty(0, width, dtype=torch.uint8), [0] * WORLD, [5, 0, 0], pipes)
        except RuntimeError as e:
            assert "disagree" in str(e), str(e)
        else:
            raise AssertionError("a message of another size was taken")
    dist.barrier()
    pipes.close()  # the pair 0 -> 1 is out of step now
    pipes = open_pipes(rank, WORLD, num_attention=1, timeout_s=60)

    # a peer that goes away: the ranks waiting on it fail at once, naming it
    dist.barrier()
    if rank == 2:
        pipes.close()
    else:
        try:
            all_to_all_rows(torch.empty(0, width, dtype=torch.uint8), [0] * WORLD, [0, 0, 1], pipes)
        except PeerGone as e:
            assert "rank 2" in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank}: a receive from a closed peer returned")
        pipes.close()
    dist.barrier()

    # rank 0 cannot make the FIFOs: every rank gets None (gloo alone), none hangs, nothing is left behind
    import glob
    import tempfile

    import actors.pipes

    before = set(glob.glob(f"{tempfile.gettempdir()}/raymoe-pipes-*"))
    if rank == 0:
        def no_fifos(*args, **kwargs):
            raise OSError("FIFOs are not supported here")
        actors.pipes.os.mkfifo = no_fifos
    assert open_pipes(rank, WORLD, num_attention=1, timeout_s=60) is None
    dist.barrier()
    assert set(glob.glob(f"{tempfile.gettempdir()}/raymoe-pipes-*")) <= before
    dist.destroy_process_group()


def test_pipes_deliver_what_gloo_delivers_in_order_and_fail_fast_on_a_gone_peer():
    """Also: large messages go by gloo, a size disagreement fails, and a rank that cannot make the
    pipes leaves every rank on gloo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_worker, args=(port,), nprocs=WORLD)
    except mp.ProcessRaisedException as e:
        pytest.fail(str(e))
