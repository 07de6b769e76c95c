"""Dispatch a composed config to its stage module and record what the stage did.

Every stage is a module ``mixprec.stages.<name>`` with ``run(cfg, ws) -> dict`` (its headline
numbers). The runner builds the workspace, times the stage and writes ``<stage>.json``.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mixprec.settings import check_stage
from mixprec.stages.common import to_dict, tracker, workspace

log = logging.getLogger("mixprec")

STAGES = ("inspect", "calibrate", "sensitivity", "allocate", "select", "infer", "evaluate", "report",
          "benchmark", "train_tiny", "pipeline")


def stage_module(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    try:
        return importlib.import_module(f"mixprec.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mixprec.stages.{name}":
            raise NotImplementedError(f"stage {name!r} is not available in this version of mixprec") from exc
        raise


def with_stage(cfg: DictConfig, stage_cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``stage`` node is ``stage_cfg`` (how the pipeline runs its sub-stages)."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(sub, False)
    sub.stage = OmegaConf.create(OmegaConf.to_container(stage_cfg, resolve=True))
    return sub


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    name = str(cfg.stage.name)
    module = stage_module(name)
    # Typos and wrong types stop here, before the workspace, the tracker or a model is touched.
    check_stage(to_dict(cfg.stage))
    ws = workspace(cfg)
    start = time.perf_counter()
    if name == "pipeline":  # its sub-stages are runs of their own
        headline = module.run(cfg, ws) or {}
    else:
        # One W&B run per stage, marked failed (and finished) when the stage raises.
        with tracker(cfg, ws, str(cfg.stage.get("record", name))) as track:
            headline = module.run(cfg, ws) or {}
            track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float, str))})
    wall = time.perf_counter() - start
    # The pipeline runs one stage module under several entries (allocate_weight, allocate_act).
    ws.record_stage(str(cfg.stage.get("record", name)), to_dict(cfg), wall, headline)
    log.info("stage %s finished in %.1f s; workspace %s", name, wall, ws.root)
    return headline
