"""stage=pipeline (the default): every stage of the search in order, skipping up-to-date ones.

A stage is up to date when its ``<stage>.json`` exists, was made with this run's fingerprints and
the same stage settings, and every stage before it was also up to date. ``stage.force=true`` reruns
every stage, each with ``force`` set (sensitivity measures again instead of reusing its records);
``stage.force=[sensitivity,select]`` does so for the stages named (and reruns the ones after them).
Final plans that the user chose by hand (``stage=select`` with other settings than the pipeline's
select entry) are kept: the pipeline says what it would change and leaves them unless
``stage.force`` names select.

The runner (:func:`mixprec.runner.run_pipeline`) sequences the sub-stages, each a run of its own;
this module only decides what each one is and whether it must run.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from mixprec.artifacts import final_plan_paths, stage_record
from mixprec.context import to_dict
from mixprec.settings import is_forced
from mixprec.workspace import Workspace

# Settings that do not change what a stage computes (batch_size: only which plan a selection keeps).
_NOT_COMPARED = ("record", "force", "progress")


def with_stage(cfg: DictConfig, stage_cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``stage`` node is ``stage_cfg`` (how the pipeline runs its sub-stages)."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.set_struct(sub, False)
    sub.stage = OmegaConf.create(OmegaConf.to_container(stage_cfg, resolve=True))
    return sub


def _compared(stage_cfg: dict | None, also: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in (stage_cfg or {}).items() if k not in _NOT_COMPARED + also}


def up_to_date(ws: Workspace, name: str, stage_cfg: dict) -> bool:
    if not ws.exists(stage_record(name)):
        return False
    record = ws.read_json(stage_record(name), name)
    return (record.get("fingerprints") == ws.fingerprints and
            _compared(record.get("config", {}).get("stage")) == _compared(stage_cfg))


def hand_selected(ws: Workspace, select_cfg: dict) -> dict | None:
    """The settings of a selection made outside the pipeline, when they differ from the pipeline's."""
    finals = final_plan_paths(select_cfg.get("output_dir"))
    if not ws.exists(stage_record("select")) or not ws.exists(finals["weight"]):
        return None
    made = ws.read_json(stage_record("select"), "select").get("config", {}).get("stage") or {}
    mine, theirs = _compared(select_cfg, ("batch_size",)), _compared(made, ("batch_size",))
    if made.get("record") == "select" or mine == theirs:
        return None  # the pipeline made them, or the same settings would
    return {k: theirs.get(k) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)}


def sub_stages(cfg: DictConfig) -> list[tuple[str, DictConfig, bool]]:
    """(record name, composed config, forced) of every sub-stage, in order; unknown names fail before
    anything runs. A forced sub-stage gets ``stage.force`` set."""
    names = list(cfg.stage.stages)
    unknown = [n for n in names if n not in cfg.stage]
    if unknown:
        raise ValueError(f"stage.stages names {unknown}, which have no settings under stage.<name>")
    force = to_dict(cfg.stage.force)
    out = []
    for name in names:
        sub_cfg = with_stage(cfg, cfg.stage[name])
        sub_cfg.stage.record = name
        forced = is_forced(force, name)
        sub_cfg.stage.force = forced or is_forced(to_dict(sub_cfg.stage.get("force")), name)
        out.append((name, sub_cfg, forced))
    return out


def must_run(cfg: DictConfig, ws: Workspace, name: str, sub_cfg: DictConfig, forced: bool, stale: bool) -> bool:
    """Whether a sub-stage runs: something before it ran (``stale``), it is always run or forced, or its
    record is missing or out of date."""
    always = name in set(cfg.stage.get("always_run") or [])
    return stale or always or forced or not up_to_date(ws, name, to_dict(sub_cfg.stage))
