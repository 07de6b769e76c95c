"""Denoiser latency, memory and accuracy of quantization plans on real kernels vs 16-bit, one process.

The full-size SDXL UNet (random weights; mixprec/reference/sdxl_unet_config.json) is calibrated
with observers on random inputs, then every variant is built from the same calibrated layers,
checked against the fake-quant reference (SQNR of the denoiser output) and timed at each
resolution x batch: CUDA graph replays timed with CUDA events (median and spread), after warm-up.
``--compile`` compiles every variant the same way (inductor, no CUDA graphs of its own; the graph is
captured around the compiled call). Results go to one JSON file.

    python benchmarks/bench_unet.py --variants bf16,w8a8_int8,w8a8_fp8,w4a16,mixed \
        --res 512 --batch 1 --compile default --out $OUT/unet.json
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

from benchmarks.common import Clock, capture, env_info, time_graph, write_json  # noqa: E402
from mixprec.kernels import BackendConfig, convert_, weight_bytes  # noqa: E402
from mixprec.kernels.probing import calibrate_random, cast_floating_, denoiser_inputs, sqnr_db  # noqa: E402
from mixprec.models.toy import build_unet  # noqa: E402
from mixprec.quantizers import quant_layers, set_plan  # noqa: E402

MIB = 2 ** 20
CONV_NAMES: set[str] = set()


def plan_for(variant: str, names: list[str]) -> tuple[dict, dict, dict]:
    """(weight bits, act bits, backend options) of a named variant."""
    def is_ff(n):
        return ".ff." in n

    def is_conv(n):
        return n in CONV_NAMES

    if variant == "bf16":
        return {}, {}, {}
    if variant == "w8a8_fp8_linear":
        # convolutions stay 16-bit: only the Linear layers of the transformer blocks go fp8
        lin = [n for n in names if not is_conv(n)]
        return {n: 8 for n in lin}, {n: 8 for n in lin}, {"w8a8": "fp8"}
    if variant == "w8a8_fp8_ff":
        # only the feed-forward GEMMs (the largest, whose inputs come from fusable LayerNorm/GEGLU)
        ff = [n for n in names if is_ff(n)]
        return {n: 8 for n in ff}, {n: 8 for n in ff}, {"w8a8": "fp8"}
    if variant.startswith("w8a8"):
        impl = variant.split("_", 1)[1] if "_" in variant else "int8"
        opts = {"w8a8": "fp8" if impl.startswith("fp8") else "int8"}
        if impl == "int8_torch":
            opts["int8_impl"] = "torch"
        if impl.endswith("qa"):
            opts["act_quant"] = "kernel"
        if impl == "fp8_channel":
            opts["fp8_weight"] = "channel"
        if impl == "int8_exactbos":
            opts["bos"] = "exact"
        return {n: 8 for n in names}, {n: 8 for n in names}, opts
    if variant == "w4a16":
        return {n: 4 for n in names}, {}, {}
    if variant == "w4a8":
        return {n: 4 for n in names}, {n: 8 for n in names}, {}
    if variant == "mixed":
        # feed-forward layers (the largest GEMMs) on 4-bit weights with int8 activations, the rest
        # W8A8 on fp8 tensor cores
        wb = {n: (4 if is_ff(n) else 8) for n in names}
        return wb, {n: 8 for n in names}, {"w8a8": "fp8"}
    if variant == "mixed_w4a16":
        wb = {n: (4 if is_ff(n) else 8) for n in names}
        ab = {n: 8 for n in names if not is_ff(n)}
        return wb, ab, {"w8a8": "fp8"}
    raise ValueError(f"unknown variant {variant}")


def mean_bits(wb: dict, layers) -> float:
    tot = sum(layers[n].inner.weight.numel() for n in layers)
    return sum(layers[n].inner.weight.numel() * (wb.get(n) or 16) for n in layers) / tot


def peak_forward(model, kwargs) -> dict:
    from mixprec.stages.benchmark import _peak

    return _peak(model, kwargs, cuda=True)


@torch.no_grad()
def checkpoint_roundtrip(model, x0, args, dtype) -> dict:
    """Save the converted model, load it into a UNet built on the meta device, compare outputs."""
    from mixprec.checkpoint import load_quantized, save_quantized

    path = Path(args.checkpoint_dir) / f"{args.checkpoint}.safetensors"
    before = model(**x0).sample
    t = time.time()
    info = save_quantized(model, path)
    info["save_s"] = time.time() - t
    fresh = build_unet(args.model, device="meta", dtype=dtype)
    t = time.time()
    report = load_quantized(fresh, path, device=before.device)
    info["load_s"] = time.time() - t
    if args.memory_format == "channels_last":
        fresh = fresh.to(memory_format=torch.channels_last)
    after = fresh(**x0).sample
    info["max_abs_diff"] = (before.float() - after.float()).abs().max().item()
    info["identical"] = bool(torch.equal(before, after))
    info["weight_bytes_model"] = weight_bytes(model)
    info["weight_bytes_loaded"] = weight_bytes(fresh)
    info["loaded_backends"] = report.summary()["backends"]
    path.unlink()
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,w8a8_int8,w8a8_fp8,w4a16")
    ap.add_argument("--res", default="512")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", default="none", help="none | default | max-autotune-no-cudagraphs")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--budget", type=float, default=480.0)
    ap.add_argument("--min-left", type=float, default=60.0, help="start a variant only with this many seconds left")
    ap.add_argument("--sqnr", action="store_true",
                    help="compare each variant with its fake-quant reference (run in float32 and in --dtype)")
    ap.add_argument("--memory-format", default="channels_last", help="channels_last | contiguous (all variants)")
    ap.add_argument("--checkpoint", default=None, help="variant to save, reload into a fresh UNet and compare")
    ap.add_argument("--checkpoint-dir", default="/tmp/mixprec_ckpt")
    ap.add_argument("--model", default="sdxl", help="sdxl | tiny (smoke test; runs on CPU without timing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    clock = Clock(args.budget)
    dtype = getattr(torch, args.dtype)
    result = {"env": env_info(), "args": vars(args), "variants": {}}
    print(result["env"], flush=True)
    if args.sqnr:
        # the float32 reference must be exact float32: TF32 convs (cuDNN's default) alone flip
        # activation codes downstream
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False

    cuda = torch.cuda.is_available()
    unet = build_unet(args.model, device="cuda" if cuda else "cpu", dtype=dtype)
    shapes = [(int(r), int(b)) for r in args.res.split(",") for b in args.batch.split(",")]
    r0 = shapes[0][0] // 8
    calib = [denoiser_inputs(unet, 1, r0, seed=100 + i) for i in range(2)]
    t = time.time()
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(2, 4, 8), act_bits=(4, 8))
    result["calibration_s"] = time.time() - t
    names = list(layers)
    CONV_NAMES.update(n for n, layer in layers.items() if isinstance(layer.inner, torch.nn.Conv2d))
    result["layers"] = len(names)
    x0 = denoiser_inputs(unet, 1, r0, seed=7)
    with torch.no_grad():
        set_plan(layers, {}, {})
        fp_out = unet(**x0).sample.float()
        if args.sqnr:
            # floor: the unquantized model in --dtype against float32
            u32 = cast_floating_(copy.deepcopy(unet), torch.float32)
            x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x0.items()}
            x32["added_cond_kwargs"] = {k: v.float() for k, v in x0["added_cond_kwargs"].items()}
            result["fp_dtype_vs_fp32_db"] = sqnr_db(u32(**x32).sample.float(), fp_out)
            del u32
    print(f"calibrated {len(names)} layers in {result['calibration_s']:.1f}s; "
          f"{args.dtype} vs fp32 unquantized: {result.get('fp_dtype_vs_fp32_db', float('nan')):.1f} dB", flush=True)
    write_json(args.out, result)

    for variant in args.variants.split(","):
        if clock.left() < args.min_left:
            result["variants"][variant] = {"skipped": "time budget"}
            print("skip", variant, "(time budget)", flush=True)
            continue
        rec: dict = {}
        result["variants"][variant] = rec
        try:
            wb, ab, opts = plan_for(variant, names)
            rec["options"] = opts
            rec["mean_weight_bits"] = mean_bits(wb, layers)
            for layer in layers.values():
                layer.drop_cache()
            model = copy.deepcopy(unet)
            mlayers = quant_layers(model)
            set_plan(mlayers, wb, ab)
            ref = ref32 = None
            if args.sqnr and (wb or ab):
                with torch.no_grad():
                    ref = model(**x0).sample.float()
                    # the fake-quant reference itself rounds x / scale in 16 bit; in float32 it is
                    # the exact function the kernels implement
                    m32 = cast_floating_(copy.deepcopy(model), torch.float32)
                    for layer in quant_layers(m32).values():
                        layer.drop_cache()
                    x32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x0.items()}
                    x32["added_cond_kwargs"] = {k: v.float() for k, v in x0["added_cond_kwargs"].items()}
                    ref32 = m32(**x32).sample.float()
                    # the kernels in a float32 model against the float32 reference: only
                    # accumulation order differs, so this isolates the kernels' arithmetic
                    if opts.get("w8a8", "int8") == "int8" or not ab:
                        convert_(m32, BackendConfig.from_mapping({**opts, "bos": "exact"}))
                        rec["sqnr_fp32_real_vs_reference_db"] = sqnr_db(ref32, m32(**x32).sample.float())
                    del m32
                for layer in mlayers.values():
                    layer.drop_cache()
                torch.cuda.empty_cache() if cuda else None
            t = time.time()
            report = convert_(model, BackendConfig.from_mapping(opts), example_kwargs=x0)
            rec["convert_s"] = time.time() - t
            rec["dispatch"] = report.summary()
            rec["fallbacks"] = [(d.name, d.reason or d.ran) for d in report.fallbacks()][:20]
            with torch.no_grad():
                out = model(**x0).sample.float()
            if ref is not None:
                rec["sqnr_vs_reference_db"] = sqnr_db(ref32, out)
                rec["sqnr_vs_reference_16bit_db"] = sqnr_db(ref, out)
                rec["sqnr_reference_vs_fp_db"] = sqnr_db(fp_out, ref32)
                rec["sqnr_reference16_vs_reference32_db"] = sqnr_db(ref32, ref)
            rec["sqnr_vs_fp_db"] = sqnr_db(fp_out, out)
            del ref, ref32, out
            if args.memory_format == "channels_last":
                model = model.to(memory_format=torch.channels_last)
            rec["memory"] = peak_forward(model, x0) if cuda else {"weight_mib": weight_bytes(model) / MIB}
            fn_model = model
            if args.compile != "none":
                fn_model = torch.compile(model, mode=None if args.compile == "default" else args.compile,
                                         fullgraph=False, dynamic=False)
            rec["timing"] = {}
            for res, batch in shapes:
                if not cuda:
                    break
                if clock.left() < 30:
                    rec["timing"][f"{res}x{batch}"] = {"skipped": "time budget"}
                    continue
                xin = denoiser_inputs(unet, batch, res // 8, seed=11)
                if args.memory_format == "channels_last":
                    xin["sample"] = xin["sample"].contiguous(memory_format=torch.channels_last)
                t = time.time()

                def call():
                    with torch.no_grad():
                        return fn_model(**xin, return_dict=False)[0]
                g = capture(call)
                warm_s = time.time() - t
                tm = time_graph(g, args.iters, args.warmup)
                tm["warmup_compile_s"] = warm_s
                if (res, batch) != shapes[0]:
                    tm["memory"] = peak_forward(model, xin)
                rec["timing"][f"{res}x{batch}"] = tm
                del g
                print(f"{variant:14s} {res}x{batch}: median {tm['median_ms']:.2f} ms "
                      f"(p10 {tm['p10_ms']:.2f}, p90 {tm['p90_ms']:.2f}, b2b {tm['back_to_back_ms']:.2f}) "
                      f"warm/compile {warm_s:.0f}s", flush=True)
            print(f"{variant:14s} sqnr ref {rec.get('sqnr_vs_reference_db', float('nan')):.1f} dB, "
                  f"fp {rec['sqnr_vs_fp_db']:.1f} dB; weights {rec['memory']['weight_mib']:.0f} MiB, "
                  f"peak {rec['memory'].get('peak_inference_mib', 0):.0f} MiB; {rec['dispatch']['paths']}", flush=True)
            if variant == args.checkpoint:
                rec["checkpoint"] = checkpoint_roundtrip(model, x0, args, dtype)
                print("checkpoint", rec["checkpoint"], flush=True)
            del fn_model, model
        except Exception as exc:
            traceback.print_exc()
            rec["error"] = repr(exc)[:500]
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        write_json(args.out, result)

    base = result["variants"].get("bf16", {}).get("timing", {})
    print("\nvariant         shape     median_ms  speedup  weights_MiB  peak_MiB  sqnr_ref_dB")
    for v, rec in result["variants"].items():
        for key, tm in (rec.get("timing") or {}).items():
            if "median_ms" not in tm:
                continue
            b = base.get(key, {}).get("median_ms")
            sp = b / tm["median_ms"] if b else float("nan")
            mem = tm.get("memory", rec.get("memory", {}))
            print(f"{v:15s} {key:9s} {tm['median_ms']:9.2f} {sp:8.2f} {mem.get('weight_mib', 0):12.0f} "
                  f"{mem.get('peak_inference_mib', 0):9.0f} {rec.get('sqnr_vs_reference_db', float('nan')):11.1f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
