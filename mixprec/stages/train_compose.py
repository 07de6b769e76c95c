"""stage=train_compose: train the built-in compose model (few-step, compositional prompts).

Writes the trained diffusers folder to `stage.output` (default: `<workspace>/compose_model`; pass
`stage.output=mixprec/assets/compose` to replace the shipped model, or load the new one with
`model=compose model.path=<folder>`), keeps a resumable checkpoint next to it, stores the weights
in `stage.save_dtype` and measures per-attribute adherence on held-out prompts of the saved model.
Losses, adherence and sample grids go to the tracker.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, get_args

import torch

from mixprec.artifacts import TRAIN_COMPOSE_METRICS
from mixprec.context import StageContext
from mixprec.settings import SaveDtype

log = logging.getLogger("mixprec")

_DTYPES = {name: getattr(torch, name) for name in get_args(SaveDtype)}


def run(ctx: StageContext) -> dict[str, Any]:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    from mixprec.compose import scenes
    from mixprec.compose.build import load_pipeline
    from mixprec.compose.checker import ATTRIBUTES
    from mixprec.compose.train import ComposeTrainConfig, evaluate_adherence, train_compose
    from mixprec.tiny.train import save_pipeline, train_from_settings

    out = Path(s.output) if s.output else ws.path("compose_model")
    device = ctx.run.device if str(s.device or "auto") == "auto" else str(s.device)
    train_cfg, summary = train_from_settings(s, ComposeTrainConfig, train_compose, out, device, track)
    dtype = _DTYPES[str(s.save_dtype)]
    if dtype != torch.float32:
        save_pipeline(load_pipeline(out).to(dtype=dtype), out)
    # Measured on the saved folder: what every later stage will load.
    pipe = load_pipeline(out, device=device)
    result = {"output": str(out), "train_fingerprint": summary["fingerprint"], "device": summary["device"],
              "train_time_s": round(summary.get("total_time_s", 0.0), 1)}
    res = evaluate_adherence(pipe, scenes.eval_prompts(int(s.eval_heldout_prompts), "heldout", seed=0),
                             train_cfg.num_inference_steps)
    result.update({f"adherence_heldout_{k}": res[k] for k in ATTRIBUTES + ("all",)})
    track.log_images("final/heldout", res["images"][:32], res["captions"][:32])
    track.summary(result)
    ws.write_json(TRAIN_COMPOSE_METRICS, {**result, "train_summary": summary})
    log.info("compose model saved to %s; held-out adherence %.3f (%s)", out, result["adherence_heldout_all"],
             ", ".join(f"{k} {result[f'adherence_heldout_{k}']:.3f}" for k in ATTRIBUTES))
    return result
