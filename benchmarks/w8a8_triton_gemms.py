"""Issue 21: can a Triton GEMM run int8 W8A8 at fp8 speed on Hopper, at SDXL's few-row shapes?

cuBLAS's ``torch._int_mm`` is slower than bf16 at every SDXL Linear shape at 512 px (session 29) and
writes int32 that a second kernel rescales; int8 and fp8 have the same tensor-core peak on Hopper.
This sweeps tile configurations of :mod:`mixprec.kernels.w8a8_linear` (one kernel: 8-bit operands,
int32 / float32 accumulation, scale + bias epilogue in bf16; pointer loads or TMA descriptors) per
shape, against bf16 cuBLAS, tensor-wise fp8 ``_scaled_mm`` with bias (precise accumulation) and
``_int_mm`` followed by its rescale, in the same process. Timing as in ``library_gemms.py``: weights
rotated through ``--copies`` copies (HBM reads), one CUDA graph per rotation, median and p10-p90 of
``--iters`` replays, us per call. The best int8 configuration per shape is then timed with fp8
operands too (the same kernel), and checked against the float64 product of its codes.

    python3 benchmarks/w8a8_triton_gemms.py --out $OUT/w8a8_triton.json      # on the device
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, env_info, time_fn, write_json  # noqa: E402
from mixprec.kernels.w8a8_linear import W8Tiles, w8a8_linear  # noqa: E402

# the Linear shapes the fused scope quantizes (SDXL UNet, 512 px batch 1; count = layers), then x4 rows
SHAPES = [(256, 10240, 1280, 60), (256, 1280, 1280, 372), (256, 1280, 5120, 60),
          (1024, 5120, 640, 10), (1024, 640, 640, 70), (1024, 640, 2560, 10)]
SHAPES_X4 = [(4 * m, n, k, c) for m, n, k, c in SHAPES]
SMEM_LIMIT = 220 * 1024


def candidate_tiles(m: int, k: int, tma: bool) -> list[W8Tiles]:
    out = []
    for bm, bn, bk, stages in itertools.product((64, 128), (64, 128, 256), (128, 256), (3, 4)):
        if bm > 64 and m <= 64:
            continue
        warp_choices = (4, 8) if bm * bn == 128 * 128 else (8,) if bm * bn > 128 * 128 else (4,)
        for warps in warp_choices:
            t = W8Tiles(bm, bn, bk, warps, stages, 8, tma)
            if t.smem_bytes() <= SMEM_LIMIT and k % bk == 0:
                out.append(t)
    return out


def stats_us(fn, copies: int, iters: int) -> dict:
    r = time_fn(fn, iters=iters, warmup=5)
    return {"us": r["median_ms"] * 1000 / copies, "p10_us": r["p10_ms"] * 1000 / copies,
            "p90_us": r["p90_ms"] * 1000 / copies}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole sweep")
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-x4", action="store_true")
    ap.add_argument("--max-configs", type=int, default=60, help="per shape and load method")
    args = ap.parse_args()
    clock = Clock(args.budget)
    dev, bf = "cuda", torch.bfloat16
    result: dict = {"env": env_info(), "settings": vars(args), "shapes": []}
    totals: dict[str, float] = {}
    shapes = [("512_b1", s) for s in SHAPES] + ([] if args.no_x4 else [("x4", s) for s in SHAPES_X4])
    for group, (m, n, k, count) in shapes:
        if clock.left() < 10:
            result.setdefault("skipped", []).append(f"{group}:{m}x{n}x{k}")
            continue
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=bf)
        ws = [torch.randn(n, k, device=dev, dtype=bf) * 0.02 for _ in range(args.copies)]
        bias = torch.randn(n, device=dev, dtype=bf)
        xq = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8)
        wq = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(args.copies)]
        x8 = (torch.randn(m, k, device=dev) * 40).to(torch.float8_e4m3fn)
        w8 = [(torch.randn(n, k, device=dev) * 40).to(torch.float8_e4m3fn) for _ in range(args.copies)]
        rs = torch.full((n,), 1e-4, device=dev)
        cb = torch.randn(n, device=dev)
        one = torch.tensor(1.0, device=dev)
        row: dict = {"group": group, "m": m, "n": n, "k": k, "count": count, "results": {}, "sweep": {}}
        res = row["results"]
        res["bf16"] = stats_us(lambda: [F.linear(x, w, bias) for w in ws], args.copies, args.iters)
        res["scaled_mm_fp8"] = stats_us(lambda: [torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one, bias=bias,
                                                                  out_dtype=bf) for w in w8], args.copies, args.iters)
        res["int_mm_rescaled"] = stats_us(lambda: [(torch._int_mm(xq, w.t()).float() * rs + cb).to(bf) for w in wq],
                                          args.copies, args.iters)
        for tma in (False, True):
            key = "triton_int8_tma" if tma else "triton_int8"
            best = None
            sweep = row["sweep"].setdefault(key, [])
            for t in candidate_tiles(m, k, tma)[: args.max_configs]:
                if clock.left() < 10:
                    break
                try:
                    r = stats_us(lambda: [w8a8_linear(xq, w, rs, cb, bf, t) for w in wq], args.copies, args.iters)
                except Exception as exc:  # a configuration that does not compile or fit: recorded, skipped
                    sweep.append({"tiles": vars(t), "error": repr(exc)[:160]})
                    continue
                sweep.append({"tiles": vars(t), **r})
                if best is None or r["us"] < best[1]["us"]:
                    best = (t, r)
            if best is None:
                continue
            t, r = best
            ref = (xq.double() @ wq[0].double().t()) * rs.double() + cb.double()
            out = w8a8_linear(xq, wq[0], rs, cb, torch.float32, t).double()
            res[key] = {**r, "tiles": vars(t), "rel_err": ((out - ref).norm() / ref.norm()).item()}
            # the same kernel and tiles with fp8 operands: does int8 lower as well as fp8?
            try:
                r8 = stats_us(lambda: [w8a8_linear(x8, w, rs, cb, bf, t) for w in w8], args.copies, args.iters)
                ref8 = (x8.double() @ w8[0].double().t()) * rs.double() + cb.double()
                out8 = w8a8_linear(x8, w8[0], rs, cb, torch.float32, t).double()
                res[key.replace("int8", "fp8")] = {**r8, "tiles": vars(t),
                                                   "rel_err": ((out8 - ref8).norm() / ref8.norm()).item()}
            except Exception as exc:
                res[key.replace("int8", "fp8")] = {"error": repr(exc)[:300]}
        for name, r in res.items():
            if "us" in r:
                totals.setdefault(group, {})
                totals[group][name] = totals[group].get(name, 0.0) + r["us"] * count
        result["shapes"].append(row)
        print(f"[{clock.elapsed():.0f}s] {group} M={m} N={n} K={k} x{count}: "
              + " ".join(f"{a}={b['us']:.2f}" for a, b in res.items() if "us" in b), flush=True)
        result["weighted_total_us"] = totals
        write_json(args.out, result)
        del ws, wq, w8
    result["weighted_total_us"] = totals
    result["elapsed_s"] = clock.elapsed()
    print("weighted totals (us per UNet call, these shapes):",
          {g: {k: round(v, 1) for k, v in d.items()} for g, d in totals.items()}, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
