"""Nearest vs GPTQ rounding and per-channel vs per-group scales on the built-in tiny model (CPU).

Calibrates the tiny model once on the calibration prompts of conf/prompts/tiny.yaml (8 train captions,
seed 1) with GPTQ Hessians and group sizes 64/128, then for uniform weight-only plans W3 and W4
(activations in full precision, every layer quantized) and each (rounding, granularity) measures:

- layer level: each layer's relative output error on its calibration inputs,
  tr((W - Wq) H (W - Wq)^T) / tr(W H W^T) with H = E[x x^T], averaged over the layers;
- image level: PSNR and SSIM of the decoded images against full precision, and caption adherence
  (the tiny model's checker, mixprec.tiny.adherence), on held-out evaluation prompts, for several
  prompt-seed sets (mean and std over the sets).

A group size applies to the layers with more input columns than the group (the others keep one
scale per channel; their count is in the output). Bytes: codes at the nominal width plus one fp16
scale per channel (or per channel and group); "bits_per_weight" includes the scales.

    python benchmarks/quant_rounding_tiny.py --out docs/measurements/quant_rounding_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import env_info, write_json  # noqa: E402
from mixprec.calibration import calibrate_layers  # noqa: E402
from mixprec.generation import Sampler  # noqa: E402
from mixprec.metrics import psnr_db, ssim_torch  # noqa: E402
from mixprec.models import ModelSpec, denoiser_of, load_pipeline  # noqa: E402
from mixprec.prompts import resolve_prompt_set  # noqa: E402
from mixprec.quant.gptq import output_error  # noqa: E402
from mixprec.quant.groups import num_groups  # noqa: E402
from mixprec.quantizers import quantize_, set_plan  # noqa: E402
from mixprec.tiny.adherence import check_batch  # noqa: E402


def layer_errors(layers, params) -> dict:
    """Mean relative output error per (bits, rounding, group size)."""
    out = {}
    for bits in (3, 4):
        for g in (0, 64, 128):
            for rounding in ("nearest", "gptq"):
                rel = []
                for name, layer in layers.items():
                    p = params[name]
                    p.rounding = rounding
                    gg = g if (bits, g) in p.group_scales else 0
                    layer.set_bits(bits, None, gg)
                    w = layer.inner.weight
                    ref = output_error(w, torch.zeros_like(w), p.hessian)
                    rel.append(output_error(w, layer.quantized_weight(), p.hessian) / max(ref, 1e-30))
                    layer.set_bits(None, None)
                    layer.drop_cache()
                out[f"w{bits}_g{g}_{rounding}"] = sum(rel) / len(rel)
    for p in params.values():
        p.rounding = "gptq"
    return out


def plan_size(layers, params, bits: int, g: int) -> dict:
    total = scales = grouped = 0
    for name, layer in layers.items():
        w = layer.inner.weight
        gg = g if (bits, g) in params[name].group_scales else 0
        grouped += bool(gg)
        total += w.numel()
        scales += w.shape[0] * num_groups(w[0].numel(), gg)
    return {"grouped_layers": grouped, "params": total, "scales": scales,
            "bits_per_weight": (total * bits + 16 * scales) / total}


def images_for(sampler, layers, params, bits, g, rounding, pairs):
    for p in params.values():
        p.rounding = rounding
    if bits is None:
        set_plan(layers, {})
    else:
        set_plan(layers, {n: bits for n in layers},
                 weight_groups={n: g for n in layers if (bits, g) in params[n].group_scales})
    for layer in layers.values():
        layer.drop_cache()
    return sampler.generate([p for p, _ in pairs], [s for _, s in pairs]).images


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=64, help="held-out prompts per seed set")
    ap.add_argument("--seed-sets", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    pipe = load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"}))
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, resolution=64, num_inference_steps=8, batch_size=16)
    calib = resolve_prompt_set({"split": "train", "n": 8, "seed": 1}, "calibration")
    t = time.perf_counter()
    params = calibrate_layers(layers, lambda: sampler.generate([p for p, _ in calib], [s for _, s in calib],
                                                               decode=False),
                              weight_bits=[3, 4], act_bits=[8], group_sizes=[64, 128], rounding="gptq")
    calib_s = time.perf_counter() - t
    t = time.perf_counter()
    errors = layer_errors(layers, params)
    errors_s = time.perf_counter() - t
    configs = [(b, g, r) for b in (3, 4) for g in (0, 64, 128) for r in ("nearest", "gptq")]
    per_set = {f"w{b}_g{g}_{r}": [] for b, g, r in configs}
    fp_adherence = []
    for k in range(args.seed_sets):
        pairs = resolve_prompt_set({"split": "heldout", "n": args.n, "seed": k}, "evaluation")
        caps = [p for p, _ in pairs]
        ref = images_for(sampler, layers, params, None, 0, "nearest", pairs)
        fp_adherence.append(check_batch(ref, caps)["all"])
        for b, g, r in configs:
            img = images_for(sampler, layers, params, b, g, r, pairs)
            per_set[f"w{b}_g{g}_{r}"].append({
                "psnr_db": sum(psnr_db(ref[i], img[i]) for i in range(len(caps))) / len(caps),
                "ssim": float(ssim_torch(ref.float(), img.float()).mean()),
                "adherence": check_batch(img, caps)["all"]})
    results = {}
    for b, g, r in configs:
        key = f"w{b}_g{g}_{r}"
        row = {"bits": b, "group_size": g, "rounding": r, "layer_rel_output_error": errors[key],
               **plan_size(layers, params, b, g)}
        for m in ("psnr_db", "ssim", "adherence"):
            vals = torch.tensor([v[m] for v in per_set[key]], dtype=torch.float64)
            row[m] = {"mean": float(vals.mean()), "std": float(vals.std()) if len(vals) > 1 else 0.0,
                      "per_seed_set": [float(v) for v in vals]}
        results[key] = row
    write_json(args.out, {
        "what": __doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
        "model": "built-in tiny (mixprec/assets/tiny), 64x64, 8 steps, float32, CPU",
        "calibration_prompts": len(calib), "evaluation": {"prompts_per_set": args.n, "seed_sets": args.seed_sets,
                                                          "split": "heldout"},
        "fp_adherence": fp_adherence, "results": results,
        "seconds": {"calibration_with_hessians": calib_s, "layer_errors_all_configs": errors_s,
                    "total": time.perf_counter() - t0},
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "processor": platform.processor(),
                    "load_avg_1_5_15_before": load_before, "load_avg_1_5_15_after": os.getloadavg(), **env_info()},
    })


if __name__ == "__main__":
    main()
