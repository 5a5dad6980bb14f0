"""Dispatch and combine over a recording stand-in for the collectives (three ranks in threads: one
attention shard, two expert actors with a replicated expert): the result equals the experts computed
locally, every tensor handed to a collective is on the data plane's device with the expected dtype,
and nothing on the data path is created off the device or copied to the host (``.cpu()``), the rule
that NCCL needs on CUDA, checked here on CPU."""

import collections
import threading
from types import SimpleNamespace

import pytest
import torch

import actors.collective as collective
import actors.dispatch as dispatch
import actors.placement as placement_mod
import kernels.moe as kmoe
from actors.collective import GroupInfo
from actors.dispatch import Dispatcher, RowFormat, Timer, pack_rows, serve_expert_layer, unpack_rows
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


class FakeDist:
    """``torch.distributed``'s batched point-to-point calls among threads (the group is ``(self, rank)``), with
    rendezvous sends as NCCL (and gloo, for all we rely on) has them: a send completes only once its
    receiver has posted the matching receive; a pair's messages go to its receives in the order
    these were posted. Every tensor handed
    to it is checked against the data plane's device."""

    def __init__(self, world, device, records):
        self.device, self.records = torch.device(device), records
        self.cv = threading.Condition()
        self.queues = {(s, d): [] for s in range(world) for d in range(world)}  # every message sent, in order
        self.sent = {pair: 0 for pair in self.queues}
        self.posted = {pair: 0 for pair in self.queues}  # receives posted per (source, destination)
        self.failed = False
        self.send_widths = set()  # bytes per row of everything sent
        self.rows_sent = collections.Counter()  # (sender, bytes per row) -> rows

    @staticmethod
    def get_rank(group):
        return group[1]

    def isend(self):  # markers for P2POp
        raise AssertionError("only through batch_isend_irecv")

    def irecv(self):
        raise AssertionError("only through batch_isend_irecv")

    class P2POp:
        def __init__(self, op, tensor, peer, group):
            self.op, self.tensor, self.peer, self.group = op, tensor, peer, group

    def batch_isend_irecv(self, ops):
        works = []
        self.records.append(("batch", ops[0].group[1], len(ops)))
        for op in ops:
            me, t = op.group[1], op.tensor
            self.records.append(("p2p", t.device, t.dtype))
            assert t.device == self.device, f"p2p: tensor on {t.device}, data plane on {self.device}"
            assert t.is_contiguous()
            with self.cv:
                if op.op == self.isend:
                    self.send_widths.add(t.shape[-1] * t.element_size())
                    self.rows_sent[me, t.shape[-1] * t.element_size()] += t.shape[0]
                    pair = (me, op.peer)
                    self.queues[pair].append(t.clone())
                    self.cv.notify_all()
                    works.append(self._until(lambda pair=pair, n=self.sent[pair]: self.posted[pair] > n))
                    self.sent[pair] += 1
                else:
                    pair = (op.peer, me)
                    works.append(self._receive(pair, self.posted[pair], t))
                    self.posted[pair] += 1
                    self.cv.notify_all()
        return works

    def _until(self, ready):
        def wait():
            with self.cv:
                if not self.cv.wait_for(lambda: ready() or self.failed, timeout=20) or self.failed:
                    raise TimeoutError("a send or receive never completed (a deadlock, or another rank failed)")
        return SimpleNamespace(wait=wait)

    def _receive(self, pair, k, into):
        """The ``k``-th receive posted on ``pair`` gets the pair's ``k``-th message."""
        def wait():
            self._until(lambda: len(self.queues[pair]) > k).wait()
            with self.cv:
                got = self.queues[pair][k]
            assert got.shape == into.shape and got.dtype == into.dtype, (got.shape, into.shape)
            into.copy_(got)
        return SimpleNamespace(wait=wait)

    def abort(self):
        with self.cv:
            self.failed = True
            self.cv.notify_all()


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("capacity", [0, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "fp8"])
def test_dispatch_combine_equals_local_experts_and_keeps_tensors_on_the_device(tiny_dir, tiny_fp8_dir, monkeypatch,
                                                                               dtype, capacity, micro_batches):
    """``capacity`` 0: the counts are exchanged; 37 (the step's tokens): fixed-capacity buffers.
    ``micro_batches`` 2: the shard sends both halves before it waits for either's results (as two
    interleaved micro-batches do), the experts serve them in turn; with rendezvous sends, a results'
    receive posted only when the results are wanted deadlocks here (a timeout) rather than passes.
    ``fp8``: an FP8 checkpoint served in bfloat16; rows travel quantised (``RowFormat``), about half
    the bytes, and the result is the one the expert computes from the bfloat16 rows itself."""
    if dtype == "fp8":
        check_dispatch(tiny_fp8_dir, monkeypatch, torch.bfloat16, "cpu", capacity, micro_batches, fp8=True)
    else:
        check_dispatch(tiny_dir, monkeypatch, dtype, "cpu", capacity, micro_batches)  # tests/gpu: device="cuda"


def check_dispatch(tiny_dir, monkeypatch, dtype, device, capacity_tokens=0, micro_batches=1, fp8=False):
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
    parts = [slice(0, 20), slice(20, tokens)] if micro_batches == 2 else [slice(0, tokens)]
    if fp8 and device == "cuda":  # Triton compiles on first use, and its runtime is not safe for concurrent
        # compiles (triton#5933): the kernels the threads below run are compiled here first
        fmt = RowFormat(args.hidden_size, dtype, fp8)
        a, a_s = fmt.decode(fmt.encode(x[:2]))
        banks[0].forward_quantized(a, a_s, torch.tensor([0] + [2] * banks[0].num_slots, device=device))

    violations, records, cpu_calls = [], [], []
    world = 3
    fake = FakeDist(world, device, records)
    monkeypatch.setattr(collective, "dist", fake)
    for mod in (dispatch, placement_mod, kmoe, collective):
        monkeypatch.setattr(mod, "torch", GuardedTorch(violations))
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: cpu_calls.append(1) or real_cpu(self, *a, **k))

    out, served, errors = {}, {}, []

    def attention():
        info = GroupInfo(0, world, 1)
        d = Dispatcher(info, (fake, 0), RoutingTable(plc, 1, device), n, Timer(),
                       RowFormat(args.hidden_size, dtype, fp8))
        d.capacity = capacity_tokens
        receives = [d(layer, x[p], Routing(weights[p], indices[p])) for p in parts]  # all sent, then received
        out["y"] = torch.cat([receive() for receive in receives])
        out["load"] = d.load[layer]

    def expert(a):
        served[a] = [0] * banks[a].num_slots
        for _ in parts:
            got = serve_expert_layer(GroupInfo(1 + a, world, 1), (fake, 1 + a), banks[a], args.hidden_size,
                                     dtype, args.num_experts_per_tok, Timer(), capacity_tokens)
            served[a] = [u + v for u, v in zip(served[a], got, strict=True)]

    def run(f, *a):
        try:
            f(*a)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            fake.abort()

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
    assert full.fp8 == fp8
    hidden_bytes = args.hidden_size + 4 * -(-args.hidden_size // 128) if fp8 else args.hidden_size * dtype.itemsize
    # a token goes once to each expert actor holding one of its choices, with its k slots and weights;
    # its weighted sum over them comes back in the serving dtype (and counts as 8 bytes)
    assert fake.send_widths - {8} == {hidden_bytes + 8 * args.num_experts_per_tok, args.hidden_size * dtype.itemsize}
    # one row per (token, expert actor holding any of its choices), not one per choice
    table, k = RoutingTable(plc, 1, "cpu"), args.num_experts_per_tok
    pairs = sum(len(set(zip(table.choose(layer, indices[p].cpu())[0].tolist(),
                            [t for t in range(p.stop - p.start) for _ in range(k)], strict=True)))
                for p in parts)  # the copies of a replicated expert take turns within each call
    assert pairs < tokens * args.num_experts_per_tok
    sent = fake.rows_sent[0, hidden_bytes + 8 * args.num_experts_per_tok]
    assert sent == (pairs if not capacity_tokens else 2 * capacity_tokens * micro_batches)
    assert out["load"].tolist() == torch.bincount(indices.flatten(), minlength=n).tolist()
    # the rows of the replicated expert were split over both copies
    for e in (0,):
        copies = plc.layers[layer][e]
        assert all(served[a][s] > 0 for a, s in copies)
    assert sum(map(sum, served.values())) == tokens * args.num_experts_per_tok
    batches = [(rank, n) for kind, rank, n in records if kind == "batch"]
    # per round, the shard posts its rows and the receive of their results as one batch (4 sends and
    # receives: one each way per expert actor); each expert actor receives (1) and answers (1); the
    # counts exchange, where it happens, is one more batch per rank (2 sends + 2 receives)
    counts = [] if capacity_tokens else [(0, 4), (1, 4), (2, 4)]
    expected = sorted((counts + [(0, 4), (1, 1), (1, 1), (2, 1), (2, 1)]) * micro_batches)
    assert sorted(batches) == expected
    assert all(kind != "p2p" or dtype in (torch.uint8, torch.int64) for kind, _, dtype in records)
    assert not violations, violations
    assert not cpu_calls, "a data-path tensor was copied to the host with .cpu()"


def test_pack_rows_round_trip():
    x = torch.randint(0, 256, (5, 7), dtype=torch.uint8)
    slots = torch.tensor([[3, -1], [0, 1], [-1, 9], [2**30, 1], [1, -1]], dtype=torch.int32)
    weights = torch.rand(5, 2)
    rows, got_slots, got_weights = unpack_rows(pack_rows(x, slots, weights), 7, 2)
    assert torch.equal(rows, x) and torch.equal(got_slots, slots) and torch.equal(got_weights, weights)
    rows, got_slots, got_weights = unpack_rows(pack_rows(x[:0], slots[:0], weights[:0]), 7, 2)  # nothing to send
    assert rows.shape == (0, 7) and got_slots.shape == (0, 2) and got_weights.shape == (0, 2)


@pytest.mark.parametrize("rows", [0, 5])
def test_fp8_row_format_carries_exactly_what_act_quant_gives(rows):
    """An FP8 checkpoint's rows travel as act_quant's values and scales (hidden 200: two scale
    blocks, the last one short), and decode to them bit for bit; a shard with no rows sends none."""
    import kernels

    fmt = RowFormat(200, torch.bfloat16, fp8=True)
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    wire = fmt.encode(x)
    assert wire.dtype == torch.uint8 and wire.shape == (rows, 200 + 2 * 4) and fmt.width == 208
    a, a_s = fmt.decode(wire)
    want_a, want_s = kernels.act_quant(x)
    assert torch.equal(a.view(torch.uint8), want_a.view(torch.uint8)) and torch.equal(a_s, want_s)
    (back,) = RowFormat(200, torch.bfloat16, fp8=False).decode(RowFormat(200, torch.bfloat16, fp8=False).encode(x))
    assert torch.equal(back, x)
