"""Issue 21: maintained low-bit GEMM libraries side by side with cuBLAS and mixprec's Triton kernels,
at the GEMM shapes of SDXL's UNet (one H100/H200), before writing more kernels of our own.

Libraries (each optional: a missing or broken one is recorded with its error, the rest still run):

- ``fbgemm-gpu-genai`` (CUTLASS for sm90): fp8 tensor-wise and row-wise (``f8f8bf16``,
  ``f8f8bf16_rowwise``), int8 (``i8i8bf16``), bf16 x int4 (``bf16i4bf16_rowwise``, the preshuffled
  ``bf16i4bf16_shuffled``), fp8 x int4 (``f8i4bf16_rowwise``, ``f8i4bf16_shuffled``);
- ``gemlite`` (Triton): weight-only 4-bit (``A16Wn``), dynamic int8 / fp8 W8A8, fp8 x int4;
- torch: bf16 cuBLAS, ``_scaled_mm`` (cuBLASLt fp8), ``_int_mm``;
- mixprec's own Triton kernel (``mixprec.kernels.triton_gemm.launch``): int8, fp8, W4A16, W4A8.

Each variant is timed as in ``gemm_bench.py``: weights rotated through ``--copies`` distinct copies so
each call reads its weights from HBM, all calls of one rotation inside one CUDA graph, median and
p10-p90 over ``--iters`` replays, in microseconds per call; activations are pre-quantized (the
activation quantization is a separate cost: fused into a producer under ``torch.compile`` for the
static-scale paths, a kernel of its own for the dynamic row-wise ones, timed as ``*_actq`` where a
library provides it). ``rel_err`` is each variant's output against the float32 product of the
unquantized operands (quantization error included: a layout mistake shows as ~1). Whether each
library op traces under ``torch.compile(fullgraph=True)`` is checked once per op (``compile``).

    python3 benchmarks/library_gemms.py --out $OUT/library_gemms.json       # on the device
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, env_info, time_fn, write_json  # noqa: E402

# (M, N, K, count): SDXL UNet Linear GEMMs at 512 px batch 1 (count = layers of that shape); the same
# layers at 512 px batch 4 / 1024 px batch 1 have 4x the rows (cross-attention K/V: 4 x 77 at batch 4)
SHAPES_512_B1 = [
    (256, 10240, 1280, 60), (256, 1280, 1280, 372), (256, 1280, 5120, 60),
    (1024, 5120, 640, 10), (1024, 640, 640, 70), (1024, 640, 2560, 10), (77, 1280, 2048, 120),
]
SHAPES_X4 = [(4 * m if m != 77 else 308, n, k, c) for m, n, k, c in SHAPES_512_B1]
FP8_MAX = 448.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def fp8_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (t.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_tensorwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.float().abs().amax().clamp_min(1e-12) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def int8_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.float().abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(t.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int4_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel 4-bit codes in [-8, 7] (int8) and scales: mixprec's weight format."""
    scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / 7
    return torch.round(w.float() / scale[:, None]).clamp(-8, 7).to(torch.int8), scale


class Variants:
    """Per variant: ``prep(w) -> state`` once per weight copy, ``call(x_in, state)`` the timed GEMM,
    ``act(x) -> x_in`` the activation as the GEMM takes it (pre-quantized, untimed)."""

    def __init__(self, libs: set[str]):
        self.table: dict[str, tuple] = {}
        self.errors: dict[str, str] = {}
        self._torch()
        if "mixprec" in libs:
            self._guard("mixprec", self._mixprec)
        if "fbgemm" in libs:
            self._guard("fbgemm", self._fbgemm)
        if "gemlite" in libs:
            self._guard("gemlite", self._gemlite)
        if "inductor" in libs:
            self._guard("inductor", self._inductor)

    def _guard(self, name, fn):
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            self.errors[name] = repr(exc)[:800]

    def add(self, name, act, prep, call, min_m=1):
        self.table[name] = (act, prep, call, min_m)

    def _torch(self):
        bf = torch.bfloat16
        self.add("bf16", lambda x: x, lambda w: w, lambda x, w: F.linear(x, w))
        for fast in (False, True):
            self.add(f"scaled_mm_tensor{'_fast' if fast else ''}", lambda x: fp8_tensorwise(x),
                     lambda w: fp8_tensorwise(w),
                     lambda xs, ws, fast=fast: torch._scaled_mm(xs[0], ws[0].t(), scale_a=xs[1], scale_b=ws[1],
                                                                out_dtype=bf, use_fast_accum=fast), min_m=16)
        self.add("scaled_mm_rowwise", lambda x: (lambda q, s: (q, s[:, None].contiguous()))(*fp8_rowwise(x)),
                 lambda w: (lambda q, s: (q, s[None, :].contiguous()))(*fp8_rowwise(w)),
                 lambda xs, ws: torch._scaled_mm(xs[0], ws[0].t(), scale_a=xs[1], scale_b=ws[1], out_dtype=bf,
                                                 use_fast_accum=True), min_m=16)
        self.add("int_mm", lambda x: int8_rowwise(x), lambda w: int8_rowwise(w),
                 lambda xs, ws: torch._int_mm(xs[0], ws[0].t()), min_m=17)  # int32 out: the GEMM alone

    def _mixprec(self):
        from mixprec.kernels import triton_gemm as tg
        from mixprec.kernels.packing import pack

        bf = torch.bfloat16
        # one static activation scale, fixed before the weights are prepared (the kernels' per-tensor
        # path: every epilogue vector is precomputed, nothing but the GEMM runs in the timed graph);
        # randn activations reach |x| ~ 5
        s_int, s_fp8, zp = 5.0 / 127, 5.0 / FP8_MAX, 128.0

        def prep_int(bits, mma):
            def prep(w):
                qmax = 2 ** (bits - 1) - 1
                scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / qmax
                q = torch.round(w.float() / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
                act = mma != tg.MMA_16
                # zp = off = 128: the zero-point correction in the column bias vanishes exactly
                return (pack(q, bits, 1), scale * s_int if act else scale, torch.zeros_like(scale),
                        torch.tensor([1 / s_int, zp, 128.0], device=w.device) if act else None, 255 if act else 0)
            return prep

        def call(bits, mma):
            return lambda x, ws: tg.launch(x, ws[0], ws[1], ws[2], ws[3], x.shape[1], bits, mma, False, ws[4], bf, [])

        act_int = lambda x: tg.quant_act_int(x, s_int, zp, 128.0, 255)  # noqa: E731
        self.add("mixprec_int8", act_int, prep_int(8, tg.MMA_INT8), call(8, tg.MMA_INT8))
        self.add("mixprec_w4a8", act_int, prep_int(4, tg.MMA_INT8), call(4, tg.MMA_INT8))
        self.add("mixprec_w4a16", lambda x: x, prep_int(4, tg.MMA_16), call(4, tg.MMA_16))

        def prep_fp8(w):
            q, sw = fp8_tensorwise(w)
            rs = (sw * s_fp8).reshape(1).expand(w.shape[0]).contiguous()
            return q, rs, torch.zeros_like(rs), torch.tensor([1.0, 0.0, 0.0], device=w.device), 0

        self.add("mixprec_fp8", lambda x: tg.quant_act_fp8(x, 1 / s_fp8), prep_fp8, call(8, tg.MMA_FP8))

    def _inductor(self):
        """bf16 and tensor-wise fp8 GEMMs as inductor compiles them with ``max-autotune``: cuBLAS and
        inductor's Triton templates (on Hopper also the persistent TMA ones) timed by its autotuner at
        each shape, its fastest kept. One compiled function per variant and shape (weights are graph
        inputs, so the rotated copies share it). Session 32: slower than cuBLAS at every shape timed."""
        import torch._dynamo
        import torch._inductor.config as ind

        ind.triton.enable_persistent_tma_matmul = True
        ind.max_autotune_gemm_backends = "ATEN,TRITON"
        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 256
        bf = torch.bfloat16

        def compiled(fn):
            return torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)

        linear = compiled(lambda x, w: F.linear(x, w))
        self.add("inductor_bf16", lambda x: x, lambda w: w, lambda x, w: linear(x, w))
        for fast in (False, True):
            mm = compiled(lambda xq, xs, wq, ws, fast=fast: torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=bf, use_fast_accum=fast))
            self.add(f"inductor_scaled_mm_tensor{'_fast' if fast else ''}", fp8_tensorwise, fp8_tensorwise,
                     lambda xs, ws, mm=mm: mm(xs[0], xs[1], ws[0], ws[1]), min_m=16)

    def _fbgemm(self):
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (loads the CUTLASS ops)

        from mixprec.kernels import fbgemm

        ops = torch.ops.fbgemm
        for fast in (False, True):
            sfx = "_fast" if fast else ""
            self.add(f"fbgemm_f8f8_tensorwise{sfx}", host_scale(fp8_tensorwise), host_scale(fp8_tensorwise),
                     lambda xs, ws, fast=fast: ops.f8f8bf16_tensorwise(xs[0], ws[0], xs[1] * ws[1],
                                                                       use_fast_accum=fast))
            self.add(f"fbgemm_f8f8_rowwise{sfx}", fp8_rowwise, fp8_rowwise,
                     lambda xs, ws, fast=fast: ops.f8f8bf16_rowwise(xs[0], ws[0], xs[1], ws[1], use_fast_accum=fast))
        self.add("fbgemm_i8i8", host_scale(int8_tensorwise), host_scale(int8_tensorwise),
                 lambda xs, ws: ops.i8i8bf16(xs[0], ws[0], xs[1] * ws[1], 1))

        def prep_i4_rowwise(w):
            # per-channel symmetric codes = one group spanning K, zero point 0 (w = q * s)
            q, s = int4_channel(w)
            k = w.shape[1]
            group = 128  # CUTLASS's groups must divide K; per-channel scales repeat across groups
            g = k // group
            scale = s[None, :].expand(g, -1).contiguous()
            return fbgemm.pack_pairs(q), scale, torch.zeros_like(scale)

        self.add("fbgemm_bf16i4_rowwise", lambda x: x, prep_i4_rowwise,
                 lambda x, ws: ops.bf16i4bf16_rowwise(x, ws[0], ws[1], ws[2]))
        self.add("fbgemm_f8i4_rowwise", fp8_rowwise, prep_i4_rowwise,
                 lambda xs, ws: ops.f8i4bf16_rowwise(xs[0], ws[0], xs[1], ws[1], ws[2]))

        # the preshuffled weights exactly as kernels.low_bit=fbgemm prepares them
        def prep_bf16i4_shuffled(w):
            d = fbgemm.prepare_bf16i4(*int4_channel(w))
            return d["fb_wq"], d["fb_group_scale"], d["fb_group_zero"]

        self.add("fbgemm_bf16i4_shuffled", lambda x: x, prep_bf16i4_shuffled,
                 lambda x, ws: ops.bf16i4bf16_shuffled(x, ws[0], ws[1], ws[2]))

        def prep_f8i4_shuffled(w):
            d = fbgemm.prepare_f8i4(*int4_channel(w))
            return d["fb_wq"], d["fb_row_scale"], d["fb_group_scale"]

        self.add("fbgemm_f8i4_shuffled", fp8_rowwise, prep_f8i4_shuffled,
                 lambda xs, ws: ops.f8i4bf16_shuffled(xs[0], ws[0], xs[1], ws[1], ws[2]))
        # dynamic row-wise activation quantization as fbgemm's own kernel (a cost the rowwise paths add)
        self.add("fbgemm_quant_fp8_row", lambda x: x, lambda w: None,
                 lambda x, ws: ops.quantize_fp8_per_row(x)[0])

    def _gemlite(self):
        import gemlite
        from gemlite.helper import A8W8_fp8_dynamic, A8W8_int8_dynamic, A16Wn

        bf = torch.bfloat16

        def linear_of(w):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=bf)
            lin.weight.data.copy_(w)
            return lin

        def prep_w4(w):
            q, s = int4_channel(w)
            # gemlite: W = (W_q - zero) * scale with unsigned codes; one group spanning K
            return A16Wn(device=w.device, dtype=bf).from_weights((q + 8).to(torch.uint8), s[:, None].to(bf),
                                                                 torch.full_like(s[:, None], 8.0).to(bf), 4,
                                                                 w.shape[1])

        self.add("gemlite_a16w4", lambda x: x, prep_w4, lambda x, lin: lin(x))
        self.add("gemlite_a8w8_int8", lambda x: x, lambda w: A8W8_int8_dynamic(device=w.device, dtype=bf)
                 .from_linear(linear_of(w)), lambda x, lin: lin(x))
        self.add("gemlite_a8w8_fp8", lambda x: x, lambda w: A8W8_fp8_dynamic(device=w.device, dtype=bf)
                 .from_linear(linear_of(w)), lambda x, lin: lin(x))
        self.gemlite_version = gemlite.__version__


def int8_tensorwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.float().abs().amax().clamp_min(1e-12) / 127
    return torch.round(t.float() / scale).clamp(-127, 127).to(torch.int8), scale


def host_scale(quantize):
    """The codes with the scale as a Python float (ops that take a ``float`` scale; read before the
    timed graph is captured, where a device-to-host read is not allowed)."""
    def wrapped(t: torch.Tensor):
        q, scale = quantize(t)
        return q, float(scale)
    return wrapped


def bench_shape(v: Variants, m: int, n: int, k: int, copies: int, iters: int, names: list[str]) -> dict:
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(m * 7 + n * 3 + k)
    x = torch.randn(m, k, device=dev, dtype=bf)
    ws = [torch.randn(n, k, device=dev, dtype=bf) * 0.02 for _ in range(copies)]
    ref = x.float() @ ws[0].float().t()
    row = {}
    for name in names:
        act, prep, call, min_m = v.table[name]
        if m < min_m:
            continue
        try:
            states = [prep(w) for w in ws]
            x_in = act(x)
            out = call(x_in, states[0])
            torch.cuda.synchronize()
            t = time_fn(lambda: [call(x_in, s) for s in states], iters=iters, warmup=5)
            row[name] = {"us": t["median_ms"] / copies * 1000, "p10_us": t["p10_ms"] / copies * 1000,
                         "p90_us": t["p90_ms"] / copies * 1000}
            if name != "fbgemm_quant_fp8_row":
                row[name]["rel_err"] = rel_err(out, ref)
            del states
        except Exception as exc:
            row[name] = {"error": repr(exc)[:400]}
    return row


def compile_checks(v: Variants, names: list[str]) -> dict:
    """Does each op run under torch.compile(fullgraph=True) and give the eager result?"""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(256, 1280, device=dev, dtype=bf)
    w = torch.randn(1280, 1280, device=dev, dtype=bf) * 0.02
    res = {}
    for name in names:
        if name.startswith(("bf16", "mixprec", "gemlite", "inductor")):  # covered elsewhere / module calls
            continue
        act, prep, call, _ = v.table[name]
        try:
            state, x_in = prep(w), act(x)
            torch._dynamo.reset()
            fn = torch.compile(lambda a: call(a, state), fullgraph=True)
            t0 = time.time()
            got = fn(x_in)
            eager = call(x_in, state)
            torch.cuda.synchronize()
            res[name] = {"ok": bool(torch.equal(got.float(), eager.float())), "compile_s": time.time() - t0}
        except Exception as exc:
            res[name] = {"ok": False, "error": repr(exc)[:400]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--libs", default="mixprec,fbgemm,gemlite",
                    help="also: inductor (bf16 and fp8 GEMMs compiled with max-autotune; minutes per shape)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget", type=float, default=400.0)
    ap.add_argument("--no-x4", action="store_true", help="only the 512 px batch-1 shapes")
    ap.add_argument("--skip", default="", help="comma-separated MxNxK shapes (with group: 512_b1:256x1280x1280) "
                                               "already measured")
    ap.add_argument("--no-compile-check", action="store_true")
    args = ap.parse_args()
    clock = Clock(args.budget)
    out = {"env": env_info(), "settings": vars(args), "shapes": []}
    v = Variants(set(args.libs.split(",")))
    out["library_errors"] = v.errors
    out["gemlite"] = getattr(v, "gemlite_version", None)
    names = [n for n in v.table if not args.only or n in args.only.split(",")]
    out["variants"] = names
    print(out["env"], "\nvariants:", names, "\nerrors:", v.errors, flush=True)
    write_json(args.out, out)
    shapes = [("512_b1", s) for s in SHAPES_512_B1] + ([] if args.no_x4 else [("x4", s) for s in SHAPES_X4])
    totals: dict[str, dict[str, float]] = {}
    skip = set(filter(None, args.skip.split(",")))
    for group, (m, n, k, count) in shapes:
        if f"{group}:{m}x{n}x{k}" in skip:
            continue
        if clock.left() < 0:
            print("budget spent: skipping", group, m, n, k, flush=True)
            continue
        row = bench_shape(v, m, n, k, args.copies, args.iters, names)
        out["shapes"].append({"group": group, "m": m, "n": n, "k": k, "count": count, "results": row})
        for name, r in row.items():
            if "us" in r:
                totals.setdefault(group, {}).setdefault(name, 0.0)
                totals[group][name] += r["us"] * count
        print(f"[{clock.elapsed():6.1f}s] {group} {m}x{n}x{k} x{count}: " + " ".join(
            f"{a}={r['us']:.2f}" if "us" in r else f"{a}=ERR" for a, r in row.items()), flush=True)
        out["weighted_total_us"] = totals
        write_json(args.out, out)
    if not args.no_compile_check and clock.left() > 0:
        out["compile"] = compile_checks(v, names)
        print("compile:", out["compile"], flush=True)
    out["elapsed_s"] = clock.elapsed()
    write_json(args.out, out)
    for group, t in totals.items():
        print(f"weighted totals {group} (us per UNet call over the listed shapes):")
        for name, us in sorted(t.items(), key=lambda kv: kv[1]):
            print(f"  {name:28s} {us:9.1f}")


if __name__ == "__main__":
    main()
