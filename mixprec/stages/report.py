"""stage=report: ``report.html`` in the workspace, and the same views in W&B.

Reads whatever the workspace has (see :mod:`mixprec.report`); each section appears when its
artifacts exist. With ``stage.images=true`` and a calibrated workspace with final plans, it first
generates the comparison images (full precision, each final plan, uniform precision at the same
budget) for the first ``stage.max_prompts`` of ``prompts.<stage.prompt_set>``, cached under
``report/images/``. ``stage.compare=[ws1,ws2,...]`` writes one page comparing those workspaces'
Pareto fronts and finals instead (``stage.compare_output`` in ``paths.workspace``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mixprec.report import build_compare, build_report, load_workspace
from mixprec.report import images as rimages
from mixprec.report.data import WorkspaceData
from mixprec.report.wandb_views import log_compare, log_report
from mixprec import artifacts
from mixprec.artifacts import QUANT_PARAMS
from mixprec.context import RunSettings, StageContext, load_calibrated
from mixprec.settings import ReportSettings, is_forced
from mixprec.workspace import FingerprintMismatchError, Workspace

log = logging.getLogger("mixprec")


def comparison_images(run: RunSettings, s: ReportSettings, ws: Workspace,
                      data: WorkspaceData) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why there are none) when the workspace cannot make them."""
    if "weight" not in data.finals:
        return None, "no comparison images: final_weight_mp.yaml is missing (run stage=select)"
    if not ws.exists(QUANT_PARAMS):
        return None, f"no comparison images: {QUANT_PARAMS} is missing (run stage=calibrate)"
    pairs = run.prompt_set(str(s.prompt_set))[: int(s.max_prompts)]
    vs = rimages.variants(data.finals)
    key = rimages.cache_key(vs, pairs, ws.fingerprints)
    cached = None if is_forced(s.force, "report") else rimages.read_manifest(ws.root)
    if cached and cached.get("key") == key and all(ws.exists(f) for v in cached["variants"] for f in v["files"]):
        log.info("report: comparison images up to date (%s)", rimages.MANIFEST)
        by_key = {v.key: v for v in vs}
        for entry in cached["variants"]:  # sizes come from the census, not from the images: always current
            entry.update(rimages.describe(by_key[entry["key"]], data.layers))
        return cached, None
    try:
        for f in data.finals.values():
            artifacts.check_plan_fingerprints(ws, f.header, f.path)
        bundle = load_calibrated(run, ws, batch_size=int(s.batch_size))
    except FingerprintMismatchError as exc:
        # the rest of the report is still worth having; the page says why the images are missing
        log.warning("report: no comparison images: %s", exc)
        return None, f"no comparison images: {exc}"
    return rimages.generate(bundle, ws, vs, pairs, data.layers, key), None


def _compare(s: ReportSettings, ws: Workspace, track, roots: list[str]) -> dict[str, Any]:
    out = ws.path(str(s.compare_output))
    result = build_compare([Path(r) for r in roots], out)
    from mixprec.report.html import compare_names

    names = compare_names(result.data)
    track.update_config({"compare": [str(d.root) for d in result.data]})
    summary = log_compare(track, names, result.data, result.figures, result.path)
    log.info("report: compared %d workspaces -> %s (%.1f s)", len(roots), result.path, result.seconds)
    return {"compare": [str(d.root) for d in result.data], "report": str(result.path), "sections": result.sections,
            "build_s": round(result.seconds, 3), "bytes": result.bytes,
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))}}


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    roots = [str(r) for r in (s.compare or [])]
    if roots:
        return _compare(s, ws, track, roots)
    data = load_workspace(ws.root)
    manifest, note, images_s = None, None, 0.0
    if s.images:
        start = time.perf_counter()
        manifest, note = comparison_images(ctx.run, s, ws, data)
        images_s = time.perf_counter() - start
    else:
        note = "comparison images off (stage.images=false)"
    result = build_report(ws.root, str(s.output), manifest, int(s.thumb_max_side), note, data=data)
    summary = log_report(track, data, result.figures, manifest, result.path)
    log.info("report: %s (%d sections, %.1f MiB) built in %.1f s%s", result.path, len(result.sections),
             result.bytes / 2 ** 20, result.seconds, f", images {images_s:.1f} s" if manifest else f"; {note}")
    headline: dict[str, Any] = {"report": str(result.path), "sections": result.sections,
                                "build_s": round(result.seconds, 3), "images_s": round(images_s, 3),
                                "bytes": result.bytes, "layers": len(data.quantizable),
                                "candidates": len(data.candidates)}
    if manifest:
        headline["images"] = {v["key"]: v.get("scores") for v in manifest["variants"]}
    if note:
        headline["images_note"] = note
    headline["summary"] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    return headline
