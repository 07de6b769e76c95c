"""Where the time of one compiled SDXL UNet call goes, by kernel category (torch.profiler, CUPTI).

Builds the full-size UNet (random weights, bf16, channels-last), optionally converts it to a
quantization plan of benchmarks/bench_unet.py, compiles it (inductor, default mode), and sums the
GPU time of every kernel of one call by category: GEMM (cuBLAS), convolution (cuDNN), attention,
the quantized-GEMM kernels, inductor's fused Triton kernels, the rest. Also the call's time as a
CUDA graph replay, so the sum of kernel time can be set against it (the gaps are launch latency).

    python benchmarks/profile_unet.py --variants bf16,w8a8_fp8_linear --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_unet  # noqa: E402
from benchmarks.common import capture, env_info, time_graph, write_json  # noqa: E402
from mixprec.kernels import BackendConfig, convert_  # noqa: E402
from mixprec.kernels.probing import calibrate_random, denoiser_inputs  # noqa: E402
from mixprec.models.toy import build_unet  # noqa: E402
from mixprec.quantizers import quant_layers, set_plan  # noqa: E402

# first match wins: cuDNN conv kernels also contain "gemm" in some names
CATEGORIES = [
    ("inductor_triton", ("triton_",)),  # first: fused kernels carry the names of the ops they fuse
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("conv", ("conv", "fprop", "implicit", "cudnn", "winograd")),
    ("qgemm_triton", ("_qgemm_kernel",)),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "_scaled_mm", "splitk")),
    ("memcpy_memset", ("memcpy", "memset", "copy")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def kernel_breakdown(fn, calls: int) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_cat_us: dict[str, float] = defaultdict(float)
    per_cat_n: dict[str, int] = defaultdict(int)
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        cat = category(ev.name)
        per_cat_us[cat] += us / calls
        per_cat_n[cat] += 1
        per_kernel[ev.name][0] += us / calls
        per_kernel[ev.name][1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "total_kernel_us": sum(per_cat_us.values()),
        "kernels_per_call": sum(per_cat_n.values()) / calls,
        "by_category_us": dict(sorted(per_cat_us.items(), key=lambda kv: -kv[1])),
        "by_category_count": {k: v / calls for k, v in per_cat_n.items()},
        "top_kernels": [{"name": n[:160], "us_per_call": v[0], "count_per_call": v[1] / calls} for n, v in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,w8a8_fp8_linear")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    result = {"env": env_info(), "args": vars(args), "variants": {}}
    unet = build_unet("sdxl", device="cuda", dtype=torch.bfloat16)
    r0 = args.res // 8
    calib = [denoiser_inputs(unet, 1, r0, seed=100 + i) for i in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(8,), act_bits=(8,))
    names = list(layers)
    bench_unet.CONV_NAMES.update(n for n, layer in layers.items() if isinstance(layer.inner, torch.nn.Conv2d))
    xin = denoiser_inputs(unet, args.batch, r0, seed=11)
    xin["sample"] = xin["sample"].contiguous(memory_format=torch.channels_last)
    for variant in args.variants.split(","):
        wb, ab, opts = bench_unet.plan_for(variant, names)
        model = copy.deepcopy(unet)
        set_plan(quant_layers(model), wb, ab)
        report = convert_(model, BackendConfig.from_mapping(opts), example_kwargs=xin)
        model = model.to(memory_format=torch.channels_last)
        compiled = torch.compile(model, dynamic=False)

        def call():
            with torch.no_grad():
                return compiled(**xin, return_dict=False)[0]
        t = time.time()
        g = capture(call)
        rec = {"compile_s": time.time() - t, "dispatch": report.summary()["paths"],
               "graph_replay": time_graph(g, 100, 10)}
        del g
        rec["profile"] = kernel_breakdown(call, args.calls)
        result["variants"][variant] = rec
        p = rec["profile"]
        print(f"{variant}: replay median {rec['graph_replay']['median_ms']:.2f} ms, kernels "
              f"{p['total_kernel_us'] / 1000:.2f} ms in {p['kernels_per_call']:.0f} kernels; "
              + ", ".join(f"{k} {v / 1000:.2f} ms ({p['by_category_count'][k]:.0f})" for k, v in p["by_category_us"].items()),
              flush=True)
        write_json(args.out, result)
        del compiled, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
