"""Dispatch a composed config to its stage module and record what the stage did.

Every stage is a module ``mixprec.stages.<name>`` with ``run(ctx) -> dict`` (its headline
numbers), where ``ctx`` is the :class:`~mixprec.context.StageContext` the runner builds: the
stage's typed settings, the typed run settings (model, recipe, prompts, device, seed), the
workspace and the stage's tracker. The Hydra config stops here. The runner times the stage and writes
``<stage>.json``; for ``stage=pipeline`` it sequences the sub-stages itself.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from omegaconf import DictConfig

from mixprec.context import StageContext, open_tracker, run_settings, to_dict, workspace
from mixprec.settings import check_stage
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

STAGES = ("inspect", "calibrate", "sensitivity", "allocate", "select", "infer", "evaluate", "report",
          "benchmark", "latency_table", "train_tiny", "train_compose", "pipeline", "export")


def stage_module(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    try:
        return importlib.import_module(f"mixprec.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mixprec.stages.{name}":
            raise NotImplementedError(f"stage {name!r} is not available in this version of mixprec") from exc
        raise


def run_pipeline(cfg: DictConfig, ws: Workspace) -> dict[str, Any]:
    """Every sub-stage of ``stage.stages`` in order, each a run of its own; up-to-date ones are skipped,
    final plans selected by hand are kept (see :mod:`mixprec.stages.pipeline`)."""
    from mixprec.stages import pipeline

    done, stale = {}, False
    for name, sub_cfg, forced in pipeline.sub_stages(cfg):
        if not pipeline.must_run(cfg, ws, name, sub_cfg, forced, stale):
            log.info("pipeline: %s is up to date, skipped (stage.force=[%s] reruns it)", name, name)
            done[name] = "skipped"
            continue
        kept = pipeline.hand_selected(ws, to_dict(sub_cfg.stage)) if name == "select" and not forced else None
        stale = True  # everything after a rerun (or kept) stage depends on it
        if kept:
            log.warning("pipeline: keeping the final plans selected by hand with %s; the pipeline would select "
                        "with %s. `python run.py stage.force=[select]` replaces them.",
                        kept, {k: to_dict(sub_cfg.stage).get(k) for k in kept})
            done[name] = "kept hand-selected final plans"
            continue
        log.info("pipeline: running %s%s", name, " (forced)" if forced else "")
        run_stage(sub_cfg)
        done[name] = "ran"
    return {"stages": done}


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    name = str(cfg.stage.name)
    module = stage_module(name)
    # Typos and wrong types stop here, before the workspace, the tracker or a model is touched.
    settings = check_stage(to_dict(cfg.stage))
    ws = workspace(cfg)
    # The pipeline runs one stage module under several entries (allocate_weight, allocate_act).
    record = str(cfg.stage.get("record", name))
    start = time.perf_counter()
    if name == "pipeline":  # its sub-stages are runs of their own
        headline = run_pipeline(cfg, ws)
    else:
        # One W&B run per stage, marked failed (and finished) when the stage raises.
        with open_tracker(cfg, ws, record) as track:
            headline = module.run(StageContext(settings, run_settings(cfg), ws, track, cfg)) or {}
            track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float, str))})
    wall = time.perf_counter() - start
    ws.record_stage(record, to_dict(cfg), wall, headline)
    log.info("stage %s finished in %.1f s; workspace %s", name, wall, ws.root)
    return headline
