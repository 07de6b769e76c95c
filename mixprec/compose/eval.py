"""Measurements of the compose model with the project's own quantizers (mixprec.quantizers and
mixprec.calibration, the default recipe: per-channel symmetric weights, per-tensor asymmetric
static activations, BOS token kept out of the cross-attention K/V ranges).

- adherence per attribute on held-out prompts under several seed sets (mean and spread), in full
  precision and under uniform plans (every UNet Linear/Conv2d at the same bits: W8A8, W4A8, W2
  and W4 by default; no layer protected);
- single-layer 4-bit weight sensitivity (1 - SSIM against full precision) of every content layer,
  and the spread between the most and least sensitive tenth.

`python -m mixprec.compose.eval --out report.json` prints and writes the report; docs/compose_model.md
quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Sequence

import torch

from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler, to_pil
from mixprec.metrics import ssim_torch
from mixprec.models import layer_group
from mixprec.quantizers import QuantLayer, quantize_, set_plan
from mixprec.tiny.eval import save_grid

from . import scenes
from .build import NUM_INFERENCE_STEPS, load_pipeline
from .checker import ATTRIBUTES, check_batch

# name -> (weight bits, activation bits); None = full precision.
UNIFORM_POINTS: dict[str, tuple[int | None, int | None]] = {
    "fp": (None, None), "w8a8": (8, 8), "w4a8": (4, 8), "w3a8": (3, 8), "w2a16": (2, None), "w4a16": (4, None),
}
SEED_OFFSETS = (0, 100_000, 200_000)
CONTENT_PATTERNS = ("attn2", "ff")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def adherence_over_seeds(sampler: Sampler, prompts: Sequence[str], seed_sets: Sequence[Sequence[int]]
                         ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Per attribute: mean and spread over the seed sets; and the images of every seed set."""
    per_set, images = [], []
    for seeds in seed_sets:
        imgs = sampler.generate(list(prompts), list(seeds)).images
        images.append(imgs)
        per_set.append(check_batch(imgs, list(prompts)))
    return {k: mean_std([r[k] for r in per_set]) for k in ATTRIBUTES + ("all",)}, images


def calibrated_unet(pipe, sampler: Sampler, calib: Sequence[tuple[str, int]],
                    weight_bits: Sequence[int] = (2, 4, 8), act_bits: Sequence[int] = (8,)) -> dict[str, QuantLayer]:
    """Wrap the UNet's layers and calibrate them on the prompts (the sampler's own timesteps)."""
    layers = quantize_(pipe.unet, skip_bos=True)
    calibrate_layers(layers, lambda: sampler.generate([p for p, _ in calib], [s for _, s in calib], decode=False),
                     weight_bits, act_bits)
    return layers


def uniform_plans(layers: dict[str, QuantLayer], sampler: Sampler, prompts: Sequence[str],
                  seed_sets: Sequence[Sequence[int]], points: dict[str, tuple[int | None, int | None]],
                  grid_dir: str | None = None, report_fn=print) -> dict[str, Any]:
    out = {}
    for name, (w, a) in points.items():
        set_plan(layers, {n: w for n in layers}, {n: a for n in layers})
        out[name], images = adherence_over_seeds(sampler, prompts, seed_sets)
        report_fn(json.dumps({name: {k: round(v["mean"], 4) for k, v in out[name].items()}}))
        if grid_dir:
            save_grid(to_pil(images[0][:32]), os.path.join(grid_dir, f"{name}.png"))
    set_plan(layers)
    return out


def content_sensitivity(layers: dict[str, QuantLayer], sampler: Sampler, prompts: Sequence[str], seeds: Sequence[int],
                        bits: int = 4) -> dict[str, float]:
    """1 - SSIM against full precision with only that content layer's weights at `bits`."""
    set_plan(layers)
    reference = sampler.generate(list(prompts), list(seeds)).images
    out = {}
    for name in layers:
        if layer_group(name, CONTENT_PATTERNS) != "content":
            continue
        set_plan(layers, {name: bits})
        images = sampler.generate(list(prompts), list(seeds)).images
        out[name] = float(1.0 - ssim_torch(reference, images).mean())
    set_plan(layers)
    return out


@torch.no_grad()
def teacher_forced_adherence(pipe, n_prompts: int = 32, timesteps: Sequence[int] = (249, 499, 749, 999),
                             split: str = "heldout", seed: int = 0, layout: str = "centred",
                             jitter: int = 4) -> dict[int, dict[str, float]]:
    """Adherence of ONE denoiser call per timestep t on ground-truth latents noised to t: the x0 it
    predicts, decoded and checked. Separates "the denoiser cannot draw the scene at t" from "the
    sampler never reaches a state like the noised ground truth" (compare with sampled adherence).
    The ground truth is rendered in `layout` (default: the committed config's "centred", jitter 4):
    a model trained on one layout is not expected to reproduce scenes placed the other way."""
    from .train import encode_token_ids, tokenize

    sc = scenes.sample_scenes(n_prompts, seed + 7919, split, layout=layout, jitter=jitter)
    caps = [s.caption for s in sc]
    dev, sf = pipe.unet.device, pipe.vae.config.scaling_factor
    x = scenes.render_batch(sc).to(dev).float().div(127.5).sub(1.0)
    lat = pipe.vae.encode(x).latent_dist.mean * sf
    embeds, pooled = encode_token_ids(pipe, tokenize(pipe.tokenizer, caps).to(dev))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=lat.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).to(dev)
    cond = {"text_embeds": pooled, "time_ids": time_ids.expand(len(caps), -1)}
    alphas = pipe.scheduler.alphas_cumprod.to(dev)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    out = {}
    for t in timesteps:
        a = alphas[t]
        xt = a.sqrt() * lat + (1 - a).sqrt() * noise
        v = pipe.unet(xt, torch.full((len(caps),), t, device=dev), encoder_hidden_states=embeds,
                      added_cond_kwargs=cond).sample
        x0 = a.sqrt() * xt - (1 - a).sqrt() * v  # v-prediction -> x0
        img = ((pipe.vae.decode(x0 / sf).sample + 1) / 2).clamp(0, 1).float().cpu()
        res = check_batch(img, caps)
        out[int(t)] = {k: res[k] for k in ATTRIBUTES + ("all",)} | {"latent_mse": float(((x0 - lat) ** 2).mean())}
    return out


def tenth_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean of the most and of the least sensitive tenth, and their ratio."""
    v = sorted(values)
    k = max(1, len(v) // 10)
    low, high = statistics.fmean(v[:k]), statistics.fmean(v[-k:])
    return {"least_tenth_mean": low, "most_tenth_mean": high, "ratio": high / low if low > 0 else float("inf"),
            "min": v[0], "max": v[-1], "layers": len(v)}


def full_report(pipe, n_prompts: int = 64, seed_offsets: Sequence[int] = SEED_OFFSETS, n_calib: int = 16,
                n_sensitivity: int = 16, batch_size: int = 64, steps: int = NUM_INFERENCE_STEPS,
                points: dict[str, tuple[int | None, int | None]] | None = None, grid_dir: str | None = None
                ) -> dict[str, Any]:
    t0 = time.time()
    sampler = Sampler(pipe, pipe.default_sample_size * pipe.vae_scale_factor, steps, 0.0, batch_size=batch_size)
    heldout = scenes.eval_prompts(n_prompts, split="heldout", seed=0)
    prompts = [p for p, _ in heldout]
    seed_sets = [[s + off for _, s in heldout] for off in seed_offsets]
    report: dict[str, Any] = {"n_prompts": n_prompts, "seed_offsets": list(seed_offsets), "steps": steps}
    chosen = (points or UNIFORM_POINTS).values()
    # every width a point asks for, and 4-bit weights for the sensitivity sweep
    layers = calibrated_unet(pipe, sampler, scenes.eval_prompts(n_calib, split="train", seed=1),
                             weight_bits=sorted({w for w, _ in chosen if w} | {4}),
                             act_bits=sorted({a for _, a in chosen if a} | {8}))
    report["layers"] = len(layers)
    report["heldout"] = uniform_plans(layers, sampler, prompts, seed_sets, points or UNIFORM_POINTS, grid_dir)
    if n_sensitivity:
        sens_set = scenes.eval_prompts(n_sensitivity, split="train", seed=1)
        sens = content_sensitivity(layers, sampler, [p for p, _ in sens_set], [s for _, s in sens_set])
        report["content_w4_sensitivity"] = tenth_spread(list(sens.values())) | {"per_layer": sens}
        print(json.dumps({"content_w4_sensitivity": tenth_spread(list(sens.values()))}))
    train = scenes.eval_prompts(n_prompts, split="train", seed=0)
    report["train_fp"], _ = adherence_over_seeds(sampler, [p for p, _ in train], [[s for _, s in train]])
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=None, help="pipeline folder (default: the packaged compose model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--sensitivity-prompts", type=int, default=16, help="0 skips the sensitivity sweep")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--grids", default=None, help="folder for image grids")
    ap.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS, help="sampler steps")
    ap.add_argument("--points", default=",".join(UNIFORM_POINTS),
                    help=f"comma-separated uniform plans to measure, of {', '.join(UNIFORM_POINTS)}")
    ap.add_argument("--out", default=None, help="write the report here as JSON")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="only the per-timestep teacher-forced adherence (teacher_forced_adherence), not the full report")
    ap.add_argument("--layout", default="centred", choices=scenes.LAYOUTS,
                    help="layout of the teacher-forced ground truth (the one the model was trained on)")
    args = ap.parse_args(argv)
    names = args.points.split(",")
    unknown = [p for p in names if p not in UNIFORM_POINTS]
    if unknown:  # before the pipeline loads: a typo costs nothing
        ap.error(f"unknown --points {unknown}; known: {', '.join(UNIFORM_POINTS)}")
    points = {p: UNIFORM_POINTS[p] for p in names}
    pipe = load_pipeline(args.path, device=args.device)
    if args.teacher_forced:
        report = {"prompts": args.prompts, "layout": args.layout,
                  "teacher_forced": teacher_forced_adherence(pipe, args.prompts, layout=args.layout)}
        print(json.dumps(report, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")
        return
    if args.grids:
        os.makedirs(args.grids, exist_ok=True)
    report = full_report(pipe, args.prompts, n_sensitivity=args.sensitivity_prompts, batch_size=args.batch_size,
                         steps=args.steps, points=points, grid_dir=args.grids)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "content_w4_sensitivity"}
                     | {"content_w4_sensitivity": {k: v for k, v in report.get("content_w4_sensitivity", {}).items()
                                                   if k != "per_layer"}}, indent=1))


if __name__ == "__main__":
    main()
