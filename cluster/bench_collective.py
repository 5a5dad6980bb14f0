"""``raymoe bench collective``: one MoE layer's round trip on the data plane, the ways raymoe moves
rows on one host (``actors.collective``: batched point-to-point sends and receives between the
pairs that move rows, over gloo or over named pipes, ``actors.pipes``) against two gloo
``all_to_all_single`` calls, among 1 + E local processes: an
attention shard sends ``rows`` rows to each of E expert actors, which send them straight back.
Rows are the default model's (hidden 160, float32, plus its 4 choices' slots and weights, 32
bytes). Before each round the shard computes for 1 ms (a spin, standing in for its attention)
while the expert actors wait in their receive, as in a step; the time is the shard's, from its
first send to its last result, median of ``repeats`` rounds.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch

ROW_BYTES = 160 * 4 + 8 * 4
MODES = ("all_to_all_single", "gloo send/recv", "pipes")


def _round_trip(mode: str, rank: int, world: int, rows: int, pipes) -> None:
    import torch.distributed as dist

    from actors.collective import all_to_all_rows

    out = [0] + [rows] * (world - 1) if rank == 0 else [rows] + [0] * (world - 1)  # shard: to experts
    nothing = [0] * world
    if mode != "all_to_all_single":
        group = pipes if mode == "pipes" else None
        if rank == 0:
            all_to_all_rows(torch.zeros(sum(out), ROW_BYTES, dtype=torch.uint8), out, nothing, group)
            all_to_all_rows(torch.empty(0, ROW_BYTES, dtype=torch.uint8), nothing, out, group)
        else:
            got = all_to_all_rows(torch.empty(0, ROW_BYTES, dtype=torch.uint8), nothing, out, group)
            all_to_all_rows(got, out, nothing, group)
        return
    send_first = out if rank == 0 else nothing
    recv_first = nothing if rank == 0 else out
    x = torch.zeros(sum(send_first), ROW_BYTES, dtype=torch.uint8)
    got = torch.empty(sum(recv_first), ROW_BYTES, dtype=torch.uint8)
    dist.all_to_all_single(got, x, output_split_sizes=recv_first, input_split_sizes=send_first)
    back = torch.empty(sum(send_first), ROW_BYTES, dtype=torch.uint8)
    dist.all_to_all_single(back, got, output_split_sizes=send_first, input_split_sizes=recv_first)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _worker(rank: int, world: int, port: int, row_counts: list[int], repeats: int, out_path: str) -> None:
    import torch.distributed as dist

    from actors.pipes import open_pipes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pipes = open_pipes(rank, world, 1, 120.0)
    assert pipes is not None, "no pipes between these processes: the pipes row would measure gloo"
    rows_out = []
    for rows in row_counts:
        for mode in MODES:
            times = []
            dist.barrier()
            for i in range(repeats + 5):  # 5 warm-up rounds
                if rank == 0:
                    _spin(1e-3)
                t0 = time.perf_counter()
                _round_trip(mode, rank, world, rows, pipes)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
            rows_out.append({"rows": rows, "mode": mode, "ms": 1e3 * statistics.median(times)})
    pipes.close()
    dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows_out))


def main(args) -> int:
    import tempfile

    import torch.multiprocessing as mp

    experts = 2
    row_counts = [int(r) for r in (getattr(args, "rows", None) or "4,32,128").split(",")]
    repeats = int(getattr(args, "repeats", 3) or 3) * 100
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(1 + experts, port, row_counts, repeats, part), nprocs=1 + experts)
        rows = json.loads(Path(part).read_text())
    print(f"one MoE layer's round trip on one host, 1 shard + {experts} expert actors, {ROW_BYTES} bytes per row, "
          f"median of {repeats}; ms (and all_to_all_single / it)")
    print(f"{'rows per expert actor':>21} | " + " | ".join(f"{m:>22}" for m in MODES))
    for n in row_counts:
        ms = [next(r["ms"] for r in rows if r["rows"] == n and r["mode"] == m) for m in MODES]
        print(f"{n:>21} | " + " | ".join(f"{t:8.3f} ({ms[0] / t:5.2f}x)".rjust(22) for t in ms))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "collective", "expert_actors": experts, "row_bytes": ROW_BYTES,
                               "repeats": repeats, "cpus": os.cpu_count(), "machine": platform.machine(),
                               "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
