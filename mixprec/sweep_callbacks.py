"""Hydra callbacks for sweeps: what happens once every job of a multirun has finished.

:class:`ParetoCallback` (wired in ``sweeps/allocate.yaml``) collects every candidate plan header
of the workspace(s) the jobs wrote to, marks the Pareto front per kind (size: MiB; objective: the
plans' ``score``), writes ``pareto.csv`` and ``pareto.png`` next to the plans, records the sweep's
wall time in ``allocate_sweep.json`` and logs the table and the plot to W&B (tracking enabled).

It runs in the launching process and reads the plans from disk, so it works the same with the
basic launcher and with launchers that run jobs elsewhere (submitit, joblib): the job configs
Hydra saved under the sweep folder say which workspaces to look in.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mixprec")


def _workspaces(config: DictConfig, sweep_dir: Path | None) -> dict[str, DictConfig]:
    """workspace path -> one job config that wrote there (the sweep may vary the model)."""
    found: dict[str, DictConfig] = {}
    if sweep_dir is not None and sweep_dir.exists():
        for p in sorted(sweep_dir.glob("*/.hydra/config.yaml")):
            try:
                job = OmegaConf.load(p)
                root = str(Path(str(OmegaConf.select(job, "paths.workspace", throw_on_missing=True))).resolve())
            except Exception as exc:  # a job config we cannot resolve must not lose the others' front
                log.warning("pareto: cannot read %s (%s)", p, exc)
                continue
            found.setdefault(root, job)
    if not found:
        root = str(Path(str(config.paths.workspace)).resolve())
        found[root] = config
    return found


class ParetoCallback(Callback):
    def __init__(self, log_to_tracking: bool = True) -> None:
        self.log_to_tracking = log_to_tracking
        self._start: float | None = None
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        try:
            self._sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception:
            self._sweep_dir = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mixprec.stages.allocate import log_pareto, write_pareto
        from mixprec.workspace import Workspace

        wall = time.perf_counter() - self._start if self._start is not None else None
        if self._sweep_dir is None:
            try:
                self._sweep_dir = Path(str(config.hydra.sweep.dir))
            except Exception:
                pass
        for root, job_cfg in _workspaces(config, self._sweep_dir).items():
            fps = None
            try:
                from mixprec.stages.common import fingerprints
                fps = fingerprints(job_cfg)
            except Exception as exc:
                log.warning("pareto: no fingerprints for %s (%s); collecting every plan there", root, exc)
            ws = Workspace(root, fingerprints=fps)
            summary = write_pareto(ws.root, fps, float(OmegaConf.select(job_cfg, "stage.pareto_size_rtol", default=1e-3)))
            ws.write_json("allocate_sweep.json", {
                "sweep_dir": str(self._sweep_dir) if self._sweep_dir else None,
                "wall_time_s": round(wall, 3) if wall is not None else None,
                "candidates": summary["candidates"], "pareto": summary["pareto"],
                "pareto_csv": summary["csv"], "pareto_png": summary["png"],
            })
            log.info("pareto: %d candidates, %d on the front -> %s%s", summary["candidates"], summary["pareto"],
                     summary["csv"], f" (sweep took {wall:.1f} s)" if wall is not None else "")
            if self.log_to_tracking and OmegaConf.select(job_cfg, "tracking.mode", default="disabled") != "disabled":
                from mixprec.stages.common import tracker
                with tracker(job_cfg, ws, "pareto", {"sweep_dir": str(self._sweep_dir)}) as track:
                    log_pareto(track, summary, ws.root)
                    if wall is not None:
                        track.summary({"sweep_wall_time_s": wall})
