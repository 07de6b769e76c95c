"""Measurements of the tiny model: caption adherence (full precision and with weight-only fake
quantization of the UNet), generation and load time. `python -m mixprec.tiny.eval` prints them as
JSON; docs/tiny_model.md quotes its output.

The weight quantizer here is deliberately minimal and private (symmetric, per output channel,
round-to-nearest): it only shows that the model is sensitive to weight precision. The project's
real quantizers live in mixprec/quantizers.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any

import torch

from . import shapes
from .build import generate, load_pipeline

ATTRS = ("all", "shape_colour", "background", "shape")
DEFAULT_STEPS = 8


@torch.no_grad()
def _fake_quant_weights_(module: torch.nn.Module, bits: int) -> int:
    """Quantize-dequantize every Linear/Conv2d weight of module in place; returns how many layers.

    scale = max|w| / (2^(b-1) - 1) per output channel, q = clamp(round(w / scale)).
    """
    qmax = 2 ** (bits - 1) - 1
    n = 0
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight
            flat = w.reshape(w.shape[0], -1)
            scale = flat.abs().amax(dim=1).clamp_min(1e-12) / qmax
            q = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
            w.copy_((q * scale[:, None]).reshape_as(w))
            n += 1
    return n


def adherence(pipe, prompts: list[tuple[str, int]], steps: int = DEFAULT_STEPS, batch_size: int = 16) -> dict[str, Any]:
    from .adherence import check_batch

    caps = [c for c, _ in prompts]
    imgs = generate(pipe, caps, [s for _, s in prompts], num_inference_steps=steps, batch_size=batch_size)
    res = check_batch(imgs, caps)
    return {k: res[k] for k in ATTRS} | {"n": res["n"], "images": imgs, "captions": caps}


def quantized_adherence(pipe, prompts, bits: int, steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """Adherence with the UNet's weights fake-quantized to `bits`; the pipeline is left unchanged."""
    original = pipe.unet
    pipe.unet = copy.deepcopy(original)
    try:
        n_layers = _fake_quant_weights_(pipe.unet, bits)
        res = adherence(pipe, prompts, steps)
    finally:
        pipe.unet = original
    res["layers"] = n_layers
    return res


def timings(path=None, n_images: int = 8, steps: int = DEFAULT_STEPS, repeats: int = 3) -> dict[str, float]:
    """Seconds to load the pipeline and to generate n_images (best of repeats, after one warm-up)."""
    t0 = time.perf_counter()
    pipe = load_pipeline(path)
    load_s = time.perf_counter() - t0
    prompts = shapes.eval_prompts(n_images, split="heldout")
    caps, seeds = [c for c, _ in prompts], [s for _, s in prompts]
    generate(pipe, caps, seeds, num_inference_steps=steps)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, caps, seeds, num_inference_steps=steps)
        best = min(best, time.perf_counter() - t0)
    return {"load_s": load_s, f"generate_{n_images}_s": best, "threads": torch.get_num_threads()}


def full_report(path=None, n_prompts: int = 64, steps: int = DEFAULT_STEPS, bits=(8, 4, 2),
                grid_dir: str | None = None) -> dict[str, Any]:
    pipe = load_pipeline(path)
    sets = {"heldout": shapes.eval_prompts(n_prompts, split="heldout", seed=0),
            "train": shapes.eval_prompts(n_prompts, split="train", seed=0)}
    report: dict[str, Any] = {"n_prompts": n_prompts, "steps": steps}
    for name, prompts in sets.items():
        res = adherence(pipe, prompts, steps)
        report[f"fp_{name}"] = {k: res[k] for k in ATTRS}
        if grid_dir:
            save_grid(res["images"], os.path.join(grid_dir, f"fp_{name}.png"))
        for b in bits:
            q = quantized_adherence(pipe, prompts, b, steps)
            report[f"w{b}_{name}"] = {k: q[k] for k in ATTRS}
            if grid_dir:
                save_grid(q["images"], os.path.join(grid_dir, f"w{b}_{name}.png"))
    return report


def save_grid(images, path: str, cols: int = 8) -> None:
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--path", default=None, help="pipeline folder (default: the packaged tiny model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grids", default=None, help="folder for image grids")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    if not args.no_timing:
        out["timing"] = timings(args.path, steps=args.steps)
    out.update(full_report(args.path, args.prompts, args.steps, grid_dir=args.grids))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
