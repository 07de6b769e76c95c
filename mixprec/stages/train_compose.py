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
from typing import Any

import torch

from mixprec.artifacts import TRAIN_COMPOSE_METRICS
from mixprec.context import StageContext, to_dict

log = logging.getLogger("mixprec")

# Keys of the stage config that are not ComposeTrainConfig fields.
_STAGE_KEYS = {"name", "record", "force", "output", "device", "resume", "eval_heldout_prompts", "progress", "save_dtype"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, ws, track = ctx.cfg, ctx.workspace, ctx.tracker
    from mixprec.compose import scenes
    from mixprec.compose.build import load_pipeline
    from mixprec.compose.checker import ATTRIBUTES
    from mixprec.compose.train import ComposeTrainConfig, evaluate_adherence, train_compose
    from mixprec.tiny.train import save_pipeline

    st = to_dict(cfg.stage)
    if str(st.get("save_dtype", "float32")) not in _DTYPES:
        raise ValueError(f"stage.save_dtype must be one of {sorted(_DTYPES)}, got {st.get('save_dtype')!r}")
    train_cfg = ComposeTrainConfig.from_dict({k: v for k, v in st.items() if k not in _STAGE_KEYS and v is not None})
    out = Path(st["output"]) if st.get("output") else ws.path("compose_model")
    device = str(st.get("device") or "auto")
    device = str(cfg.get("device", "auto")) if device == "auto" else device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

    track.update_config({"train_fingerprint": train_cfg.fingerprint()})
    summary = train_compose(out, train_cfg, work_dir=out.with_name(out.name + ".work"), device=device,
                            resume=bool(st.get("resume", True)) and not st.get("force"),
                            log_fn=lambda metrics, step: track.log(metrics, step=step),
                            log_images_fn=lambda key, images, captions: track.log_images(key, images, captions),
                            progress=bool(st.get("progress", True)))
    dtype = _DTYPES[str(st.get("save_dtype", "float32"))]
    if dtype != torch.float32:
        save_pipeline(load_pipeline(out).to(dtype=dtype), out)
    # Measured on the saved folder: what every later stage will load.
    pipe = load_pipeline(out, device=device)
    result = {"output": str(out), "train_fingerprint": summary["fingerprint"], "device": summary["device"],
              "train_time_s": round(summary.get("total_time_s", 0.0), 1)}
    res = evaluate_adherence(pipe, scenes.eval_prompts(int(st.get("eval_heldout_prompts", 64)), "heldout", seed=0),
                             train_cfg.num_inference_steps)
    result.update({f"adherence_heldout_{k}": res[k] for k in ATTRIBUTES + ("all",)})
    track.log_images("final/heldout", res["images"][:32], res["captions"][:32])
    track.summary(result)
    ws.write_json(TRAIN_COMPOSE_METRICS, {**result, "train_summary": summary})
    log.info("compose model saved to %s; held-out adherence %.3f (%s)", out, result["adherence_heldout_all"],
             ", ".join(f"{k} {result[f'adherence_heldout_{k}']:.3f}" for k in ATTRIBUTES))
    return result
