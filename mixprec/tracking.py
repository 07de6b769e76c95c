"""Weights & Biases behind one small interface.

Stages call :func:`start_run` and log through the returned tracker. ``mode="disabled"`` gives a
tracker that does nothing (tests); ``offline`` writes a run directory that ``wandb sync`` uploads
later; ``online`` logs live. wandb is imported only when a run is really started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MODES = ("disabled", "offline", "online")


class Tracker:
    """A W&B run, or nothing when tracking is disabled."""

    def __init__(self, run: Any | None = None):
        self._run = run

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def run_dir(self) -> Path | None:
        return Path(self._run.dir).parent if self._run is not None else None

    def update_config(self, values: Mapping[str, Any]) -> None:
        """Add to the run's config what a stage knows only once it runs (a shard index, a fingerprint)."""
        if self._run is not None:
            self._run.config.update(dict(values), allow_val_change=True)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Rows may hold PIL images; they become W&B images in the table."""
        if self._run is None:
            return
        import wandb
        from PIL import Image

        def cell(v: Any) -> Any:
            return wandb.Image(v) if isinstance(v, Image.Image) else v

        self._run.log({key: wandb.Table(columns=list(columns), data=[[cell(v) for v in r] for r in rows])})

    def log_images(self, key: str, images: Sequence[Any], captions: Sequence[str] | None = None,
                   step: int | None = None) -> None:
        if self._run is None:
            return
        import wandb
        caps = list(captions) if captions is not None else [None] * len(images)
        self._run.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, caps)]}, step=step)

    def log_file_image(self, key: str, path: str | os.PathLike) -> None:
        if self._run is not None:
            import wandb
            self._run.log({key: wandb.Image(str(path))})

    def log_artifact(self, name: str, type_: str, paths: Sequence[str | os.PathLike]) -> None:
        if self._run is None:
            return
        import wandb
        art = wandb.Artifact(name=name, type=type_)
        for p in paths:
            art.add_file(str(p))
        self._run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A failed stage still closes its run, marked as failed, so the dashboard never shows it running.
        self.finish(exit_code=1 if exc_type is not None else 0)


def start_run(mode: str, *, project: str, group: str | None, job_type: str, name: str | None = None,
              config: Mapping[str, Any] | None = None, directory: str | os.PathLike | None = None,
              entity: str | None = None, tags: Sequence[str] = (), quiet: bool = True) -> Tracker:
    if mode not in MODES:
        raise ValueError(f"tracking.mode must be one of {MODES}, got {mode!r}")
    if mode == "disabled":
        return Tracker(None)
    import wandb

    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        # wandb keeps table media in WANDB_DATA_DIR (by default a folder in the home directory) and offline runs
        # point there by absolute path: keep it beside the runs so the folder syncs from anywhere.
        os.environ.setdefault("WANDB_DATA_DIR", str(Path(directory).resolve() / "data"))
    run = wandb.init(
        project=project, entity=entity, group=group, job_type=job_type, name=name,
        config=dict(config or {}), dir=str(directory) if directory is not None else None,
        mode=mode, tags=list(tags), reinit="finish_previous",
        # silent: no banners in the console; the run's files (and its captured console log) are unchanged
        settings=wandb.Settings(silent=bool(quiet)),
    )
    return Tracker(run)
