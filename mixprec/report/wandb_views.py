"""The report's views as native W&B objects, and a reader for offline run files.

Logged by the report run (job_type ``report``, group = ``tracking.group`` or the workspace name):
tables (census by block, sensitivity per kind and group, one row per candidate with its selection
images, allocation per block, one row per prompt and one per image variant, ablation, benchmark),
native charts (Pareto scatter per kind, latency plans' score vs predicted and measured latency,
sensitivity by depth as line series), the report's PNG
charts and image variants as media, and the final plans and the page as artifacts. Summary keys
(``final/*``, ``pareto/*``, ``images/*``) are scalars, so the dashboard's run comparison can set
two sweeps (two groups) side by side.

Offline runs: wandb 0.31 keeps a run's tables twice, as ``files/media/table/*.table.json`` in the
run folder (cells with images appear as placeholders there) and as a run-table artifact staged
under ``$WANDB_DATA_DIR`` (mixprec.tracking points it under ``tracking.dir``), which ``wandb sync`` uploads with the
run; the standalone images are under ``files/media/images``. :func:`read_offline_run` decodes the
``.wandb`` file with wandb's own protobuf schema.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import (FULL_PRECISION_BITS, WorkspaceData, allocation_by_block, benchmark_plan_rows, census_by_block,
                   final_plan_latency, latency_rows)

MAX_TABLE_ROWS = 2000


def _clean(v: Any) -> Any:
    """Non-finite floats (the SQNR of a lossless layer, the PSNR of identical images) become None: JSON has no inf."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _strip(images: Sequence[Any]):
    """Side-by-side tiles of one variant's prompts: one image per table row."""
    from PIL import Image

    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h), "white")
    for i, im in enumerate(images):
        out.paste(im, (i * w, 0))
    return out


def _log_sources(track, d: WorkspaceData, summary: dict[str, Any]) -> None:
    """Every view's origin, and which ones came from plans or a recipe the workspace no longer has."""
    sources = [d.source(r) for r in ("calibrate", "sensitivity", "select", "infer", "evaluate", "benchmark")
               if r in d.stages]
    if not sources:
        return
    track.log_table("report/sources", ["record", "fingerprints", "plans_digest", "stale"],
                    [[s.record, json.dumps(s.fingerprints), s.plans_digest, s.stale or ""] for s in sources])
    summary["report/plans_digest"] = d.plans_digest
    for s in sources:
        summary[f"{s.record}/stale"] = bool(s.stale)
    summary["report/stale"] = ",".join(s.record for s in sources if s.stale) or "none"


def _log_census(track, d: WorkspaceData, summary: dict[str, Any]) -> None:
    if not d.layers:
        return
    rows = census_by_block(d.layers)
    cols = list(rows[0])
    track.log_table("census/by_block", cols, [[r[c] for c in cols] for r in rows])
    summary["census/layers"] = sum(not l.excluded for l in d.layers)


def _log_sensitivity(track, d: WorkspaceData) -> None:
    if track.enabled:
        import wandb
    depth = {l.name: i for i, l in enumerate(d.quantizable)}
    block = {l.name: l.block for l in d.layers}
    for (k, g), t in sorted(d.sensitivity.items()):
        bits = sorted({b for v in t.values() for b in v})
        names = sorted(t, key=lambda n: depth.get(n, len(depth)))
        track.log_table(f"sensitivity/{k}_{g}", ["layer", "block", "depth"] + [f"{k}{b}" for b in bits],
                        [[n, block.get(n), depth.get(n)] + [_clean(t[n].get(b)) for b in bits] for n in names])
        if track.enabled:
            xs = [[depth.get(n, -1) for n in names if b in t[n]] for b in bits]
            ys = [[min(t[n][b], 1e4) if not math.isnan(t[n][b]) else None for n in names if b in t[n]] for b in bits]
            track.log({f"sensitivity/{k}_{g}_by_depth": wandb.plot.line_series(
                xs=xs, ys=ys, keys=[f"{'W' if k == 'w' else 'A'}{b}" for b in bits],
                title=f"{'weight' if k == 'w' else 'activation'} sensitivity, {g} layers", xname="depth")})


def _log_candidates(track, d: WorkspaceData, summary: dict[str, Any]) -> None:
    if track.enabled:
        import wandb
    if not d.candidates:
        return
    chosen = d.chosen_paths()
    sel = {r["path"]: r for r in d.selection}
    grids = {}
    for r in d.selection:  # duplicates point at the grid of the plan generated first
        if r.get("grid") and (d.root / r["grid"]).exists():
            grids[r["path"]] = r["grid"]
    cols = ["kind", "plan", "target", "K", "seed", "mean_bits", "mib", "score", "pareto", "selected",
            "select_rank", "select_mse", "select_ssim", "images"]
    rows = []
    for c in d.candidates[:MAX_TABLE_ROWS]:
        s = sel.get(c["path"], {})
        img = _open(d.root / grids[c["path"]]) if c["path"] in grids else None
        rows.append([c["kind"], c["path"], c["target"], c["K"], c["seed"], c["mean_bits_overall"], c["mib"],
                     c["score"], bool(c["pareto"]), c["path"] in chosen.values(), s.get("rank"), s.get("mse"),
                     s.get("ssim"), img])
    track.log_table("candidates", cols, rows)
    for kind in ("weight", "act"):
        pts = [c for c in d.candidates if c["kind"] == kind and c["mib"] is not None and c["score"] is not None]
        if not pts:
            continue
        summary[f"pareto/{kind}_candidates"] = len(pts)
        summary[f"pareto/{kind}_front"] = sum(c["pareto"] for c in pts)
        summary[f"pareto/{kind}_best_score"] = max(c["score"] for c in pts)
        for t in sorted({c["target"] for c in pts if c["target"] is not None}):
            summary[f"pareto/{kind}_best_score@{t:g}"] = max(c["score"] for c in pts if c["target"] == t)
        if track.enabled:
            table = wandb.Table(columns=["mib", "score", "K", "seed", "target", "pareto", "selected", "plan"],
                                data=[[c["mib"], c["score"], c["K"], c["seed"], c["target"], bool(c["pareto"]),
                                       c["path"] in chosen.values(), c["path"]] for c in pts])
            track.log({f"pareto/{kind}": wandb.plot.scatter(table, "mib", "score",
                                                            title=f"{kind} candidates: MiB vs score")})


def _log_finals(track, d: WorkspaceData, summary: dict[str, Any]) -> None:
    if not (d.finals and d.layers):
        return
    rows = []
    for kind, f in d.finals.items():
        attr = "params" if kind == "weight" else "act_elems"
        for r in allocation_by_block(d.layers, f.bits, attr):
            share = {b: s / r["size"] if r["size"] else 0.0 for b, s in r["by_bits"].items()}
            rows.append([kind, r["block"], sum(r["layers_by_bits"].values()), r["mean_bits"]] +
                        [share.get(b, 0.0) for b in (2, 4, 8, FULL_PRECISION_BITS)])
        h = f.header
        summary[f"final/{kind}_mean_bits"] = (h.get("achieved_mean_bits") or {}).get("overall")
        summary[f"final/{kind}_mib"] = h.get("mib")
        summary[f"final/{kind}_score"] = h.get("score")
        for k, v in (h.get("selection_scores") or {}).items():
            summary[f"final/{kind}_select_{k}"] = v
    lat = final_plan_latency(d)
    if lat and "error" not in lat:
        summary.update({"final/predicted_ms": lat["predicted_ms"], "final/predicted_speedup": lat["speedup"],
                        "final/slower_than_16bit": lat["slower_than_16bit"]})
    track.log_table("allocation/by_block", ["kind", "block", "layers", "mean_bits", "share_2", "share_4",
                                            "share_8", "share_fp"], rows)
    track.log_artifact("final_plans", "plan", [d.root / f.path for f in d.finals.values()])


def _log_images(track, d: WorkspaceData, manifest: Mapping[str, Any] | None, summary: dict[str, Any]) -> None:
    if not (manifest and manifest.get("variants")):
        return
    vs = manifest["variants"]
    pairs = manifest["prompts"]
    loaded = {v["key"]: [_open(d.root / f) for f in v["files"]] for v in vs}
    cols = ["prompt", "seed"] + [v["label"] for v in vs] + [f"psnr_db {v['label']}" for v in vs[1:]]
    rows = []
    for i, (prompt, seed) in enumerate(pairs):
        rows.append([prompt, seed] + [loaded[v["key"]][i] for v in vs] +
                    [_clean(((v.get("per_image") or {}).get("psnr_db") or [None] * len(pairs))[i]) for v in vs[1:]])
    track.log_table("images/by_prompt", cols, rows)
    vrows = []
    for v in vs:
        s = v.get("scores") or {}
        vrows.append([v["label"], v["kind"], v["description"], v.get("weight_mean_bits"), v.get("act_mean_bits"),
                      v.get("weight_mib"), _clean(s.get("psnr_db")), s.get("ssim"), s.get("adherence"),
                      _strip(loaded[v["key"]])])
        for k, val in s.items():
            if isinstance(val, (int, float)):
                summary[f"images/{v['key']}_{k}"] = val
    track.log_table("images/by_variant", ["variant", "kind", "plan", "weight_mean_bits", "act_mean_bits",
                                          "weight_mib", "psnr_db", "ssim", "adherence", "images"], vrows)
    for v in vs:
        track.log_images(f"images/{v['key']}", loaded[v["key"]], [p for p, _ in pairs])


def _log_evaluate_and_benchmark(track, d: WorkspaceData) -> None:
    if d.evaluate and isinstance(d.evaluate.get("rows"), list):
        rows = [r for r in d.evaluate["rows"] if isinstance(r, Mapping) and isinstance(r.get("scores"), Mapping)]
        keys = ["adherence", "ssim", "psnr_db"]
        track.log_table("evaluate/ablation", ["point", "method", "weight_bits", "act_bits"] +
                        [f"{k}_{s}" for k in keys for s in ("mean", "std")],
                        [[r.get("point"), r.get("method"), r.get("weight_mean_bits"), r.get("act_mean_bits")] +
                         [(r["scores"].get(k) or {}).get(s) for k in keys for s in ("mean", "std")] for r in rows])
    if d.benchmark:
        from .html import _flatten

        plan_rows = benchmark_plan_rows(d.benchmark)
        if plan_rows:
            cols = list(dict.fromkeys(c for r in plan_rows for c in r))
            track.log_table("benchmark/plans", cols, [[r.get(c) for c in cols] for r in plan_rows])
        flat = _flatten(d.benchmark)
        track.log_table("benchmark", ["key", "value"], [[k, json.dumps(v) if not isinstance(v, str) else v]
                                                        for k, v in flat])


def _log_latency(track, d: WorkspaceData, summary: dict[str, Any]) -> None:
    """The latency-budget plans: predicted and (where stage=benchmark timed them) measured latency."""
    rows = latency_rows(d)
    if not rows:
        return
    cols = ["budget_ms", "predicted_ms", "measured_ms", "error_pct", "within_budget", "score", "pareto",
            "pareto_measured", "path"]
    track.log_table("latency/plans", cols, [[_clean(r.get(c)) for c in cols] for r in rows])
    summary["latency/plans"] = len(rows)
    measured = [r for r in rows if r.get("measured_ms") is not None]
    if measured:
        summary["latency/measured"] = len(measured)
        summary["latency/max_abs_error_pct"] = max(abs(r.get("error_pct") or 0.0) for r in measured)
        summary["latency/within_budget"] = sum(bool(r.get("within_budget")) for r in measured)
    if track.enabled:
        import wandb

        for key in ("predicted_ms", "measured_ms"):
            pts = [r for r in rows if r.get(key) is not None and r.get("score") is not None]
            if pts:
                table = wandb.Table(columns=[key, "score", "path"], data=[[r[key], r["score"], r["path"]] for r in pts])
                track.log({f"latency/score_vs_{key}": wandb.plot.scatter(table, key, "score",
                                                                        title=f"latency plans: {key} vs score")})


def log_report(track, d: WorkspaceData, figures: Mapping[str, bytes | None], manifest: Mapping[str, Any] | None,
               report_path: Path) -> dict[str, Any]:
    """Log every view; returns the summary it set (also when tracking is disabled, for the stage record)."""
    summary: dict[str, Any] = {}
    _log_census(track, d, summary)
    _log_sensitivity(track, d)
    _log_candidates(track, d, summary)
    _log_finals(track, d, summary)
    if d.infer:
        for k in ("psnr_db", "ssim", "adherence", "adherence_full_precision"):
            if isinstance(d.infer.get(k), (int, float)):
                summary[f"infer/{k}"] = d.infer[k]
    _log_sources(track, d, summary)
    _log_images(track, d, manifest, summary)
    _log_evaluate_and_benchmark(track, d)
    _log_latency(track, d, summary)
    for name, png in figures.items():
        if png:
            track.log_images(f"charts/{name}", [_pil(png)], [name])
    if report_path.exists():
        track.log_artifact("report", "report", [report_path])
    summary = {k: _clean(v) for k, v in summary.items()}
    track.summary({k: v for k, v in summary.items() if v is not None})
    return summary


def log_compare(track, names: Sequence[str], items: Sequence[WorkspaceData], figures: Mapping[str, bytes | None],
                page: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"compare/workspaces": len(items)}
    if track.enabled:
        import wandb
    rows = []
    for n, d in zip(names, items):
        for c in d.candidates:
            rows.append([n, c["kind"], c["path"], c["target"], c["K"], c["seed"], c["mib"], c["score"],
                         bool(c["pareto"]), c["path"] in d.chosen_paths().values()])
    cols = ["workspace", "kind", "plan", "target", "K", "seed", "mib", "score", "pareto", "selected"]
    track.log_table("compare/candidates", cols, rows)
    if track.enabled:
        for kind in ("weight", "act"):
            sub = [r for r in rows if r[1] == kind and r[6] is not None and r[7] is not None]
            if sub:
                track.log({f"compare/pareto_{kind}": wandb.plot.scatter(
                    wandb.Table(columns=cols, data=sub), "mib", "score", title=f"{kind}: candidates of every workspace")})
    frows = []
    for n, d in zip(names, items):
        for kind, f in d.finals.items():
            h = f.header
            frows.append([n, kind, h.get("selected_from"), (h.get("achieved_mean_bits") or {}).get("overall"),
                          h.get("mib"), h.get("score")])
            summary[f"compare/{n}/{kind}_mib"] = h.get("mib")
    track.log_table("compare/finals", ["workspace", "kind", "plan", "mean_bits", "mib", "score"], frows)
    for name, png in figures.items():
        if png:
            track.log_images(f"charts/{name}", [_pil(png)], [name])
    if page.exists():
        track.log_artifact("compare_report", "report", [page])
    track.summary({k: v for k, v in summary.items() if v is not None})
    return summary


# ------------------------------------------------------------------ reading offline runs

_BLOCK = 32768
_HEADER = 7  # crc32c (4), length (2), record type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file (LevelDB-log framing, as the wandb core writes it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = 7, b""  # file header: ":W&B", magic 0xBEE1, version
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            pending = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            pending += chunk
        else:  # zero padding at the end of a file that is still being written
            break
        rec = pb.Record()
        rec.ParseFromString(pending)
        pending = b""
        yield rec


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """What an offline run holds: group, job type, logged keys with their W&B types, summary, artifacts, media files."""
    run_dir = Path(run_dir)
    files = list(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out: dict[str, Any] = {"dir": str(run_dir), "history": {}, "summary": {}, "artifacts": [], "config": {}}
    for rec in iter_records(files[0]):
        which = rec.WhichOneof("record_type")
        if which == "run":
            out.update(run_id=rec.run.run_id, project=rec.run.project, group=rec.run.run_group,
                       job_type=rec.run.job_type)
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif which == "history":
            # media and tables arrive one field per item: nested_key = [logged key, field]
            step: dict[str, Any] = {}
            for item in rec.history.item:
                path = [item.key] if item.key else list(item.nested_key)
                if path[0].startswith("_"):
                    continue
                try:
                    value = json.loads(item.value_json)
                except json.JSONDecodeError:
                    value = item.value_json
                if len(path) == 1:
                    step[path[0]] = value
                else:
                    obj = step.setdefault("/".join(path[:-1]), {})
                    if isinstance(obj, dict):
                        obj[path[-1]] = value
            for key, value in step.items():
                out["history"].setdefault(key, []).append(value)
        elif which == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out["summary"][key] = json.loads(item.value_json)
        elif which == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif which == "artifact":
            # local_path: where the file waits for `wandb sync` (the staging area, for files wandb copied)
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                     "files": {e.path: e.local_path for e in rec.artifact.manifest.contents}})
    media = run_dir / "files" / "media"
    # logged keys with "/" become sub-folders
    out["tables"] = sorted(str(p.relative_to(run_dir / "files")) for p in media.glob("table/**/*.table.json"))
    out["images"] = sorted(str(p.relative_to(run_dir / "files")) for p in media.glob("images/**/*.png"))
    return out


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Summarise an offline W&B run folder before `wandb sync`.")
    ap.add_argument("run_dir", nargs="+")
    args = ap.parse_args(argv)
    for d in args.run_dir:
        r = read_offline_run(d)
        print(f"{d}: group={r.get('group')!r} job_type={r.get('job_type')!r}")
        for k, v in sorted(r["history"].items()):
            t = v[-1].get("_type") if isinstance(v[-1], dict) else type(v[-1]).__name__
            print(f"  {k}: {t}")
        print(f"  artifacts: {[a['name'] for a in r['artifacts']]}; {len(r['tables'])} table files, "
              f"{len(r['images'])} image files")


if __name__ == "__main__":
    _main()
