"""Kernel checks and per-shape GEMM timings on the GPU, for the layer shapes of SDXL's UNet.

1. correctness: every kernel variant against the float64 emulation on fresh random data
   (output poisoned with NaN first, so unwritten elements fail);
2. timings: each backend on each shape, weights rotated through distinct copies so every call
   reads its weights from HBM as in the real network, inside a CUDA graph; the per-call sum
   weighted by how often SDXL (512 px, batch 1) has each shape predicts the GEMM time of a call.

    python benchmarks/gemm_bench.py --out $OUT/gemm.json
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, env_info, time_fn, write_json  # noqa: E402
from mixprec.kernels import triton_gemm as tg  # noqa: E402
from mixprec.kernels.packing import pack  # noqa: E402

# (kind, M, N, K or C_in, ksize, count in SDXL at 512 px batch 1)
SHAPES = [
    ("linear", 256, 10240, 1280, 1, 60),
    ("linear", 256, 1280, 1280, 1, 372),
    ("linear", 256, 1280, 5120, 1, 60),
    ("linear", 1024, 5120, 640, 1, 10),
    ("linear", 1024, 640, 640, 1, 70),
    ("linear", 77, 1280, 2048, 1, 120),
    ("linear", 1024, 640, 2560, 1, 10),
    ("linear", 1, 1280, 1280, 1, 9),
    ("conv", 16, 1280, 1280, 3, 10),
    ("conv", 64, 320, 320, 3, 7),
    ("conv", 32, 640, 640, 3, 6),
    ("conv", 16, 1280, 2560, 3, 2),
]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_kernels() -> list[dict]:
    rows = []
    dev = "cuda"
    torch.manual_seed(1)
    cases = []
    for bits in (8, 4, 2):
        for mma, qa in ((1, False), (1, True), (0, False)):
            cases.append(("linear", bits, mma, qa, (300, 200, 520)))
            cases.append(("conv", bits, mma, qa, (2, 64, 13, 11, 3, 1, 1)))
            cases.append(("conv", bits, mma, qa, (1, 32, 16, 16, 3, 2, 1)))
            cases.append(("conv_cl", bits, mma, qa, (2, 64, 13, 11, 3, 1, 1)))
    for qa in (False, True):
        cases.append(("linear", 8, 2, qa, (300, 200, 512)))
        cases.append(("conv", 8, 2, qa, (2, 64, 13, 11, 3, 1, 1)))
        cases.append(("conv_cl", 8, 2, qa, (2, 64, 13, 11, 3, 1, 1)))
    cases.append(("linear", 4, 0, False, (1, 256, 512)))
    cases.append(("linear", 8, 1, True, (4, 256, 512)))
    for kind, bits, mma, qa, shp in cases:
        try:
            qmax = 2 ** (bits - 1) - 1
            groups = 1
            if kind == "linear":
                m, n, k = shp
                a = torch.randn(m, k, device=dev) + 0.2
                conv = []
            else:
                b, c, h, w, ks, st, pd = shp
                n, k = 96, c * ks * ks
                groups = ks * ks
                a = (torch.randn(b, c, h, w, device=dev) + 0.2)
                if kind == "conv_cl":
                    a = a.contiguous(memory_format=torch.channels_last)
                conv = [ks, ks, st, pd]
            rs = torch.rand(n, device=dev) * 0.01 + 0.001
            cb = torch.randn(n, device=dev)
            if mma == 2:
                wcodes = (torch.randn(n, k, device=dev) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
                wt = wcodes
            else:
                q = torch.randint(-qmax, qmax + 1, (n, k), device=dev, dtype=torch.int8)
                wt = pack(q, bits, groups)
            s, zp = 0.02, 121
            aq = torch.tensor([1 / s, zp, 128.0], device=dev)
            if mma == 1 and not qa:
                a_in = tg.quant_act_int(a, s, zp, 128.0, 255)
            elif mma == 2 and not qa:
                a_in = tg.quant_act_fp8(a, 1 / s)
            elif mma == 2:
                a_in = a.bfloat16()
            else:
                a_in = a.bfloat16()
            ref = tg.emulate(a_in.cpu(), wt.cpu(), rs.cpu(), cb.cpu(), aq.cpu(), k, bits if mma != 2 else 8, mma, qa,
                             255, torch.float32, conv)
            out = tg.launch(a_in, wt, rs, cb, aq, k, bits if mma != 2 else 8, mma, qa, 255, torch.float32, conv)
            torch.cuda.synchronize()
            e = rel(out.cpu(), ref)
            rows.append({"kind": kind, "bits": bits, "mma": mma, "qa": qa, "shape": shp, "rel_err": e})
        except Exception as exc:  # keep going: report every case
            rows.append({"kind": kind, "bits": bits, "mma": mma, "qa": qa, "shape": shp, "error": repr(exc)[:300]})
    # fp8 through torch._scaled_mm
    try:
        m, n, k = 256, 1280, 1280
        a = torch.randn(m, k, device=dev)
        w = torch.randn(n, k, device=dev) * 0.05
        xs, ws = a.abs().max() / 448, w.abs().max() / 448
        aq8 = (a / xs).to(torch.float8_e4m3fn)
        wq8 = (w / ws).to(torch.float8_e4m3fn)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        out = torch._scaled_mm(aq8, wq8.t(), scale_a=xs.float(), scale_b=ws.float(), bias=bias,
                               out_dtype=torch.bfloat16, use_fast_accum=True)
        ref = (aq8.double() * xs) @ (wq8.double() * ws).t() + bias.double()
        rows.append({"kind": "scaled_mm", "rel_err": rel(out, ref)})
        sa = xs.float().reshape(1, 1).expand(m, 1).contiguous()
        out = torch._scaled_mm(aq8, wq8.t(), scale_a=sa, scale_b=ws.float().reshape(1, 1).expand(1, n).contiguous(),
                               bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)
        rows.append({"kind": "scaled_mm_rowwise", "rel_err": rel(out, ref)})
    except Exception as exc:
        rows.append({"kind": "scaled_mm", "error": repr(exc)[:300]})
    return rows


def bench_shape(kind, m, n, k, ks, copies: int, variants: list[str], tiles=None) -> dict:
    dev, dt = "cuda", torch.bfloat16
    res = {}
    if kind == "linear":
        x = torch.randn(m, k, device=dev, dtype=dt)
        kk = k
    else:
        side = m
        x = torch.randn(1, k, side, side, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
        kk = k * ks * ks
    groups = ks * ks
    ws = [torch.randn(n, kk, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    rs = torch.rand(n, device=dev) * 0.01
    cb = torch.randn(n, device=dev)
    aq = torch.tensor([50.0, 121.0, 128.0], device=dev)
    conv = [ks, ks, 1, ks // 2] if kind == "conv" else []
    xq = tg.quant_act_int(x, 0.02, 121, 128, 255)
    x8 = tg.quant_act_fp8(x, 50.0)

    def run(name, fn):
        try:
            res[name] = time_fn(fn, iters=20, warmup=5)["median_ms"] / copies * 1000  # us per call
        except Exception as exc:
            res[name] = None
            res[name + "_error"] = repr(exc)[:200]

    if "bf16" in variants:
        if kind == "linear":
            run("bf16", lambda: [F.linear(x, w) for w in ws])
        else:
            w4d = [w.view(n, ks, ks, k).permute(0, 3, 1, 2).contiguous() for w in ws]
            xnchw = x.contiguous()
            run("bf16_nchw", lambda: [F.conv2d(xnchw, w, padding=ks // 2) for w in w4d])
            w4cl = [w.contiguous(memory_format=torch.channels_last) for w in w4d]
            run("bf16", lambda: [F.conv2d(x, w, padding=ks // 2) for w in w4cl])
            del w4d, w4cl
    codes8 = [pack(torch.randint(-127, 128, (n, kk), device=dev, dtype=torch.int8), 8) for _ in range(copies)]
    if "int8" in variants:
        run("int8", lambda: [tg.launch(xq, w, rs, cb, aq, kk, 8, 1, False, 255, dt, conv, tiles) for w in codes8])
    if "int8_qa" in variants:
        run("int8_qa", lambda: [tg.launch(x, w, rs, cb, aq, kk, 8, 1, True, 255, dt, conv, tiles) for w in codes8])
    if "int_mm" in variants and kind == "linear" and m > 16:
        run("int_mm", lambda: [torch._int_mm(xq, w.t()) for w in codes8])
    if "w8a16" in variants:
        run("w8a16", lambda: [tg.launch(x, w, rs, cb, None, kk, 8, 0, False, 0, dt, conv, tiles) for w in codes8])
    del codes8
    if "fp8" in variants:
        f8 = [(torch.randn(n, kk, device=dev) * 30).to(torch.float8_e4m3fn) for _ in range(copies)]
        sa, sb = torch.tensor(0.02, device=dev), torch.tensor(0.001, device=dev)
        bias = torch.randn(n, device=dev, dtype=dt)
        if kind == "linear" and m >= 16:
            run("fp8_scaled_mm", lambda: [torch._scaled_mm(x8, w.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=dt,
                                                           use_fast_accum=True) for w in f8])
        run("fp8_triton", lambda: [tg.launch(x8, w, rs, cb, aq, kk, 8, 2, False, 0, dt, conv, tiles) for w in f8])
        del f8
    if "w4a16" in variants or "w4a8" in variants:
        c4 = [pack(torch.randint(-7, 8, (n, kk), device=dev, dtype=torch.int8), 4, groups) for _ in range(copies)]
        if "w4a16" in variants:
            run("w4a16", lambda: [tg.launch(x, w, rs, cb, None, kk, 4, 0, False, 0, dt, conv, tiles) for w in c4])
        if "w4a8" in variants:
            run("w4a8", lambda: [tg.launch(xq, w, rs, cb, aq, kk, 4, 1, False, 255, dt, conv, tiles) for w in c4])
        del c4
    if "w2a16" in variants:
        c2 = [pack(torch.randint(-1, 2, (n, kk), device=dev, dtype=torch.int8), 2, groups) for _ in range(copies)]
        run("w2a16", lambda: [tg.launch(x, w, rs, cb, None, kk, 2, 0, False, 0, dt, conv, tiles) for w in c2])
        del c2
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the timing part")
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--variants", default="bf16,int8,int8_qa,int_mm,w8a16,fp8,w4a16,w4a8,w2a16")
    ap.add_argument("--tile-sweep", action="store_true")
    args = ap.parse_args()
    clock = Clock(args.budget)
    result = {"env": env_info(), "checks": [], "shapes": []}
    print(result["env"], flush=True)
    result["checks"] = check_kernels()
    for r in result["checks"]:
        print("check", r, flush=True)
    write_json(args.out, result)
    variants = args.variants.split(",")
    totals: dict[str, float] = {}
    for kind, m, n, k, ks, count in SHAPES:
        if clock.left() < 0:
            print("timing budget spent; skipping", kind, m, n, k, flush=True)
            continue
        try:
            r = bench_shape(kind, m, n, k, ks, args.copies, variants)
        except Exception:
            traceback.print_exc()
            continue
        row = {"kind": kind, "m": m, "n": n, "k": k, "ksize": ks, "count": count, "us": r,
               "tiles": str(tg.pick_tiles(m if kind == "linear" else m * m, n, k, 1, 8))}
        result["shapes"].append(row)
        for name, us in r.items():
            if isinstance(us, float):
                totals[name] = totals.get(name, 0.0) + us * count
        print(f"{kind:6s} M={m:5d} N={n:5d} K={k:5d} k{ks} x{count:3d} " +
              " ".join(f"{a}={b:.1f}" for a, b in r.items() if isinstance(b, float)), flush=True)
        write_json(args.out, result)
    result["weighted_total_us"] = totals
    if args.tile_sweep and clock.left() > -60:
        sweep = []
        for kind, m, n, k, ks in (("linear", 256, 1280, 1280, 1), ("linear", 256, 10240, 1280, 1),
                                  ("linear", 256, 1280, 5120, 1)):
            for t in (tg.TileConfig(64, 64, 128, 8, 4, 4), tg.TileConfig(64, 128, 128, 8, 4, 4),
                      tg.TileConfig(128, 64, 128, 8, 4, 4), tg.TileConfig(128, 128, 128, 8, 8, 3),
                      tg.TileConfig(64, 64, 64, 8, 4, 5), tg.TileConfig(32, 64, 128, 8, 4, 4)):
                r = bench_shape(kind, m, n, k, ks, args.copies, ["int8", "w4a16"], tiles=t)
                sweep.append({"shape": [m, n, k], "tiles": str(t), "us": r})
                print("sweep", m, n, k, t, r, flush=True)
        result["tile_sweep"] = sweep
    write_json(args.out, result)
    print("weighted totals (us per UNet call, shapes listed only):")
    for name, us in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"  {name:14s} {us:9.1f}")


if __name__ == "__main__":
    main()
