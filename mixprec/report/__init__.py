"""The run report: one self-contained HTML page per workspace (or comparing several), and W&B views.

Usable without Hydra or a model::

    from mixprec.report import build_report, build_compare
    build_report("outputs/tiny_random")                      # -> outputs/tiny_random/report.html
    build_compare(["outputs/a/tiny_random", "outputs/b/tiny_random"], "compare.html")

``stage=report`` (:mod:`mixprec.stages.report`) adds the comparison images, which need the
calibrated model, and logs the same views to W&B.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import WorkspaceData, load_workspace

__all__ = ["ReportResult", "WorkspaceData", "build_compare", "build_report", "load_workspace"]


@dataclass
class ReportResult:
    path: Path
    sections: list[str]
    seconds: float
    bytes: int
    data: WorkspaceData | list[WorkspaceData]
    figures: dict[str, bytes | None] = field(default_factory=dict)


def _write(path: Path, text: str) -> None:
    from mixprec.search import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def build_report(root: str | Path, out: str | Path | None = None, manifest: Mapping[str, Any] | None = None,
                 max_side: int = 256, images_note: str | None = None,
                 data: WorkspaceData | None = None) -> ReportResult:
    """Write ``report.html`` (or ``out``) for the workspace at ``root`` from the artifacts it has."""
    from .html import render_report
    from .images import read_manifest
    from .plots import report_figures

    start = time.perf_counter()
    d = data or load_workspace(root)
    if manifest is None:
        manifest = read_manifest(d.root)
    figs = report_figures(d)
    text, sections = render_report(d, figs, manifest, max_side, images_note)
    path = Path(out) if out is not None else d.root / "report.html"
    if not path.is_absolute():
        path = d.root / path
    _write(path, text)
    return ReportResult(path, sections, time.perf_counter() - start, len(text.encode()), d, figs)


def build_compare(roots: Sequence[str | Path], out: str | Path) -> ReportResult:
    """One page comparing the Pareto fronts and final plans of several workspaces."""
    from .html import compare_names, render_compare
    from .plots import compare_figures

    if len(roots) < 2:
        raise ValueError(f"stage.compare needs at least two workspaces, got {list(roots)}")
    start = time.perf_counter()
    items = [load_workspace(r) for r in roots]
    empty = [str(d.root) for d in items if not d.candidates and not d.finals]
    if empty:
        raise FileNotFoundError(f"nothing to compare in {empty}: no candidate plans (run stage=allocate) and no "
                                f"final plans (run stage=select) there")
    figs = compare_figures(compare_names(items), items)
    text, sections = render_compare(items, figs)
    path = Path(out)
    _write(path, text)
    return ReportResult(path, sections, time.perf_counter() - start, len(text.encode()), items, figs)
