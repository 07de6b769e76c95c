"""Issue 21, compiled speed at 512 px batch 1 in ONE short device call (<= ~280 s): bf16 vs W8A8 plans.

Full-size SDXL UNet (``mixprec/reference/sdxl_unet_config.json``, random weights, bf16, channels-last),
calibrated once on two random-input passes (``issue21_matrix.build``). Every variant is compiled the
same way in this one process and timed as median and p10-p90 of ``--iters`` CUDA-graph replays (a
graph captured around the compiled call):

- ``--compile regional`` (default): ``mixprec.kernels.regional.compile_regions``, inductor on each
  Transformer2DModel and ResnetBlock2D (2 + 12 distinct shapes at 512 px), the glue eager inside
  the graph. A whole-UNet compile took 105 s (bf16) + 238 s (fp8) on an H200: two of them do not
  fit the call. ``--compile full`` compiles the whole UNet (the earlier tables' way).
- variants in priority order (``PLANS``; each starts only while its predicted compile fits the
  budget): bf16; ``fp8_fused`` (``fused:w8a8``: fp8 W8A8 on the Linear layers whose activation
  quantization fuses into an inductor producer, per-tensor weight and static activation scales,
  precise accumulation, bias in cuBLAS's epilogue: no kernel of its own around the GEMM);
  ``fp8_linear`` (every Linear layer, the same scales: the plan the issue measured at 0.97x);
  ``int8_fused`` (the fused layers on ``torch._int_mm``); ``int8_fused_triton`` / ``int8_linear_triton``
  (int8 on ``mixprec.kernels.w8a8_linear``, the epilogue in the kernel); ``fp8_fused_channel`` (per-channel weight
  scales: one pointwise op after each GEMM, which inductor fuses only where the consumer is its own
  kernel); ``fp8_ff`` (the feed-forward layers only: 1.08x on the H100, whole-UNet compile);
  ``fp8_fused_fast`` (cuBLAS's fast fp8 accumulation: 0-8% faster per GEMM, less accurate).
- after each variant the bf16 graph is replayed again (``bf16_again``), so every speed-up has a
  baseline measured next to it; SQNR of each output vs the compiled bf16 output and vs eager bf16
  on the same inputs.

Progress is printed with timestamps and the JSON is rewritten after every step, so a call cut
short still returns what was measured.

    bash benchmarks/gpu_k21.sh                                # on the device: wheels, this script, logs in $OUT
    python3 benchmarks/issue21_compiled.py --model tiny --res 64 --compile-backend eager --budget 200 \\
        --out /tmp/c.json                            # CPU dry run (Dynamo only: checks the code path)
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, capture, env_info, summarize, time_graph, write_json  # noqa: E402
from benchmarks.issue21_matrix import build, convert_named, inputs_for  # noqa: E402
from mixprec.kernels import weight_bytes  # noqa: E402
from mixprec.kernels.probing import sqnr_db  # noqa: E402
from mixprec.kernels.regional import UNET_REGIONS, compile_regions  # noqa: E402
from mixprec.quantizers import set_plan  # noqa: E402

BASELINE = "bf16"
FP8 = {"w8a8": "fp8", "fp8_act": "tensor", "fp8_fast_accum": False}
PLANS = {  # name -> (named plan, backend options), in priority order
    BASELINE: ("uniform:w16a16", {}),
    "fp8_fused": ("fused:w8a8", {**FP8, "fp8_weight": "tensor"}),
    "fp8_linear": ("linear:w8a8", {**FP8, "fp8_weight": "tensor"}),
    "int8_fused": ("fused:w8a8", {"w8a8": "int8", "int8_impl": "torch"}),
    # int8 W8A8 on mixprec.kernels.w8a8_linear (Triton, int32 accumulation, epilogue in the kernel)
    "int8_fused_triton": ("fused:w8a8", {"w8a8": "int8", "int8_impl": "triton"}),
    "int8_linear_triton": ("linear:w8a8", {"w8a8": "int8", "int8_impl": "triton"}),
    "fp8_fused_channel": ("fused:w8a8", {**FP8, "fp8_weight": "channel"}),
    "fp8_ff": ("ff:w8a8", {**FP8, "fp8_weight": "tensor"}),
    "fp8_fused_fast": ("fused:w8a8", {**FP8, "fp8_weight": "tensor", "fp8_fast_accum": True}),
    # 4-bit weights on fbgemm-gpu-genai's CUTLASS kernels (kernels.low_bit=fbgemm; the wheel must be
    # importable): int4 x fp8 activations (static scale / per token), int4 x bf16
    "w4a8_fused_fbgemm": ("fused:w4a8", {"low_bit": "fbgemm", "fp8_act": "tensor"}),
    "w4a8_fused_fbgemm_token": ("fused:w4a8", {"low_bit": "fbgemm", "fp8_act": "token"}),
    "w4a8_linear_fbgemm_token": ("linear:w4a8", {"low_bit": "fbgemm", "fp8_act": "token"}),
    "w4a8_linear_fbgemm": ("linear:w4a8", {"low_bit": "fbgemm", "fp8_act": "tensor"}),
    "w4a16_linear_fbgemm": ("linear:w4a16", {"low_bit": "fbgemm"}),
    "w4a16_fused_fbgemm": ("fused:w4a16", {"low_bit": "fbgemm"}),
}
MIB = 2 ** 20


def log(msg: str, clock: Clock) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{clock.elapsed():6.1f}s] {msg}", flush=True)


def device_info() -> dict:
    info = env_info()
    try:
        q = "name,driver_version,utilization.gpu,memory.used,clocks.sm,clocks.max.sm,power.draw"
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # no nvidia-smi (CPU dry run)
        info["nvidia_smi"] = repr(exc)
    import torch._inductor.config as ind
    info["inductor"] = {k: getattr(ind, k, None) for k in ("max_autotune", "coordinate_descent_tuning",
                                                          "freezing", "compile_threads", "fx_graph_cache")}
    info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def compile_model(model, how: str, backend: str, regions: list[str]):
    """The callable to time: ``model`` with its regions compiled in place, or compiled whole."""
    if how == "regional":
        compile_regions(model, regions, backend=backend, dynamic=False)
        return model
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(model, backend=backend, dynamic=False)


def compiled_call(model, x: dict, how: str, backend: str, regions: list[str]):
    """(the compiled call on ``x``, its first output as float32, the seconds that first call took:
    the compile)."""
    fn = compile_model(model, how, backend, regions)

    def call():
        with torch.no_grad():
            return fn(**x, return_dict=False)[0]

    t = time.perf_counter()
    y = call().float()
    return call, y, time.perf_counter() - t


class Graph:
    """A CUDA graph of one compiled call (host clock on a CPU: dry runs say nothing of speed)."""

    def __init__(self, fn):
        self.fn = fn
        self.g = capture(fn) if torch.cuda.is_available() else None

    def time(self, iters: int, warmup: int) -> dict:
        if self.g is not None:
            return time_graph(self.g, iters, warmup)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            self.fn()
            times.append((time.perf_counter() - t) * 1000)
        return summarize(times)


def predicted_s(name: str, seen: dict, args) -> float:
    """Seconds predicted for converting, compiling and timing ``name``: the longest quantized compile
    timed so far in this process, else the baseline's times ``--plan-compile-factor``."""
    base = seen.get(BASELINE, args.compile_est)
    plans = [t for p, t in seen.items() if p != BASELINE]
    if name == BASELINE:
        compile_s = base
    else:
        compile_s = max(plans) if plans else base * args.plan_compile_factor
    return compile_s * 1.1 + 15


def run_variant(name: str, unet, layers, x: dict, fp_eager: torch.Tensor, state: dict, out: dict,
                clock: Clock, args) -> None:
    """Convert, compile, capture and time variant ``name``; record it in ``out['variants']``."""
    rec = out["variants"][name] = {"plan": PLANS[name][0], "options": PLANS[name][1]}
    t = time.perf_counter()
    # a copy for every variant, the baseline too (``uniform:w16a16``: the original nn.Linear/Conv2d
    # put back, a plain diffusers UNet): compiling regions in place must not touch ``unet``, which
    # the next variants are copied from
    model, rec["dispatch"] = convert_named(unet, layers, *PLANS[name])
    rec["weight_mib"] = weight_bytes(model) / MIB
    rec["convert_s"] = time.perf_counter() - t
    call, y, rec["compile_s"] = compiled_call(model, x, args.compile, args.compile_backend, args.regions.split(","))
    rec["graphs_compiled_so_far"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    log(f"{name}: compiled in {rec['compile_s']:.1f}s ({rec['graphs_compiled_so_far']} graphs in this process)", clock)
    t = time.perf_counter()
    graph = Graph(call)
    rec["capture_s"] = time.perf_counter() - t
    rec["timing"] = graph.time(args.iters, args.warmup)
    rec["sqnr_vs_eager_bf16_db"] = sqnr_db(fp_eager, y)
    if name == BASELINE:
        state["graph"], state["y"] = graph, y
    else:
        rec["sqnr_vs_compiled_bf16_db"] = sqnr_db(state["y"], y) if "y" in state else None
        if "graph" in state:  # the baseline again, right after this variant
            rec["bf16_again"] = state["graph"].time(args.iters, args.warmup)
            base = out["variants"][BASELINE]["timing"]["median_ms"]
            rec["speedup_vs_bf16"] = base / rec["timing"]["median_ms"]
            rec["speedup_vs_bf16_again"] = rec["bf16_again"]["median_ms"] / rec["timing"]["median_ms"]
        del graph, model, call
    state.setdefault("seen", {})[name] = rec["compile_s"]


def summary_line(name: str, rec: dict) -> str:
    tm = rec["timing"]
    s = f"{name}: median {tm['median_ms']:.3f} ms (p10 {tm['p10_ms']:.3f}, p90 {tm['p90_ms']:.3f})"
    if "speedup_vs_bf16" in rec:
        s += (f", {rec['speedup_vs_bf16']:.3f}x vs bf16 ({rec['speedup_vs_bf16_again']:.3f}x vs bf16 again "
              f"{rec['bf16_again']['median_ms']:.3f} ms), SQNR vs compiled bf16 "
              f"{rec['sqnr_vs_compiled_bf16_db']:.2f} dB")
    return s + f", vs eager bf16 {rec['sqnr_vs_eager_bf16_db']:.2f} dB"


def measure(args, out: dict, clock: Clock) -> None:
    res, batch = args.res, args.batch
    log(f"building {args.model} UNet + calibration", clock)
    unet, layers = build(args.model, res)
    out["build_s"] = clock.elapsed()
    x = inputs_for(unet, res, batch)
    set_plan(layers)
    with torch.no_grad():
        fp_eager = unet(**x).sample.float()
    log(f"built in {out['build_s']:.1f}s", clock)
    write_json(args.out, out)
    state: dict = {}
    for name in [p for p in PLANS if p == BASELINE or p in args.plans.split(",")]:
        need = predicted_s(name, state.get("seen", {}), args)
        if name != BASELINE and clock.left() < need:
            out["variants"][name] = {"skipped": f"time budget: {clock.left():.0f}s left, ~{need:.0f}s predicted"}
            log(f"{name}: skipped ({out['variants'][name]['skipped']})", clock)
            continue
        log(f"{name}: converting + compiling ({args.compile}; ~{need:.0f}s predicted, {clock.left():.0f}s left)",
            clock)
        try:
            run_variant(name, unet, layers, x, fp_eager, state, out, clock, args)
            log(summary_line(name, out["variants"][name]), clock)
        except Exception as exc:  # the other variants go on (the baseline's failure ends the run)
            traceback.print_exc()
            out["variants"][name]["error"] = repr(exc)[:800]
            if name == BASELINE:
                raise
        out["dynamo_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()
                                  if k in ("stats", "recompiles", "graph_break")}
        write_json(args.out, out)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=250, help="seconds for the script after its imports")
    ap.add_argument("--model", default="sdxl", help="sdxl (full size) | tiny (CPU dry run)")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--plans", default=",".join(p for p in PLANS if p != BASELINE),
                    help=f"variants besides bf16, from {[p for p in PLANS if p != BASELINE]} (priority order kept)")
    ap.add_argument("--compile", default="regional", choices=("regional", "full"))
    ap.add_argument("--regions", default=",".join(UNET_REGIONS), help="classes compiled with --compile regional")
    ap.add_argument("--compile-backend", default="inductor", help="inductor | eager (CPU dry run: Dynamo only)")
    ap.add_argument("--compile-est", type=float, default=None, help="predicted bf16 compile before one is timed "
                    "(s; default 45 regional, 110 full: the whole UNet took 105 s on an H200)")
    ap.add_argument("--plan-compile-factor", type=float, default=1.6, help="plan compile / bf16 compile "
                    "(whole UNet on an H200: 238 / 105 s)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    unknown = set(args.plans.split(",")) - set(PLANS) - {""}
    if unknown:
        raise SystemExit(f"--plans: unknown {sorted(unknown)}; known: {list(PLANS)}")
    if args.compile_est is None:
        args.compile_est = 45.0 if args.compile == "regional" else 110.0
    clock = Clock(args.budget)
    out = {"env": device_info(), "args": vars(args), "plans": {k: [v[0], v[1]] for k, v in PLANS.items()},
           "variants": {}, "status": "running"}
    log(f"env {out['env']}", clock)
    write_json(args.out, out)
    try:
        measure(args, out, clock)
        out["status"] = "done"
    except Exception as exc:
        traceback.print_exc()
        out["status"] = f"failed: {exc!r}"[:800]
    finally:
        out["elapsed_s"] = clock.elapsed()
        write_json(args.out, out)
        log(f"end: {out['status']}, {out['elapsed_s']:.0f}s; summary:", clock)
        for name, rec in out["variants"].items():
            print("  ", summary_line(name, rec) if "timing" in rec else f"{name}: {rec}", flush=True)


if __name__ == "__main__":
    main()
