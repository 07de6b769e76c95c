"""Hydra callbacks for sweeps: what happens as each job starts and once every job has finished.

:class:`LocalJobsCallback` gives each job of a ``submitit_local`` multirun its own GPU(s) and
thread count; :class:`SensitivityMergeCallback` checks a sharded sensitivity sweep, records it and
names what is left to run (``sweeps/sensitivity_*.yaml``, docs/scale_out.md).

:class:`ParetoCallback` (wired in ``sweeps/allocate.yaml``) collects every candidate plan header
of the workspace(s) the jobs wrote to, marks the Pareto front per kind (size: MiB; objective: the
plans' ``score``), writes ``pareto.csv`` and ``pareto.png`` next to the plans, records the sweep's
wall time in ``allocate_sweep.json`` and logs the table and the plot to W&B (tracking enabled).

It runs in the launching process and reads the plans from disk, so it works the same with the
basic launcher and with launchers that run jobs elsewhere (submitit, joblib): the job configs
Hydra saved under the sweep folder say which workspaces to look in.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mixprec.artifacts import stage_record  # no torch: the launcher process stays light
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
        from mixprec.allocation import log_pareto, write_pareto
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
                from mixprec.context import fingerprints
                fps = fingerprints(job_cfg)
            except Exception as exc:
                log.warning("pareto: no fingerprints for %s (%s); collecting every plan there", root, exc)
            ws = Workspace(root, fingerprints=fps)
            summary = write_pareto(ws.root, fps, float(OmegaConf.select(job_cfg, "stage.pareto_size_rtol", default=1e-3)))
            ws.write_json(stage_record("allocate_sweep"), {
                "sweep_dir": str(self._sweep_dir) if self._sweep_dir else None,
                "wall_time_s": round(wall, 3) if wall is not None else None,
                "candidates": summary["candidates"], "pareto": summary["pareto"],
                "pareto_csv": summary["csv"], "pareto_png": summary["png"],
            })
            log.info("pareto: %d candidates, %d on the front -> %s%s", summary["candidates"], summary["pareto"],
                     summary["csv"], f" (sweep took {wall:.1f} s)" if wall is not None else "")
            if self.log_to_tracking and OmegaConf.select(job_cfg, "tracking.mode", default="disabled") != "disabled":
                from mixprec.context import open_tracker
                with open_tracker(job_cfg, ws, "pareto", {"sweep_dir": str(self._sweep_dir)}) as track:
                    log_pareto(track, summary, ws.root)
                    if wall is not None:
                        track.summary({"sweep_wall_time_s": wall})


# --------------------------------------------------------------------------- scale-out
def _job_configs(sweep_dir: Path | None) -> list[DictConfig]:
    """The task config of every job of a sweep, as Hydra saved it (works for every launcher)."""
    out = []
    if sweep_dir is not None and sweep_dir.exists():
        for p in sorted(sweep_dir.glob("*/.hydra/config.yaml"), key=lambda p: (len(p.parts[-3]), p.parts[-3])):
            try:
                out.append(OmegaConf.load(p))
            except Exception as exc:  # one unreadable job config must not hide the others
                log.warning("cannot read %s (%s)", p, exc)
    return out


def _host_gpus() -> list[str]:
    """GPUs the launching process may use: its CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists."""
    import subprocess

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


class LocalJobsCallback(Callback):
    """Gives each job of a ``submitit_local`` multirun its own GPU(s) and its share of CPU threads.

    submitit's local executor sets the same CUDA_VISIBLE_DEVICES (the first ``gpus_per_node``
    GPUs) for every job, so n shards would all run on GPU 0. This callback records the host's GPUs
    when the multirun starts and, as each job starts (in the job's own process, before anything
    touches CUDA), narrows the job to slot ``hydra.job.num % (GPUs // gpus_per_node)``; more jobs
    than slots share GPUs round-robin. With ``hydra.launcher.cpus_per_task`` set, the job's
    intra-op threads are capped to it: jobs that run at once on a CPU otherwise each start one
    thread per core and slow each other down many times over. Jobs of other launchers are left
    alone (SLURM assigns GPUs and CPUs itself).
    """

    def __init__(self, gpus: list[int | str] | None = None) -> None:
        self.gpus = [str(g) for g in gpus] if gpus is not None else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.gpus is None:
            self.gpus = _host_gpus()
        log.info("local GPUs for the sweep's jobs: %s", ",".join(self.gpus) or "none")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") != "local":
            return
        cpus = int(OmegaConf.select(config, "hydra.launcher.cpus_per_task", default=0) or 0)
        if cpus > 0:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(cpus)
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(cpus)
        per_job = int(OmegaConf.select(config, "hydra.launcher.gpus_per_node", default=0) or 0)
        if per_job <= 0 or not self.gpus:
            return
        slots = len(self.gpus) // per_job
        if slots == 0:
            log.warning("%d GPU(s) per job asked for, %d on this host: leaving CUDA_VISIBLE_DEVICES=%s", per_job,
                        len(self.gpus), os.environ.get("CUDA_VISIBLE_DEVICES"))
            return
        slot = int(config.hydra.job.num) % slots
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[slot * per_job:(slot + 1) * per_job])
        log.info("job %s runs on GPU(s) %s", config.hydra.job.num, os.environ["CUDA_VISIBLE_DEVICES"])


def _record_path(root: Path, job_cfg: DictConfig) -> Path:
    """Where the runner wrote this job's ``<stage>.json`` (the sweeps give each shard its own)."""
    record = OmegaConf.select(job_cfg, "stage.record", default=None) or "sensitivity"
    return root / stage_record(record)


class SensitivityMergeCallback(Callback):
    """Once every shard job of a sensitivity multirun has finished: check, merge, record the sweep.

    The last shard to finish merges in its own job (the model is loaded there already). This
    callback, in the launching process, reads the shard files (no model) and writes
    ``sensitivity.json`` (the merging shard's record with the sweep's wall time) and
    ``sensitivity_sweep.json`` (the state of every shard). A sweep that ended complete but unmerged
    (the merging job died) is merged here when ``merge_in_launcher`` (this loads the model in the
    launching process: off for SLURM, whose login nodes should not); otherwise, and for missing,
    incomplete or mismatched shards, the log names the commands that finish the sweep.
    """

    def __init__(self, merge_in_launcher: bool = True) -> None:
        self.merge_in_launcher = merge_in_launcher
        self._start: float | None = None
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        self._sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mixprec.workspace import Workspace

        wall = time.perf_counter() - self._start if self._start is not None else None
        sweep_dir = self._sweep_dir or Path(str(config.hydra.sweep.dir))
        groups: dict[tuple[str, int], list[DictConfig]] = {}
        for job in _job_configs(sweep_dir):
            if OmegaConf.select(job, "stage.name") != "sensitivity":
                continue
            root = str(Path(str(OmegaConf.select(job, "paths.workspace"))).resolve())
            groups.setdefault((root, int(job.stage.num_shards)), []).append(job)
        if not groups:
            log.warning("sensitivity sweep: no sensitivity jobs found under %s", sweep_dir)
        for (root, n), jobs in groups.items():
            self._finish(Path(root), n, jobs, config, kwargs.get("config_name"), wall, Workspace)

    def _finish(self, root: Path, n: int, jobs: list[DictConfig], config: DictConfig, config_name: str | None,
                wall: float | None, Workspace) -> None:
        from collections import Counter

        from mixprec.shards import shard_status

        status = shard_status(root, n)
        launched = Counter(int(j.stage.shard) for j in jobs)
        twice = sorted(i for i, c in launched.items() if c > 1)
        runs = []
        for job in jobs:
            p = _record_path(root, job)
            if p.exists():
                rec = json.loads(p.read_text())
                if rec.get("headline", {}).get("merged") and rec["headline"].get("num_shards") == n:
                    runs.append((p.stat().st_mtime, str(p), rec))
        complete = all(r["state"] == "complete" for r in status)
        todo = [r["shard"] for r in status if r["state"] != "complete"]
        commands = []
        if todo:
            rerun = "restart" if any(r["state"] in ("other settings",) or r.get("duplicates") for r in status) else ""
            commands.append(self._command(config, config_name, todo, n, rerun))
        merged_by = None
        if complete and runs:
            _, path, rec = max(runs)
            merged_by = path
            headline = dict(rec["headline"])
            headline["sweep"] = {"sweep_dir": str(self._sweep_dir), "wall_time_s": wall, "merged_by": path}
            ws = Workspace(root, fingerprints=rec.get("fingerprints"))
            ws.record_stage("sensitivity", rec.get("config", {}), wall if wall is not None else rec["wall_time_s"],
                            headline)
        elif complete and self.merge_in_launcher:
            merged_by = "launcher"
            self._merge_here(jobs[0])
        elif complete:
            commands.append(self._command(config, config_name, None, n, "merge_only"))
        summary = {"sweep_dir": str(self._sweep_dir), "wall_time_s": round(wall, 3) if wall is not None else None,
                   "num_shards": n, "merged": merged_by is not None, "merged_by": merged_by, "shards": status,
                   "launched_more_than_once": twice, "to_finish": commands}
        Workspace(root).write_json(stage_record("sensitivity_sweep"), summary)
        if twice:
            log.error("sensitivity sweep: shard(s) %s were launched more than once in this sweep; a second run of "
                      "a shard waits for nothing and fails on the shard lock", twice)
        if merged_by is not None:
            log.info("sensitivity sweep: %d shards merged into %s%s", n, root,
                     f" (sweep took {wall:.1f} s)" if wall is not None else "")
        else:
            detail = "; ".join(f"shard {r['shard']}: {r['state']}"
                               + (f" ({r['done']}/{r['expected']} tasks)" if r["expected"] is not None else "")
                               for r in status if r["state"] != "complete") or "all complete, not merged"
            log.error("sensitivity sweep in %s is not merged: %s. To finish it: %s", root, detail,
                      " ; then ".join(commands))

    @staticmethod
    def _command(config: DictConfig, config_name: str | None, shards: list[int] | None, n: int, how: str) -> str:
        """The command line that finishes this sweep: the same overrides, the given shards only."""
        drop = ("stage.shard", "stage.num_shards", "stage.restart", "stage.merge_only", "hydra.sweep.dir",
                "hydra.run.dir", "hydra.mode")
        given = [*(OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or []),
                 *(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])]
        keep = [str(o) for o in given if str(o).split("=", 1)[0].lstrip("+~") not in drop]
        import shlex

        cd = ""
        sources = OmegaConf.select(config, "hydra.runtime.config_sources", default=[]) or []
        for provider in ("command-line", "main"):
            found = [src.path for src in sources if src.provider == provider and src.schema == "file"]
            if found:
                cd = f"-cd {shlex.quote(os.path.relpath(found[0]))} "
                break
        if how == "merge_only":
            # One process, no launcher: the merge loads the model once and needs no GPU time to speak of.
            args = [o for o in keep if not o.startswith("hydra")] + [f"stage.num_shards={n}", "stage.merge_only=true"]
            return "python run.py stage=sensitivity " + " ".join(shlex.quote(a) for a in args)
        head = f"python run.py {cd}-cn {config_name} " if config_name else "python run.py -m stage=sensitivity "
        args = keep + [f"stage.num_shards={n}", "stage.shard=" + ",".join(str(i) for i in shards)]
        if how == "restart":
            args.append("stage.restart=true")
        return head + " ".join(shlex.quote(a) for a in args)

    @staticmethod
    def _merge_here(job_cfg: DictConfig) -> None:
        from mixprec.runner import run_stage

        cfg = OmegaConf.create(OmegaConf.to_container(job_cfg, resolve=False))
        OmegaConf.set_struct(cfg, False)
        cfg.stage.merge_only = True
        cfg.stage.shard = 0
        cfg.stage.record = "sensitivity"
        run_stage(cfg)
