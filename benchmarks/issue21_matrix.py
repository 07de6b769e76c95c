"""Issue 21's must-show matrix in ONE device call (<= 9 minutes), one process, under a wall-clock budget.

Full-size SDXL UNet (``mixprec/reference/sdxl_unet_config.json``: the UNet of ``model=sdxl_turbo``,
random weights, bf16, channels-last), calibrated once on two random-input passes. The 16-bit
baseline is timed in the same process as every plan. Parts, in this order (each result is written to
the JSON as soon as it exists, so a call cut short still returns everything before the cut):

1. ``eager`` at the first ``--eager-shapes`` item, plans in priority order (bf16; W8A8 fp8 on the
   Linear layers with per-token activation and per-channel weight scales, tensor-wise GEMM + fused
   epilogue; W8A8 int8; W4A16; W4A8; then the static per-tensor fp8 plan it replaces, the row-wise
   ``_scaled_mm`` kernel, fp8 on all layers): converted, output SQNR vs bf16 (real kernels and
   fake-quant reference), eager + CUDA-graph replay latency (median, p10-p90). No compile: seconds
   per plan.
2. ``compiled``: ``torch.compile`` (inductor default mode, ``dynamic=False``, a CUDA graph captured
   around the compiled call) for the baseline and ``--headline`` plans only, shape by shape in
   ``--compiled-shapes`` order. One SDXL UNet compile took 113 s (bf16) / 190 s (fp8 Linear) on an
   H100, so compiling all plans x shapes (~15 compiles) cannot fit one call: the eager part gives the
   whole matrix and the accuracy, the compiled part the headline speed-ups. A (baseline, plan) pair
   at a shape starts only when both compiles are predicted to finish inside the budget (prediction:
   the compile times measured so far in this process; ``--compile-est`` before the first one); the
   first eager part leaves the first compiled pair's predicted time (``--reserve`` overrides it).
3. ``eager`` again with the time left: the first shape (and accuracy) of any plan the reserve left
   out, then the other ``--eager-shapes``.

    python3 benchmarks/issue21_matrix.py --budget 455 --out $OUT/issue21_matrix.json  # device (docs/kernels.md)
    python3 benchmarks/issue21_matrix.py --model tiny --budget 300 --compile-backend eager \\
        --eager-shapes 64x1,64x2 --compiled-shapes 64x1 --compile-est 15 --out /tmp/m.json   # CPU dry run
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, capture, env_info, run_parts, summarize, time_graph, write_json  # noqa: E402
from mixprec.kernels import BackendConfig, convert_, reference_path, weight_bytes  # noqa: E402
from mixprec.kernels.named_plans import parse_plan_name  # noqa: E402
from mixprec.kernels.probing import calibrate_random, denoiser_inputs, sqnr_db  # noqa: E402
from mixprec.models.toy import build_unet  # noqa: E402
from mixprec.quantizers import quant_layers, set_plan  # noqa: E402

BASELINE = "bf16"
PLANS = {  # name -> (named plan, backend options), in priority order; the baseline is the unquantized model
    BASELINE: ("uniform:w16a16", {}),
    "fp8_token_linear": ("linear:w8a8", {"w8a8": "fp8", "fp8_act": "token", "fp8_weight": "channel"}),
    "int8_all": ("uniform:w8a8", {"w8a8": "int8"}),
    "w4a16_all": ("uniform:w4a16", {}),
    "w4a8_all": ("uniform:w4a8", {}),
    "fp8_static_linear": ("linear:w8a8", {"w8a8": "fp8", "fp8_act": "tensor", "fp8_weight": "channel"}),
    "fp8_token_rowwise_linear": ("linear:w8a8", {"w8a8": "fp8", "fp8_act": "token", "fp8_weight": "rowwise"}),
    "fp8_token_all": ("uniform:w8a8", {"w8a8": "fp8", "fp8_act": "token", "fp8_weight": "channel"}),
}
MIB = 2 ** 20


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        res, _, batch = item.partition("x")
        out.append((int(res), int(batch or 1)))
    return out


def inputs_for(unet, res: int, batch: int) -> dict:
    x = denoiser_inputs(unet, batch, res // 8, seed=11)
    x["sample"] = x["sample"].contiguous(memory_format=torch.channels_last)
    return x


def build(model: str, calib_res: int):
    cuda = torch.cuda.is_available()
    unet = build_unet(model, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    calib = [denoiser_inputs(unet, 1, calib_res // 8, seed=100 + i) for i in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(4, 8), act_bits=(8,))
    return unet.to(memory_format=torch.channels_last), layers


def convert_plan(unet, layers, name: str):
    """A converted copy of ``unet`` for plan ``name`` and its dispatch summary."""
    return convert_named(unet, layers, *PLANS[name])


def convert_named(unet, layers, spec: str, opts: dict):
    """A converted copy of ``unet`` for the named plan ``spec`` with backend options ``opts``, and its
    dispatch summary (``layers``: the calibrated QuantLayers of ``unet``)."""
    for layer in layers.values():
        layer.drop_cache()
    model = copy.deepcopy(unet)
    set_plan(quant_layers(model), *parse_plan_name(spec).bits(layers))
    # without CUDA (dry runs) the kernel arithmetic runs emulated in torch, not the fake-quant path
    report = convert_(model, BackendConfig.from_mapping({**opts, "cpu": "emulate"}))
    return model.to(memory_format=torch.channels_last).requires_grad_(False), report.summary()


def time_call(fn, iters: int, warmup: int) -> dict:
    """CUDA-graph replays timed with CUDA events; host clock on a CPU (dry runs: says nothing of speed)."""
    t = time.perf_counter()
    if torch.cuda.is_available():
        g = capture(fn)
        warm = time.perf_counter() - t
        out = time_graph(g, iters, warmup)
        del g
    else:
        fn()
        warm = time.perf_counter() - t
        times = []
        for _ in range(max(2, min(iters, 3))):
            t1 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t1) * 1000)
        out = summarize(times)
    out["warmup_s"] = warm
    return out


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def accuracy(model, x: dict, fp: torch.Tensor) -> dict:
    """SQNR of the plan's output vs 16 bit: real kernels, its fake-quant reference, and real vs reference."""
    real = model(**x).sample.float()
    with reference_path(model):
        ref = model(**x).sample.float()
    return {"real_vs_16bit_db": sqnr_db(fp, real), "reference_vs_16bit_db": sqnr_db(fp, ref),
            "real_vs_reference_db": sqnr_db(ref, real)}


def eager_part(unet, layers, shapes, out: dict, clock: Clock, args, accuracy_input: dict, reserve: float) -> None:
    """Eager + CUDA-graph latency of every plan at ``shapes`` and its SQNR on ``accuracy_input``,
    skipping what an earlier call already measured, while more than ``reserve`` seconds are left.
    A plan that fails is recorded with its error and not tried again; the others go on."""
    rec = out.setdefault("eager", {})
    set_plan(layers)  # no bits: the calibrated QuantLayers pass through (the 16-bit function)
    with torch.no_grad():
        fp = unet(**accuracy_input).sample.float()
    for name in PLANS:
        r = rec.setdefault(name, {"timing": {}})
        todo = [(res, b) for res, b in shapes if f"{res}x{b}" not in r["timing"]]
        needs_accuracy = name != BASELINE and "real_vs_16bit_db" not in r
        if "error" in r or (not todo and not needs_accuracy):
            continue
        if clock.left() - reserve < args.eager_est:
            r["skipped"] = f"{','.join(f'{a}x{b}' for a, b in todo)}: time budget ({clock.left():.0f}s left)"
            continue
        r.pop("skipped", None)
        t = time.time()
        try:
            _eager_plan(unet, layers, name, r, todo, accuracy_input if needs_accuracy else None, fp, args)
        except Exception as exc:
            traceback.print_exc()
            r["error"] = repr(exc)[:600]
        r["seconds"] = r.get("seconds", 0) + time.time() - t
        _speedups(rec, name)
        print("eager", name, {k: round(v, 2) for k, v in r.items() if isinstance(v, float)},
              {k: round(v["median_ms"], 3) for k, v in r["timing"].items()}, flush=True)
        write_json(args.out, out)
        _free()


def _eager_plan(unet, layers, name: str, r: dict, shapes, accuracy_input: dict | None, fp, args) -> None:
    model, summary = convert_plan(unet, layers, name)
    r.update(plan=PLANS[name][0], options=PLANS[name][1], dispatch=summary, weight_mib=weight_bytes(model) / MIB)
    if accuracy_input is not None:
        r.update(accuracy(model, accuracy_input, fp))
    for res, b in shapes:
        x = inputs_for(unet, res, b)
        r["timing"][f"{res}x{b}"] = time_call(_no_grad(lambda: model(**x, return_dict=False)[0]), args.iters,
                                              args.warmup)


def _speedups(rec: dict, name: str) -> None:
    base = rec.get(BASELINE, {}).get("timing", {})
    r = rec[name]
    r["speedup_vs_bf16"] = {k: base[k]["median_ms"] / v["median_ms"] for k, v in r["timing"].items()
                            if k in base and "median_ms" in v}


def _predicted_compile_s(plan: str, seen: dict, args) -> float:
    if plan in seen:  # a new shape recompiles the whole graph (dynamic=False)
        return seen[plan]
    if BASELINE in seen:
        return seen[BASELINE] * args.plan_compile_factor
    return args.compile_est * (1 if plan == BASELINE else args.plan_compile_factor)


def compiled_need_s(plans: list[str], seen: dict, args) -> float:
    """Seconds predicted for compiling and timing ``plans`` at one more shape."""
    return sum(_predicted_compile_s(p, seen, args) for p in plans) * 1.05 + 10 * len(plans)


def compiled_plans(args) -> list[str]:
    return [BASELINE] + [p for p in args.headline.split(",") if p]


def compiled_part(unet, layers, shapes, out: dict, clock: Clock, args) -> None:
    """Compiled (inductor) + CUDA-graph latency of the baseline and the headline plans, shape by shape."""
    rec = out.setdefault("compiled", {})
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    plans = compiled_plans(args)
    compiled, seen, failed = {}, {}, set()
    for res, b in shapes:
        key = f"{res}x{b}"
        need = compiled_need_s(plans, seen, args)
        if clock.left() < need:
            rec[key] = {"skipped": f"time budget: {clock.left():.0f}s left, ~{need:.0f}s predicted"}
            write_json(args.out, out)
            continue
        x = inputs_for(unet, res, b)
        row = rec[key] = {}
        base_out = None
        for p in plans:
            if p in failed:
                row[p] = {"error": "failed at an earlier shape"}
                continue
            if p not in seen and clock.left() < _predicted_compile_s(p, seen, args) * 1.05 + 10:
                row[p] = {"skipped": f"time budget: {clock.left():.0f}s left, "
                                     f"~{_predicted_compile_s(p, seen, args):.0f}s predicted"}
                continue
            try:
                row[p] = _compiled_plan(unet, layers, p, x, compiled, seen, out, args)
            except Exception as exc:  # the other plans and shapes go on
                traceback.print_exc()
                row[p] = {"error": repr(exc)[:600]}
                failed.add(p)
                continue
            if p == BASELINE:
                base_out = row[p].pop("_out")
            else:
                y = row[p].pop("_out")
                if base_out is not None:
                    row[p]["sqnr_vs_compiled_bf16_db"] = sqnr_db(base_out, y)
            tm = row[p]
            print("compiled", key, p, f"median {tm['median_ms']:.3f} ms (p10 {tm['p10_ms']:.3f}, p90 {tm['p90_ms']:.3f})"
                  f" compile {tm['compile_s']:.0f}s", flush=True)
            write_json(args.out, out)
        for p in plans[1:]:
            if "median_ms" in row.get(p, {}) and "median_ms" in row.get(BASELINE, {}):
                row[p]["speedup_vs_bf16"] = row[BASELINE]["median_ms"] / row[p]["median_ms"]
        write_json(args.out, out)
    del compiled
    torch._dynamo.reset()
    _free()


def _compiled_plan(unet, layers, p: str, x: dict, compiled: dict, seen: dict, out: dict, args) -> dict:
    """Compile plan ``p`` (once; a new shape recompiles) and time it; ``_out``: its output (float)."""
    if p not in compiled:
        model, summary = convert_plan(unet, layers, p)
        compiled[p] = (torch.compile(model, backend=args.compile_backend, dynamic=False), model)
        out.setdefault("compiled_dispatch", {})[p] = summary
    fn = compiled[p][0]
    call = _no_grad(lambda: fn(**x, return_dict=False)[0])
    t = time.perf_counter()
    y = call().float()
    tm = {"compile_s": time.perf_counter() - t}
    seen.setdefault(p, tm["compile_s"])
    tm.update(time_call(call, args.iters, args.warmup))
    tm["_out"] = y
    return tm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole script (after imports)")
    ap.add_argument("--model", default="sdxl", help="sdxl (full size) | tiny (CPU dry run)")
    ap.add_argument("--eager-shapes", default="512x1,1024x1,512x4", help="RESxBATCH list; the first also "
                    "gives the accuracy (SQNR) and is timed before the compiled part, the others after it")
    ap.add_argument("--compiled-shapes", default="512x1,1024x1,512x4")
    ap.add_argument("--headline", default="fp8_token_linear", help="plans compiled beside the baseline")
    ap.add_argument("--compile-backend", default="inductor", help="inductor | eager (CPU dry run: Dynamo only)")
    ap.add_argument("--compile-est", type=float, default=115, help="predicted first bf16 compile (s); H100: 113")
    ap.add_argument("--plan-compile-factor", type=float, default=1.65, help="plan compile / bf16 compile "
                    "(H100: 190 / 113 s for fp8 Linear)")
    ap.add_argument("--reserve", type=float, default=None, help="seconds the first eager part leaves for the "
                    "compiled part (default: the first compiled pair's prediction)")
    ap.add_argument("--eager-est", type=float, default=15, help="seconds one plan's eager step needs")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--plans", default=",".join(PLANS), help="subset of the plans (the baseline is always run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for name in [p for p in PLANS if p not in args.plans.split(",") and p != BASELINE]:
        del PLANS[name]
    clock = Clock(args.budget)
    import torch._inductor.config as inductor_config
    out = {"env": {**env_info(), "inductor_compile_threads": inductor_config.compile_threads},
           "args": vars(args), "plans": {k: list(v) for k, v in PLANS.items()}}
    print(out["env"], flush=True)
    eager_shapes, compiled_shapes = parse_shapes(args.eager_shapes), parse_shapes(args.compiled_shapes)
    parts = []

    def build_part():
        unet, layers = build(args.model, eager_shapes[0][0])
        out["build_s"] = clock.elapsed()
        x_acc = inputs_for(unet, *eager_shapes[0])
        reserve = args.reserve if args.reserve is not None else compiled_need_s(compiled_plans(args), {}, args)
        out["reserve_s"] = reserve
        parts.extend([
            ("eager_first", lambda: eager_part(unet, layers, eager_shapes[:1], out, clock, args, x_acc, reserve)),
            ("compiled", lambda: compiled_part(unet, layers, compiled_shapes, out, clock, args)),
            # then what the reserve left out: the first shape (accuracy) of every plan, then the others
            ("eager_first_rest", lambda: eager_part(unet, layers, eager_shapes[:1], out, clock, args, x_acc, 0)),
            ("eager_rest", lambda: eager_part(unet, layers, eager_shapes, out, clock, args, x_acc, 0))])

    parts.append(("build", build_part))  # it appends the measuring parts: run_parts runs them next
    run_parts(parts, out, clock, args.out)


if __name__ == "__main__":
    main()
