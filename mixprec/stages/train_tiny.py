"""stage=train_tiny: train the built-in tiny text-to-image model.

Writes the trained diffusers folder to `stage.output` (default: `<workspace>/tiny_model`; pass
`stage.output=mixprec/assets/tiny` to replace the shipped model, or load the new one with
`model.path=<folder>`), keeps a resumable checkpoint next to it, and measures caption adherence
on held-out prompts. Losses, adherence and sample grids go to the tracker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mixprec.artifacts import TRAIN_TINY_METRICS
from mixprec.context import StageContext

log = logging.getLogger("mixprec")


def run(ctx: StageContext) -> dict[str, Any]:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    from mixprec.tiny import shapes
    from mixprec.tiny.build import load_pipeline
    from mixprec.tiny.eval import adherence
    from mixprec.tiny.train import TrainConfig, train_from_settings, train_tiny

    out = Path(s.output) if s.output else ws.path("tiny_model")
    device = ctx.run.device if str(s.device or "auto") == "auto" else str(s.device)
    train_cfg, summary = train_from_settings(s, TrainConfig, train_tiny, out, device, track)
    # Measured on the saved folder, on the CPU: what every later stage will load.
    pipe = load_pipeline(out)
    n = int(s.eval_heldout_prompts)
    result = {"output": str(out), "train_fingerprint": summary["fingerprint"], "device": summary["device"],
              "train_time_s": round(summary.get("total_time_s", 0.0), 1)}
    for split in ("heldout", "train"):
        res = adherence(pipe, shapes.eval_prompts(n, split=split, seed=0), train_cfg.num_inference_steps)
        for k in ("all", "shape_colour", "background", "shape"):
            result[f"adherence_{split}_{k}"] = res[k]
        if split == "heldout":
            track.log_images("final/heldout", res["images"][:32], res["captions"][:32])
    track.summary(result)
    ws.write_json(TRAIN_TINY_METRICS, {**result, "train_summary": summary})
    log.info("tiny model saved to %s; held-out adherence %.3f (colour %.3f, background %.3f, shape %.3f)",
             out, result["adherence_heldout_all"], result["adherence_heldout_shape_colour"],
             result["adherence_heldout_background"], result["adherence_heldout_shape"])
    return result
