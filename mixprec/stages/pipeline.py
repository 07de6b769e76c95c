"""stage=pipeline (the default): every stage of the search in order, skipping up-to-date ones.

A stage is up to date when its ``<stage>.json`` exists, was made with this run's fingerprints and
the same stage settings, and every stage before it was also up to date.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mixprec.runner import run_stage, with_stage
from mixprec.stages.common import to_dict
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")


def _forced(force, name: str) -> bool:
    if isinstance(force, bool):
        return force
    return name in set(to_dict(force) or [])


def up_to_date(ws: Workspace, name: str, stage_cfg: dict) -> bool:
    if not ws.exists(f"{name}.json"):
        return False
    record = ws.read_json(f"{name}.json", name)
    return record.get("fingerprints") == ws.fingerprints and record.get("config", {}).get("stage") == stage_cfg


def run(cfg: DictConfig, ws: Workspace) -> dict:
    names = list(cfg.stage.stages)
    unknown = [n for n in names if n not in cfg.stage]
    if unknown:
        raise ValueError(f"stage.stages names {unknown}, which have no settings under stage.<name>")
    done, stale = {}, False
    for name in names:
        sub_cfg = with_stage(cfg, cfg.stage[name])
        sub_cfg.stage.record = name
        always = name in set(cfg.stage.get("always_run") or [])
        if not stale and not always and not _forced(cfg.stage.force, name) and up_to_date(ws, name, to_dict(sub_cfg.stage)):
            log.info("pipeline: %s is up to date, skipped (stage.force=true reruns it)", name)
            done[name] = "skipped"
            continue
        stale = True  # everything after a rerun stage depends on it
        log.info("pipeline: running %s", name)
        run_stage(sub_cfg)
        done[name] = "ran"
    return {"stages": done}
