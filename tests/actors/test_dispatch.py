"""Dispatch and combine over a recording stand-in for the collectives (three ranks in threads: one
attention shard, two expert actors with a replicated expert): the result equals the experts computed
locally, every tensor handed to a collective is on the data plane's device with the expected dtype,
and nothing on the data path is created off the device or copied to the host (``.cpu()``), the rule
that NCCL needs on CUDA, checked here on CPU."""

import threading

import pytest
import torch

import actors.dispatch as dispatch
import actors.placement as placement_mod
import kernels.moe as kmoe
from actors.collective import GroupInfo
from actors.dispatch import Dispatcher, Timer, pack_rows, serve_expert_layer, unpack_rows
from actors.expert_bank import ExpertBank
from actors.placement import Placement, RoutingTable
from kernels.moe import sort_by_expert
from model.checkpoint import CheckpointReader
from model.moe import Routing

FACTORIES = {"zeros", "empty", "ones", "full", "arange", "tensor", "randn", "rand"}


class GuardedTorch:
    """``torch`` for the data-path modules: records factory calls that name no device."""

    def __init__(self, violations):
        self._violations = violations

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if "device" not in kwargs:
                self._violations.append(f"torch.{name} without device=")
            return attr(*args, **kwargs)
        return factory


class Mailbox:
    """All-to-all among ``world`` threads: each puts one chunk per destination, then takes its own."""

    def __init__(self, world):
        self.world, self.barrier, self.chunks = world, threading.Barrier(world, timeout=30), {}

    def exchange(self, rank, chunks):
        self.chunks[rank] = chunks
        self.barrier.wait()
        got = [self.chunks[src][rank] for src in range(self.world)]
        self.barrier.wait()
        return got


def _recording_collectives(device, records):
    def check(kind, t, dtypes):
        records.append((kind, t.device, t.dtype))
        assert t.device == torch.device(device), f"{kind}: tensor on {t.device}, data plane on {device}"
        assert t.dtype in dtypes, f"{kind}: dtype {t.dtype}"

    def exchange_counts(send, group):
        box, rank = group
        check("counts", send, {torch.int64})
        return torch.cat(box.exchange(rank, list(send.split(1))))

    def all_to_all_rows(x, send_counts, recv_counts, group):
        box, rank = group
        check("rows", x, {torch.uint8, torch.float32, torch.bfloat16})
        assert isinstance(send_counts, list) and isinstance(recv_counts, list)
        got = box.exchange(rank, list(x.split(send_counts)))
        assert [g.shape[0] for g in got] == recv_counts
        return torch.cat(got)

    return exchange_counts, all_to_all_rows


@pytest.mark.parametrize("capacity", [0, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_combine_equals_local_experts_and_keeps_tensors_on_the_device(tiny_dir, monkeypatch, dtype,
                                                                               capacity):
    """``capacity`` 0: the counts are exchanged; 37 (the step's tokens): fixed-capacity buffers."""
    check_dispatch(tiny_dir, monkeypatch, dtype, "cpu", capacity)  # tests/gpu runs it with device="cuda"


def check_dispatch(tiny_dir, monkeypatch, dtype, device, capacity_tokens=0):
    reader = CheckpointReader(tiny_dir)
    args = reader.args
    layer, n = args.moe_layers[0], args.n_routed_experts
    # two expert actors; expert 0 and expert 12 have a second copy on the other actor
    plc = Placement.initial([layer], n, 2, spare_slots=1, replicas={0: 1, 12: 1})
    banks = [ExpertBank.load(reader, layer, plc.slot_contents(a)[layer], args, dtype, device) for a in range(2)]
    gen = torch.Generator().manual_seed(0)
    tokens = 37
    x = torch.randn(tokens, args.hidden_size, generator=gen).to(dtype)
    indices = torch.stack([torch.randperm(n, generator=gen)[:args.num_experts_per_tok] for _ in range(tokens)])
    indices[:10, 0] = 0  # many tokens for the replicated expert: both copies get some
    weights = torch.rand(tokens, args.num_experts_per_tok, generator=gen)
    x, indices, weights = x.to(device), indices.to(device), weights.to(device)

    violations, records, cpu_calls = [], [], []
    exchange_counts, all_to_all_rows = _recording_collectives(device, records)
    monkeypatch.setattr(dispatch, "exchange_counts", exchange_counts)
    monkeypatch.setattr(dispatch, "all_to_all_rows", all_to_all_rows)
    for mod in (dispatch, placement_mod, kmoe):
        monkeypatch.setattr(mod, "torch", GuardedTorch(violations))
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: cpu_calls.append(1) or real_cpu(self, *a, **k))

    box, world = Mailbox(3), 3
    out, served, errors = {}, {}, []

    def attention():
        info = GroupInfo(0, world, 1)
        d = Dispatcher(info, (box, 0), RoutingTable(plc, 1, device), n, Timer())
        d.capacity = capacity_tokens * args.num_experts_per_tok
        out["y"] = d(layer, x, Routing(weights, indices))
        out["load"] = d.load[layer]

    def expert(a):
        served[a] = serve_expert_layer(GroupInfo(1 + a, world, 1), (box, 1 + a), banks[a], args.hidden_size,
                                       dtype, Timer(), capacity_tokens * args.num_experts_per_tok)

    def run(f, *a):
        try:
            f(*a)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            box.barrier.abort()

    threads = [threading.Thread(target=run, args=(attention,))] + [
        threading.Thread(target=run, args=(expert, a)) for a in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    monkeypatch.undo()

    # the oracle: every chosen expert computed locally from one bank holding all experts
    full = ExpertBank.load(reader, layer, list(range(n)), args, dtype, device)
    order, rows, offsets = sort_by_expert(indices, n)
    local = full.forward_sorted(x[rows], offsets).float()
    expected = torch.zeros(tokens, args.hidden_size, device=device).index_add_(
        0, rows, local * weights.flatten()[order, None])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out["y"].float(), expected.to(dtype).float(), atol=tol, rtol=tol)
    assert out["load"].tolist() == torch.bincount(indices.flatten(), minlength=n).tolist()
    # the rows of the replicated expert were split over both copies
    for e in (0,):
        copies = plc.layers[layer][e]
        assert all(served[a][s] > 0 for a, s in copies)
    assert sum(map(sum, served.values())) == tokens * args.num_experts_per_tok
    if capacity_tokens:  # two collectives per rank and layer: padded rows, results
        assert [k for k, _, _ in records].count("counts") == 0 and len(records) == 6
    else:  # three: counts, packed rows, results
        assert [k for k, _, _ in records].count("counts") == 3 and len(records) == 9
    assert not violations, violations
    assert not cpu_calls, "a data-path tensor was copied to the host with .cpu()"


def test_pack_rows_round_trip():
    x = torch.randn(5, 7).to(torch.bfloat16)
    slot = torch.tensor([3, 0, 9, 2**40, 1])
    rows, slots = unpack_rows(pack_rows(x, slot), 7, torch.bfloat16)
    assert torch.equal(rows, x) and torch.equal(slots, slot)
    rows, slots = unpack_rows(pack_rows(x[:0], slot[:0]), 7, torch.bfloat16)  # a rank that sends nothing
    assert rows.shape == (0, 7) and slots.shape == (0,)
