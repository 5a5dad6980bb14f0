"""``raymoe bench kernels``: the FP8 GEMMs and MLA decode on DeepSeek-V3 shapes.

On CUDA it times the Triton kernels against the device's own measured ceilings (a large bf16
matmul for TFLOP/s, a large device-to-device copy for GB/s) and against torch's path (dequantise
+ bf16 matmul; ``torch._scaled_mm`` where it accepts the block scales), all in one run. Without
CUDA it times the torch twins on reduced shapes, so the script and its JSON still run everywhere;
those figures say nothing about GPU kernels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kernels import reference as ref

# DeepSeek-V3: hidden 7168, q_lora 1536, kv_lora 512 + rope 64, 128 heads x (128 + 64), experts 2048
V3_LINEARS = {
    "q_a_proj": (1536, 7168), "q_b_proj": (24576, 1536), "kv_a_proj": (576, 7168), "kv_b_proj": (32768, 512),
    "o_proj": (7168, 16384), "dense_up": (18432, 7168), "expert_up": (2048, 7168), "expert_down": (7168, 2048),
}


def _time(fn, cuda: bool, repeats: int = 20) -> float:
    """Seconds per call (median)."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, rep=repeats * 5, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(max(3, repeats // 5)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _ceilings(dev: str, cuda: bool) -> dict:
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    t = _time(lambda: a @ a, cuda)
    buf = torch.empty(256 * 2**20 if cuda else 32 * 2**20, dtype=torch.uint8, device=dev)
    t_copy = _time(lambda: buf.clone(), cuda)
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbs": 2 * buf.numel() / t_copy / 1e9}


def _quantised_weight(n: int, k: int, dev: str):
    from model.tiny import quantize_weight

    w, s = quantize_weight(torch.randn(n, k) / k**0.5)
    return w.to(dev), s.to(dev)


def _scaled_mm_path(a, a_s, b, b_s):
    """torch's own FP8 GEMM with blockwise scales, if this torch/device accepts them; else None."""
    try:
        out = torch._scaled_mm(a, b.T, scale_a=a_s, scale_b=b_s.T, out_dtype=torch.bfloat16)
        return lambda: torch._scaled_mm(a, b.T, scale_a=a_s, scale_b=b_s.T, out_dtype=torch.bfloat16), out
    except Exception:  # noqa: BLE001 - any refusal means the path does not apply here
        return None, None


def bench_gemms(dev: str, cuda: bool, ms: list[int]) -> list[dict]:
    import kernels

    rows = []
    for name, (n, k) in V3_LINEARS.items():
        if not cuda:
            n, k = min(n, 1024), min(k, 1024)
        w, s = _quantised_weight(n, k, dev)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            a, a_s = kernels.act_quant(x)
            flops = 2 * m * n * k
            row = {"op": "fp8_gemm", "shape": name, "m": m, "n": n, "k": k}
            row["raymoe_s"] = _time(lambda a=a, a_s=a_s, w=w, s=s: kernels.fp8_gemm(a, a_s, w, s), cuda)
            row["torch_dequant_s"] = _time(lambda x=x, w=w, s=s: x @ kernels.weight_dequant(w, s).T, cuda)
            if cuda:
                fn, _ = _scaled_mm_path(a, a_s, w, s)
                row["torch_scaled_mm_s"] = _time(fn, cuda) if fn else None
            row["raymoe_tflops"] = flops / row["raymoe_s"] / 1e12
            row["torch_dequant_tflops"] = flops / row["torch_dequant_s"] / 1e12
            rows.append(row)
    return rows


def bench_grouped(dev: str, cuda: bool) -> list[dict]:
    import kernels

    n_experts, inter, hidden = (256, 2048, 7168) if cuda else (16, 256, 512)
    rows = []
    for tokens in ([128, 4096] if cuda else [64]):
        top_k = 8
        w = torch.randn(n_experts, inter, hidden, device=dev).to(torch.float8_e4m3fn)
        w_s = torch.rand(n_experts, -(-inter // 128), -(-hidden // 128), device=dev) * 1e-3
        counts = torch.bincount(torch.randint(0, n_experts, (tokens * top_k,)), minlength=n_experts)
        offsets = torch.zeros(n_experts + 1, dtype=torch.long, device=dev)
        offsets[1:] = counts.cumsum(0).to(dev)
        a, a_s = kernels.act_quant(torch.randn(tokens * top_k, hidden, device=dev))
        t = _time(lambda: kernels.grouped_fp8_gemm(a, a_s, w, w_s, offsets), cuda)
        flops = 2 * tokens * top_k * inter * hidden
        rows.append({"op": "grouped_fp8_gemm", "tokens": tokens, "experts": n_experts, "n": inter, "k": hidden,
                     "raymoe_s": t, "raymoe_tflops": flops / t / 1e12,
                     "weight_gbs": w.numel() / t / 1e9})
    return rows


def bench_mla(dev: str, cuda: bool) -> list[dict]:
    import kernels

    heads, r, p, block = (128, 512, 64, 64) if cuda else (16, 512, 64, 64)
    cases = [(b, L) for b in (1, 32, 128) for L in (1024, 4096, 32768)] if cuda else [(1, 1024), (8, 1024)]
    rows = []
    for b, length in cases:
        if cuda and b * length * (r + p) * 2 > 40 * 2**30:
            continue
        n_blocks = b * (length // block)
        kv = torch.randn(n_blocks, block, r, device=dev, dtype=torch.bfloat16)
        pe = torch.randn(n_blocks, block, p, device=dev, dtype=torch.bfloat16)
        bt = torch.arange(n_blocks, device=dev, dtype=torch.int32).view(b, -1)
        lens = torch.full((b,), length, device=dev)
        q = torch.randn(b, heads, r, device=dev, dtype=torch.bfloat16)
        qpe = torch.randn(b, heads, p, device=dev, dtype=torch.bfloat16)
        t = _time(lambda: kernels.mla_decode(q, qpe, kv, pe, bt, lens, 0.1), cuda)
        t_ref = _time(lambda: ref.mla_decode(q, qpe, kv, pe, bt, lens, 0.1), cuda) if cuda or b * length <= 8192 \
            else None
        cache_bytes = b * length * (r + p) * 2
        rows.append({"op": "mla_decode", "batch": b, "cache_len": length, "heads": heads, "raymoe_s": t,
                     "raymoe_gbs": cache_bytes / t / 1e9, "torch_s": t_ref,
                     "torch_gbs": cache_bytes / t_ref / 1e9 if t_ref else None})
    return rows


def main(args) -> int:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    ceilings = _ceilings(dev, cuda)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (torch twins, reduced shapes)'}")
    print(f"ceilings: matmul {ceilings['matmul_tflops']:.1f} TFLOP/s, copy {ceilings['copy_gbs']:.1f} GB/s")
    gemms = bench_gemms(dev, cuda, [1, 128, 4096] if cuda else [1, 64])
    print(f"\n{'fp8_gemm':<12} {'m':>5} {'n':>6} {'k':>6} | {'raymoe TF/s':>11} | {'dequant+mm TF/s':>15}")
    for r in gemms:
        print(f"{r['shape']:<12} {r['m']:>5} {r['n']:>6} {r['k']:>6} | {r['raymoe_tflops']:11.2f} | "
              f"{r['torch_dequant_tflops']:15.2f}")
    grouped = bench_grouped(dev, cuda)
    print(f"\n{'grouped':<12} {'tokens':>6} {'experts':>7} | {'TF/s':>8} | {'weight GB/s':>11}")
    for r in grouped:
        print(f"{'expert_up':<12} {r['tokens']:>6} {r['experts']:>7} | {r['raymoe_tflops']:8.2f} | "
              f"{r['weight_gbs']:11.1f}")
    mla = bench_mla(dev, cuda)
    print(f"\n{'mla_decode':<10} {'batch':>5} {'len':>6} | {'raymoe GB/s':>11} | {'% of copy':>9} | {'torch GB/s':>10}")
    for r in mla:
        torch_gbs = f"{r['torch_gbs']:10.1f}" if r["torch_gbs"] else f"{'-':>10}"
        print(f"{'':<10} {r['batch']:>5} {r['cache_len']:>6} | {r['raymoe_gbs']:11.1f} | "
              f"{100 * r['raymoe_gbs'] / ceilings['copy_gbs']:8.1f}% | {torch_gbs}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "kernels", "device": dev, "ceilings": ceilings, "fp8_gemm": gemms,
                               "grouped_fp8_gemm": grouped, "mla_decode": mla}, indent=2))
    print(f"wrote {out}")
    return 0
