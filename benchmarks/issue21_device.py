"""Issue 21 on one GPU, one process, under a wall-clock budget: fp8 accuracy and speed after the
row-wise / precise-accumulation change, the latency table with three latency budgets, and (when
the budget leaves room for two compiles) compiled bf16 vs fp8 timings. Sections, in order:

1. ``gemm``: per-GEMM us at SDXL 512 px batch-1 shapes (weights rotated through copies so they
   stream from HBM; CUDA graph): bf16 cuBLAS, ``_scaled_mm`` fp8 tensor-wise / row-wise, fast or
   precise accumulation; Triton fp8 implicit-GEMM conv, precise (MMA_FP8) vs fast (MMA_FP8_FAST).
2. ``plans``: full-size SDXL UNet (random weights, bf16, calibrated on random inputs): per plan the
   SQNR vs 16-bit of the real kernels and of the fake-quant reference (reference_path), and the
   eager + CUDA-graph latency (median, p10-p90) beside bf16.
3. ``latency``: the per-layer latency table at 512 px batch 1, three budgets solved with synthetic
   (shaped, random) sensitivities over SDXL's real layer names, each plan measured as the table
   predicts it (eager + CUDA graph) and its SQNR vs 16-bit.
4. ``compiled``: bf16 and the fp8 Linear plan under torch.compile (inductor default), CUDA-graph
   replay, when at least ``--compile-need`` seconds are left.

    python benchmarks/issue21_device.py --budget 240 --out $OUT/issue21.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, capture, env_info, time_fn, time_graph, write_json  # noqa: E402
from mixprec.kernels import BackendConfig, convert_, reference_path  # noqa: E402
from mixprec.kernels import triton_gemm as tg  # noqa: E402
from mixprec.kernels.latency_table import measure_latency_table, model_latency_ms  # noqa: E402
from mixprec.kernels.named_plans import parse_plan_name  # noqa: E402
from mixprec.kernels.probing import calibrate_random, denoiser_inputs, sqnr_db  # noqa: E402
from mixprec.models.toy import build_unet  # noqa: E402
from mixprec.quantizers import quant_layers, set_plan  # noqa: E402

GEMMS = [(256, 10240, 1280), (256, 1280, 1280), (256, 1280, 5120), (1024, 5120, 640), (1024, 640, 640),
         (77, 1280, 2048), (4096, 320, 320)]
CONVS = [(1280, 16), (320, 64)]  # 3x3, channels, side
PLANS = {  # name -> (named plan, backend options)
    "fp8_channel_linear": ("linear:w8a8", {"w8a8": "fp8"}),
    "fp8_tensor_linear": ("linear:w8a8", {"w8a8": "fp8", "fp8_weight": "tensor", "fp8_fast_accum": True}),
    "fp8_channel_all": ("uniform:w8a8", {"w8a8": "fp8"}),
    "fp8_channel_all_fastacc": ("uniform:w8a8", {"w8a8": "fp8", "fp8_fast_accum": True}),
    "fp8_tensor_all_fastacc": ("uniform:w8a8", {"w8a8": "fp8", "fp8_weight": "tensor", "fp8_fast_accum": True}),
    "int8_all": ("uniform:w8a8", {"w8a8": "int8"}),
}


def gemm_section(out: dict) -> None:
    dev, res = "cuda", {}
    for m, n, k in GEMMS:
        copies = 12
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        w8 = [w.float().div(w.float().abs().amax() / 448).to(torch.float8_e4m3fn) for w in ws]
        x8 = (x.float() * 10).clamp(-448, 448).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        row_a, row_b = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
        row = {"bf16": lambda: [F.linear(x, w) for w in ws]}
        for fast in (True, False):
            tag = "fast" if fast else "precise"
            row[f"fp8_tensor_{tag}"] = (lambda f=fast: [torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one,
                                                                          out_dtype=torch.bfloat16, use_fast_accum=f)
                                                         for w in w8])
            row[f"fp8_row_{tag}"] = (lambda f=fast: [torch._scaled_mm(x8, w.t(), scale_a=row_a, scale_b=row_b,
                                                                       out_dtype=torch.bfloat16, use_fast_accum=f)
                                                      for w in w8])
        wsc, bias = torch.rand(n, device=dev) + 0.5, torch.randn(n, device=dev)
        # fp8_weight=channel: tensor-wise GEMM, then channel scales + bias (two kernels eager; compile
        # fuses the pointwise op downstream)
        row["fp8_channel_epilogue"] = lambda: [
            (torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16).float() * wsc + bias)
            .to(torch.bfloat16) for w in w8]
        res[f"{m}x{n}x{k}"] = {name: _us(fn, copies) for name, fn in row.items()}
        print("gemm", m, n, k, {a: round(b, 2) for a, b in res[f"{m}x{n}x{k}"].items()}, flush=True)
    for c, side in CONVS:
        res[f"conv3x3_{c}_{side}"] = _conv_row(c, side)
        print("conv", c, side, {a: round(b, 2) for a, b in res[f"conv3x3_{c}_{side}"].items()}, flush=True)
    out["gemm_us"] = res


def _us(fn, per_call: int) -> float:
    return time_fn(fn, 30, 5)["median_ms"] * 1000 / per_call


def _conv_row(c: int, side: int) -> dict:
    dev, copies = "cuda", 6
    x = torch.randn(1, c, side, side, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(c, c, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02).contiguous(
        memory_format=torch.channels_last) for _ in range(copies)]
    codes = [w.permute(0, 2, 3, 1).reshape(c, -1).float().mul(448 / w.float().abs().amax()).to(torch.float8_e4m3fn)
             for w in ws]
    x8 = (x.float() * 10).clamp(-448, 448).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    rs, cb = torch.full((c,), 1e-3, device=dev), torch.zeros(c, device=dev)
    aq = torch.tensor([10.0, 0.0, 0.0], device=dev)
    row = {"bf16_cudnn": _us(lambda: [F.conv2d(x, w, padding=1) for w in ws], copies)}
    for name, mma in (("fp8_triton_precise", tg.MMA_FP8), ("fp8_triton_fast", tg.MMA_FP8_FAST)):
        row[name] = _us(lambda mma=mma: [tg.qgemm(x8, w, rs, cb, aq, c * 9, 8, mma, False, 0, torch.bfloat16,
                                                  [3, 3, 1, 1]) for w in codes], copies)
    return row


def _time(fn, iters: int = 50, warmup: int = 10) -> dict:
    """CUDA-graph replay timing on a GPU; host clock on a CPU (the --model tiny smoke run)."""
    if torch.cuda.is_available():
        return time_fn(fn, iters, warmup)
    from mixprec.kernels.timing import summarize

    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return summarize(times)


def build(args):
    cuda = torch.cuda.is_available()
    unet = build_unet(args.model, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    calib = [denoiser_inputs(unet, 1, args.res // 8, seed=100 + i) for i in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(4, 8), act_bits=(8,))
    unet = unet.to(memory_format=torch.channels_last)
    x = denoiser_inputs(unet, 1, args.res // 8, seed=7)
    x["sample"] = x["sample"].contiguous(memory_format=torch.channels_last)
    return unet, layers, x


def convert_plan(unet, wb: dict, ab: dict, opts: dict):
    model = copy.deepcopy(unet)
    set_plan(quant_layers(model), wb, ab)
    report = convert_(model, BackendConfig.from_mapping(opts))
    return model.to(memory_format=torch.channels_last), report


@torch.no_grad()
def plans_section(unet, layers, x, out: dict, clock: Clock) -> None:
    set_plan(layers)
    fp = unet(**x).sample.float()
    base, _ = convert_plan(unet, {}, {}, {})  # the original layers put back
    rec = {"bf16": {"eager_graph": _time(lambda: base(**x))}}
    del base
    out["plans"] = rec
    for name, (spec, opts) in PLANS.items():
        if clock.left() < 60:
            rec[name] = {"skipped": "time budget"}
            continue
        wb, ab = parse_plan_name(spec).bits(layers)
        model, report = convert_plan(unet, wb, ab, opts)
        r = {"plan": spec, "options": opts, "backends": report.summary()["backends"]}
        real = model(**x).sample.float()
        with reference_path(model):
            ref = model(**x).sample.float()
        r.update(real_vs_16bit_db=sqnr_db(fp, real), reference_vs_16bit_db=sqnr_db(fp, ref),
                 real_vs_reference_db=sqnr_db(ref, real), eager_graph=_time(lambda: model(**x)))
        r["speedup_vs_bf16"] = rec["bf16"]["eager_graph"]["median_ms"] / r["eager_graph"]["median_ms"]
        rec[name] = r
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "eager_graph"},
              "eager+graph ms", round(r["eager_graph"]["median_ms"], 3), flush=True)
        del model, real, ref
        gc.collect()
        torch.cuda.empty_cache()


def latency_section(unet, layers, x, out: dict, clock: Clock, compile_backend: str | None = None) -> None:
    from mixprec.search.latency import solve_latency
    from mixprec.search.synthetic import CensusRow, _group, synthetic_per_prompt
    from mixprec.search import bootstrap_metric

    set_plan(layers)
    backend = BackendConfig(w8a8="fp8")
    table = measure_latency_table(unet, layers, x, ["w8a8", "w4a16", "w4a8"], backend, iters=20, warmup=3,
                                  compile_backend=compile_backend)
    rec = {"table": table.to_json(), "checks": []}
    out["latency"] = rec
    print(f"latency table: model {table.model_ms:.3f} ms, rest {table.rest_ms:.3f} ms, "
          f"measured in {table.meta['measure_s']:.0f}s", flush=True)
    # synthetic sensitivities (shaped like real ones, random) over this model's real layer names
    census = [CensusRow(n, type(l.inner).__name__, _group(n), l.inner.weight.numel(), l.inner.weight.numel(),
                        l.inner.weight.shape[0]) for n, l in layers.items()]
    bits = {"content": [4, 8], "quality": [4, 8]}
    metric = {k: {g: bootstrap_metric(t, 0) for g, t in synthetic_per_prompt(census, k, bits, 4, seed=1).items()}
              for k in ("weight", "act")}
    groups = {r.name: r.group for r in census}
    lo = table.rest_ms + sum(min(r.values()) for r in table.ms.values())
    slowest = table.rest_ms + sum(max(r.values()) for r in table.ms.values())
    # budgets between the fastest plan and the 16-bit time (the slowest plan if 16-bit is fastest)
    hi = table.model_ms if table.model_ms > lo + 0.02 else slowest
    set_plan(layers)
    with torch.no_grad():
        fp = unet(**x).sample.float()
    for f in (0.2, 0.5, 0.85):
        if clock.left() < 25:
            break
        budget = lo + f * (hi - lo) + 1e-3  # + the table's rounding up to ns
        sol = solve_latency(metric["weight"], metric["act"], groups, table.ms, table.rest_ms, budget,
                            weight_bits=bits, act_bits=bits, time_limit_s=5)
        model, _ = convert_plan(unet, sol.weight_bits, sol.act_bits, backend.to_dict())
        measured = model_latency_ms(model, x, 50, 10, compile_backend)
        torch._dynamo.reset()
        with torch.no_grad():
            q = sqnr_db(fp, model(**x).sample.float())
        chk = {"budget_ms": budget, "predicted_ms": sol.predicted_ms, "measured_ms": measured,
               "error_pct": 100 * (measured - sol.predicted_ms) / sol.predicted_ms, "within_budget": measured <= budget,
               "sqnr_vs_16bit_db": q, "choices": {}}
        for l in sol.weight_bits:
            key = f"w{sol.weight_bits[l]}a{sol.act_bits[l]}"
            chk["choices"][key] = chk["choices"].get(key, 0) + 1
        rec["checks"].append(chk)
        print("budget", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in chk.items()}, flush=True)
        del model
        torch.cuda.empty_cache()


def compiled_section(unet, layers, x, out: dict, clock: Clock, need: float) -> None:
    rec = {}
    out["compiled"] = rec
    torch._dynamo.config.cache_size_limit = 64
    variants = (("bf16", "uniform:w16a16", {}), ("fp8_channel_linear", "linear:w8a8", {"w8a8": "fp8"}))
    if not torch.cuda.is_available() or clock.left() < need * len(variants):  # both, or neither
        rec["skipped"] = f"time budget ({clock.left():.0f}s left) or no CUDA"
        return
    for name, spec, opts in variants:
        model, _ = convert_plan(unet, *parse_plan_name(spec).bits(layers), opts)
        fn = torch.compile(model, dynamic=False)
        t = time.time()
        g = capture(lambda: fn(**x, return_dict=False)[0])
        tm = time_graph(g, 100, 10)
        tm["compile_s"] = time.time() - t
        rec[name] = tm
        print("compiled", name, f"median {tm['median_ms']:.3f} ms p10 {tm['p10_ms']:.3f} p90 {tm['p90_ms']:.3f} "
              f"(compile {tm['compile_s']:.0f}s)", flush=True)
        del g, fn
        torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--compile-need", type=float, default=120)
    ap.add_argument("--sections", default="gemm,plans,compiled,latency")
    ap.add_argument("--model", default="sdxl", help="sdxl | tiny (a CPU smoke run of the sections)")
    ap.add_argument("--latency-compile", default=None, help="compile backend for the latency table and its checks "
                    "(inductor: predicts compiled timings; default: eager)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    clock = Clock(args.budget)
    out = {"env": env_info(), "args": vars(args)}
    print(out["env"], flush=True)
    sections = args.sections.split(",")
    try:
        if "gemm" in sections and torch.cuda.is_available():
            gemm_section(out)
        write_json(args.out, out)
        unet, layers, x = build(args)
        out["build_s"] = clock.elapsed()
        for sec in sections:
            try:
                if sec == "plans":
                    plans_section(unet, layers, x, out, clock)
                elif sec == "compiled":
                    compiled_section(unet, layers, x, out, clock, args.compile_need)
                elif sec == "latency" and clock.left() > 40:
                    latency_section(unet, layers, x, out, clock, args.latency_compile)
            except Exception as exc:
                traceback.print_exc()
                out[f"{sec}_error"] = repr(exc)[:400]
            write_json(args.out, out)
    finally:
        out["elapsed_s"] = clock.elapsed()
        write_json(args.out, out)


if __name__ == "__main__":
    main()
