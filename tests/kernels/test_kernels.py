"""Each Triton kernel against its torch twin on fresh random inputs, and the twins against float64.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py), so
shapes stay small; they include ragged ones (not multiples of the 128 block). Run this file as a
script for timings: ``python -m tests.kernels.test_kernels``.
"""

import os

import pytest
import torch

if __name__ == "__main__" and not torch.cuda.is_available():  # as a script, before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import reference as ref  # noqa: E402
from model.tiny import quantize_weight  # noqa: E402

triton_fp8 = pytest.importorskip("kernels.triton_fp8")
triton_mla = pytest.importorskip("kernels.triton_mla")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("shape", [(3, 128), (5, 300), (2, 3, 200), (1, 64)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_bit_exact(shape, scale_fmt):
    x = _rand(*shape, seed=sum(shape), scale=3.0)
    x[..., 0] = 1000.0  # one block with a large outlier
    y, s = triton_fp8.act_quant(x, 128, scale_fmt)
    y_ref, s_ref = ref.act_quant(x, 128, scale_fmt)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(y), _bits(y_ref))
    # and the twin is exactly torch's own cast of the scaled values
    xs = x.float() / s_ref.repeat_interleave(128, -1)[..., : shape[-1]]
    assert torch.equal(_bits(y_ref), _bits(xs.clamp(-448, 448).to(torch.float8_e4m3fn)))
    if scale_fmt == "ue8m0":
        assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))


def test_act_quant_twin_against_float64():
    x = _rand(4, 256, seed=1)
    y, s = ref.act_quant(x)
    back = y.double() * s.double().repeat_interleave(128, -1)
    # e4m3 keeps 3 mantissa bits: |error| <= 2^-4 |x| (normal range) + half the subnormal step
    assert ((back - x.double()).abs() <= x.double().abs() * 2**-4 + s.double().max() * 2**-10).all()


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (70, 33)])
def test_weight_dequant(shape):
    q, s = quantize_weight(_rand(*shape, seed=shape[0]).cpu())
    q, s = q.to(DEVICE), s.to(DEVICE)
    got = triton_fp8.weight_dequant(q, s)
    # within one bf16 ulp: the interpreter's float32 -> bf16 cast does not round to nearest
    torch.testing.assert_close(got.float(), ref.weight_dequant(q, s).float(), atol=0, rtol=2**-7)
    exact = q.double() * s.double().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert ((ref.weight_dequant(q, s).double() - exact).abs() <= exact.abs() * 2**-8).all()  # bf16 rounding


@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (7, 200, 300), (33, 64, 129)])
def test_fp8_gemm(m, n, k):
    a, a_s = ref.act_quant(_rand(m, k, seed=m))
    b, b_s = (t.to(DEVICE) for t in quantize_weight(_rand(n, k, seed=n).cpu()))
    got = triton_fp8.fp8_gemm(a, a_s, b, b_s).float()
    want = ref.fp8_gemm(a, a_s, b, b_s).float()
    # both accumulate exact products in float32, in different orders; outputs are bf16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    exact = (a.double() * a_s.double().repeat_interleave(128, -1)[:, :k]) @ ref.weight_dequant_float(b, b_s).double().T
    assert ((want.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


def test_grouped_fp8_gemm():
    e, n, k = 5, 96, 160
    counts = [3, 0, 17, 1, 6]
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), device=DEVICE)
    a, a_s = ref.act_quant(_rand(sum(counts), k, seed=2))
    ws = [quantize_weight(_rand(n, k, seed=10 + i).cpu()) for i in range(e)]
    b = torch.stack([w for w, _ in ws]).to(DEVICE)
    b_s = torch.stack([s for _, s in ws]).to(DEVICE)
    got = triton_fp8.grouped_fp8_gemm(a, a_s, b, b_s, offsets).float()
    want = ref.grouped_fp8_gemm(a, a_s, b, b_s, offsets).float()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    lo = 3 + 0
    torch.testing.assert_close(want[lo:lo + 17], ref.fp8_gemm(a[lo:lo + 17], a_s[lo:lo + 17], b[2], b_s[2]).float())


def _paged_case(lens, heads=4, r=64, p=16, block_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // block_size) for n in lens) + 3
    perm = torch.randperm(n_blocks, generator=g).tolist()  # scattered, out-of-order blocks
    tables, used = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(perm[used:used + nb])
        used += nb
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kv = torch.randn(n_blocks, block_size, r, generator=g)
    pe = torch.randn(n_blocks, block_size, p, generator=g)
    q = torch.randn(len(lens), heads, r, generator=g)
    qpe = torch.randn(len(lens), heads, p, generator=g)
    return [t.to(DEVICE) for t in (q, qpe, kv, pe, bt, torch.tensor(lens))]


@pytest.mark.parametrize("lens", [[1], [5, 37, 64], [130, 3]])
def test_mla_decode_against_twin_and_float64(lens):
    q, qpe, kv, pe, bt, sl = _paged_case(lens)
    scale = 0.13
    got = triton_mla.mla_decode(q, qpe, kv, pe, bt, sl, scale)
    want = ref.mla_decode(q, qpe, kv, pe, bt, sl, scale)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for i, n in enumerate(lens):  # float64 dense attention over the gathered context
        slots = torch.tensor([bt[i, t // 8].item() * 8 + t % 8 for t in range(n)])
        ctx_kv, ctx_pe = kv.view(-1, kv.shape[-1])[slots].double(), pe.view(-1, pe.shape[-1])[slots].double()
        s = (q[i].double() @ ctx_kv.T + qpe[i].double() @ ctx_pe.T) * scale
        exact = s.softmax(-1) @ ctx_kv
        assert (want[i].double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("k,valid_counts", [(8, [8, 3, 1]), (70, [70, 64, 5, 1])])
def test_mla_sparse_against_twin_and_float64(k, valid_counts):
    """DeepSeek-V3.2's sparse attention: each query row over its own (scattered) cache slots."""
    g = torch.Generator().manual_seed(k)
    n_slots, heads, r, p = 200, 4, 64, 16
    kv, pe = torch.randn(n_slots, r, generator=g), torch.randn(n_slots, p, generator=g)
    rows = len(valid_counts)
    q, qpe = torch.randn(rows, heads, r, generator=g), torch.randn(rows, heads, p, generator=g)
    slots = torch.full((rows, k), -1, dtype=torch.long)
    for i, c in enumerate(valid_counts):
        chosen = torch.randperm(n_slots, generator=g)[:c]
        where = torch.randperm(k, generator=g)[:c]  # -1 anywhere in the row, not only at its end
        slots[i, where] = chosen
    q, qpe, kv, pe, slots = (t.to(DEVICE) for t in (q, qpe, kv, pe, slots))
    got = triton_mla.mla_sparse(q, qpe, kv, pe, slots, 0.11)
    want = ref.mla_sparse(q, qpe, kv, pe, slots, 0.11)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for i in range(rows):  # float64 dense attention over the row's slots
        sel = slots[i][slots[i] >= 0]
        s = (q[i].double() @ kv[sel].double().T + qpe[i].double() @ pe[sel].double().T) * 0.11
        assert (want[i].double() - s.softmax(-1) @ kv[sel].double()).abs().max() < 1e-5


def test_mla_decode_non_contiguous_queries():
    q, qpe, kv, pe, bt, sl = _paged_case([5, 17, 2])
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, head-major strides
    torch.testing.assert_close(triton_mla.mla_decode(q_t, qpe, kv, pe, bt, sl, 0.2),
                               ref.mla_decode(q, qpe, kv, pe, bt, sl, 0.2), atol=2e-5, rtol=1e-4)


def test_mla_decode_is_numerically_safe():
    q, qpe, kv, pe, bt, sl = _paged_case([200, 9], seed=4)
    got = triton_mla.mla_decode(q * 50, qpe * 50, kv, pe, bt, sl, 1.0)  # huge logits: naive exp overflows
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.mla_decode(q * 50, qpe * 50, kv, pe, bt, sl, 1.0), atol=1e-4, rtol=1e-4)


def test_moe_fp8_against_per_expert_loop():
    import kernels

    t, hidden, inter, e, top_k = 9, 160, 96, 6, 2
    x = _rand(t, hidden, seed=5)
    indices = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:top_k]
                           for i in range(t)]).to(DEVICE)
    weights = torch.rand(t, top_k, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    qs = {name: [tuple(q.to(DEVICE) for q in quantize_weight(_rand(*shape, seed=100 * j + i).cpu())) for i in range(e)]
          for j, (name, shape) in enumerate([("gate", (inter, hidden)), ("up", (inter, hidden)),
                                             ("down", (hidden, inter))])}
    stacked = {n: (torch.stack([w for w, _ in v]), torch.stack([s for _, s in v])) for n, v in qs.items()}
    got = kernels.moe_fp8(x, indices, weights, *stacked["gate"], *stacked["up"], *stacked["down"])
    want = torch.zeros_like(x)
    for i in range(t):
        for k in range(top_k):
            ex = indices[i, k].item()
            g = ref.fp8_linear(x[i:i + 1], *qs["gate"][ex])
            u = ref.fp8_linear(x[i:i + 1], *qs["up"][ex])
            want[i] += weights[i, k] * ref.fp8_linear(torch.nn.functional.silu(g) * u, *qs["down"][ex])[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


if __name__ == "__main__":
    import time

    for name, fn in [("act_quant 8x1024", lambda: triton_fp8.act_quant(_rand(8, 1024))),
                     ("mla_decode b4 len512", lambda: triton_mla.mla_decode(*_paged_case([512] * 4), 0.1))]:
        t0 = time.perf_counter()
        fn()
        mode = "interpreted" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
        print(f"{name}: {1e3 * (time.perf_counter() - t0):.1f} ms ({DEVICE}, {mode})")


@pytest.mark.parametrize("fp8", [False, True])
def test_index_scores_against_twin_and_float64(fp8):
    """DeepSeek-V3.2's indexer scoring over scattered cache slots, float or FP8 keys with scales."""
    triton_index = pytest.importorskip("kernels.triton_index")
    g = torch.Generator().manual_seed(3)
    rows, heads, d, n_slots, length = 5, 6, 48, 120, 70
    q, w = torch.randn(rows, heads, d, generator=g), torch.randn(rows, heads, generator=g)
    keys = torch.randn(n_slots, d, generator=g)
    scales = None
    if fp8:
        keys, scales = ref.act_quant(keys, 128)
    slots = torch.randint(0, n_slots, (rows, length), generator=g)
    slots[1, 50:] = -1
    slots[3, ::7] = -1
    q, w, keys, slots = (t.to(DEVICE) for t in (q, w, keys, slots))
    scales = scales.to(DEVICE) if scales is not None else None
    got = triton_index.index_scores(q, w, keys, slots, scales)
    want = ref.index_scores(q, w, keys, slots, scales)
    assert torch.equal(torch.isinf(got), slots < 0) and torch.equal(torch.isinf(want), slots < 0)
    ok = slots >= 0
    torch.testing.assert_close(got[ok], want[ok], atol=1e-4, rtol=1e-4)
    k64 = keys.double() if scales is None else keys.double() * scales.double()[:, :1]
    for n in range(rows):  # float64, written out
        for j in range(length):
            if slots[n, j] >= 0:
                s = (q[n].double() @ k64[slots[n, j]]).clamp(min=0)
                magnitude = float(w[n].double().abs() @ s) + 1.0  # float32 sums: relative to the terms
                assert abs(float(w[n].double() @ s) - float(want[n, j])) < 1e-6 * magnitude
    # one context's slots expanded to every query (stride 0, as the indexer passes them): read, not copied
    shared = slots[1][None, :].expand(rows, -1)
    torch.testing.assert_close(triton_index.index_scores(q, w, keys, shared, scales),
                               ref.index_scores(q, w, keys, shared, scales), atol=1e-4, rtol=1e-4)
