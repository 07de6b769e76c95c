"""stage=infer: run the final plans and measure what they cost and save.

Loads ``final_weight_mp.yaml`` (and ``final_act_mp.yaml`` unless ``stage.use_act_plan=false``),
generates the inference prompts into ``generated_images/`` (full-precision references under
``generated_images/full_precision/``; prompt and seed in each file name and PNG metadata) and
returns the numbers the runner writes to ``infer.json``: PSNR/SSIM against full precision,
caption adherence where the model has a checker, weight bytes, latency, and the bits each layer
actually ran with and on which kernel.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig

from mixprec import search
from mixprec.generation import to_pil
from mixprec.quantizers import set_plan
from mixprec.selection import adherence, image_scores, slug
from mixprec.stages.common import load_calibrated, prompt_set, tracker
from mixprec.stages.select import check_plan_fingerprints, output_paths
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

IMAGES_DIR = "generated_images"


def _timed_generate(sampler, prompts, seeds):
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = sampler.generate(prompts, seeds)
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    return out.images, time.perf_counter() - start


def save_images(ws: Workspace, folder: str, images: torch.Tensor, pairs) -> list[str]:
    from PIL.PngImagePlugin import PngInfo

    names = []
    for i, (pil, (prompt, seed)) in enumerate(zip(to_pil(images), pairs)):
        name = f"{folder}/{i:03d}_seed{seed}_{slug(prompt)}.png"
        info = PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("seed", str(seed))
        with ws.atomic_path(name) as tmp:
            pil.save(tmp, format="PNG", pnginfo=info)
        names.append(name)
    return names


def weight_bytes(layers, census_rows) -> dict[str, Any]:
    params = {r.name: r.params for r in census_rows}
    out_ch = {r.name: r.out_channels for r in census_rows}
    applied = {n: (16 if l.w_bits is None else l.w_bits) for n, l in layers.items()}
    packed = search.plan_bytes(applied, params, out_ch)
    fp16 = sum(2 * params[n] for n in applied)
    return {"quantized_layers_bytes": packed, "quantized_layers_fp16_bytes": fp16,
            "quantized_layers_mib": packed / search.MIB, "fp16_mib": fp16 / search.MIB,
            "compression": fp16 / packed if packed else None}


def run(cfg: DictConfig, ws: Workspace) -> dict:
    s = cfg.stage
    final = output_paths(s.get("plan_dir"))
    producer = f"select stage.output_dir={s.plan_dir}" if s.get("plan_dir") else "select"
    weight_plan = search.read_plan(ws.require(final["weight"], producer))
    check_plan_fingerprints(ws, weight_plan.header, final["weight"])
    act_plan = None
    if s.use_act_plan:
        act_plan = search.read_plan(ws.require(final["act"], producer))
        check_plan_fingerprints(ws, act_plan.header, final["act"])
    bundle = load_calibrated(cfg, ws, batch_size=int(s.batch_size))
    pairs = prompt_set(cfg, "inference")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]

    with tracker(cfg, ws, "infer") as track:
        fp_images, fp_s = _timed_generate(bundle.sampler, prompts, seeds)
        set_plan(bundle.layers, weight_bits=weight_plan.bits, act_bits=act_plan.bits if act_plan else None)
        dispatch = {"backend": "fake", "layers": {n: "fake" for n, l in bundle.layers.items()
                                                  if l.w_bits is not None or l.a_bits is not None}}
        q_images, q_s = _timed_generate(bundle.sampler, prompts, seeds)
        save_images(ws, IMAGES_DIR, q_images, pairs)
        if s.save_full_precision:
            save_images(ws, f"{IMAGES_DIR}/full_precision", fp_images, pairs)
        scores = image_scores(fp_images, q_images, prompts, bundle.spec.checker)
        fp_check = adherence(fp_images, prompts, bundle.spec.checker)
        fp_adh = fp_check["all"] if fp_check else None
        applied = {n: {"w": l.w_bits, "a": l.a_bits} for n, l in bundle.layers.items()}
        headline = {
            "images": len(pairs),
            "psnr_db": scores["psnr_db"], "ssim": scores["ssim"], "mse": scores["mse"],
            "adherence": scores.get("adherence"), "adherence_detail": scores.get("adherence_detail"),
            "adherence_full_precision": fp_adh,
            "weights": weight_bytes(bundle.layers, bundle.census()),
            "weight_plan": {"path": final["weight"], "mean_bits": weight_plan.header.get("achieved_mean_bits")},
            "act_plan": {"path": final["act"], "mean_bits": act_plan.header.get("achieved_mean_bits")} if act_plan else None,
            "latency_s": {"full_precision": fp_s, "quantized": q_s, "device": str(bundle.device),
                          "note": "fake quantization (quantize-dequantize in float) measures quality, not speed; "
                                  "stage=benchmark measures real kernels"},
            "dispatch_counts": {"fake": len(dispatch["layers"]),
                                "full_precision": len(bundle.layers) - len(dispatch["layers"])},
            "applied_bits": applied,
            "per_image": scores["per_image"],
        }
        track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
        track.log_images("infer/quantized", to_pil(q_images), prompts)
        track.log_images("infer/full_precision", to_pil(fp_images), prompts)
    set_plan(bundle.layers)
    log.info("infer: %d images, PSNR %.2f dB, SSIM %.4f%s; weights %.2f MiB (fp16 %.2f MiB)", len(pairs),
             scores["psnr_db"], scores["ssim"],
             f", adherence {scores['adherence']:.3f} (fp {fp_adh:.3f})" if scores.get("adherence") is not None else "",
             headline["weights"]["quantized_layers_mib"], headline["weights"]["fp16_mib"])
    return headline
