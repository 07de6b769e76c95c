"""stage=pipeline (the default): every stage of the search in order, skipping up-to-date ones.

A stage is up to date when its ``<stage>.json`` exists, was made with this run's fingerprints and
the same stage settings, and every stage before it was also up to date. ``stage.force=true`` reruns
every stage, each with ``force`` set (sensitivity measures again instead of reusing its records);
``stage.force=[sensitivity,select]`` does so for the stages named (and reruns the ones after them).
Final plans that the user chose by hand (``stage=select`` with other settings than the pipeline's
select entry) are kept: the pipeline says what it would change and leaves them unless
``stage.force`` names select.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mixprec.runner import run_stage, with_stage
from mixprec.settings import is_forced
from mixprec.stages.common import to_dict
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

# Settings that do not change what a stage computes (batch_size: only which plan a selection keeps).
_NOT_COMPARED = ("record", "force", "progress")


def _compared(stage_cfg: dict | None, also: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in (stage_cfg or {}).items() if k not in _NOT_COMPARED + also}


def up_to_date(ws: Workspace, name: str, stage_cfg: dict) -> bool:
    if not ws.exists(f"{name}.json"):
        return False
    record = ws.read_json(f"{name}.json", name)
    return (record.get("fingerprints") == ws.fingerprints and
            _compared(record.get("config", {}).get("stage")) == _compared(stage_cfg))


def hand_selected(ws: Workspace, select_cfg: dict) -> dict | None:
    """The settings of a selection made outside the pipeline, when they differ from the pipeline's."""
    from mixprec.stages.select import output_paths

    finals = output_paths(select_cfg.get("output_dir"))
    if not ws.exists("select.json") or not ws.exists(finals["weight"]):
        return None
    made = ws.read_json("select.json", "select").get("config", {}).get("stage") or {}
    mine, theirs = _compared(select_cfg, ("batch_size",)), _compared(made, ("batch_size",))
    if made.get("record") == "select" or mine == theirs:
        return None  # the pipeline made them, or the same settings would
    return {k: theirs.get(k) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)}


def run(cfg: DictConfig, ws: Workspace) -> dict:
    names = list(cfg.stage.stages)
    unknown = [n for n in names if n not in cfg.stage]
    if unknown:
        raise ValueError(f"stage.stages names {unknown}, which have no settings under stage.<name>")
    force = to_dict(cfg.stage.force)
    done, stale = {}, False
    for name in names:
        sub_cfg = with_stage(cfg, cfg.stage[name])
        sub_cfg.stage.record = name
        forced = is_forced(force, name)
        sub_cfg.stage.force = forced or is_forced(to_dict(sub_cfg.stage.get("force")), name)
        always = name in set(cfg.stage.get("always_run") or [])
        if not stale and not always and not forced and up_to_date(ws, name, to_dict(sub_cfg.stage)):
            log.info("pipeline: %s is up to date, skipped (stage.force=[%s] reruns it)", name, name)
            done[name] = "skipped"
            continue
        if name == "select" and not forced:
            kept = hand_selected(ws, to_dict(sub_cfg.stage))
            if kept:
                log.warning("pipeline: keeping the final plans selected by hand with %s; the pipeline would select "
                            "with %s. `python run.py stage.force=[select]` replaces them.",
                            kept, {k: to_dict(sub_cfg.stage).get(k) for k in kept})
                done[name] = "kept hand-selected final plans"
                stale = True
                continue
        stale = True  # everything after a rerun stage depends on it
        log.info("pipeline: running %s%s", name, " (forced)" if forced else "")
        run_stage(sub_cfg)
        done[name] = "ran"
    return {"stages": done}
