"""The report page: one self-contained HTML file (images as base64 data URIs, inline CSS, no scripts).

A section is rendered only when its artifacts exist; every section is a ``<section id=...>`` with a
``data-artifacts`` attribute naming what it was built from, which is what the browser test checks.
Long lists (layers, candidates) sit in collapsed ``<details>``: the main view stays a summary by
block even for an 800-layer UNet.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mixprec import artifacts

from .data import (FULL_PRECISION_BITS, Source, WorkspaceData, allocation_by_block, benchmark_plan_rows, census_by_block,
                   final_plan_latency, latency_rows, roles_of_block)

CSS = """
:root { --fg:#1d2330; --muted:#5b6474; --line:#dde1e8; --bg:#f4f6f9; --card:#fff; --accent:#3559c7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:var(--fg);
       background:var(--bg); }
header.top { background:#1f2a44; color:#fff; padding:18px 28px 12px; }
header.top h1 { margin:0 0 4px; font-size:22px; }
header.top .sub { color:#c9d2e6; font-size:13px; }
nav { position:sticky; top:0; z-index:5; background:#fff; border-bottom:1px solid var(--line); padding:8px 28px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; font-size:13px; white-space:nowrap; }
main { max-width:1400px; margin:0 auto; padding:18px 28px 60px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 20px; margin:0 0 18px; }
section h2 { margin:0 0 10px; font-size:18px; }
section h3 { margin:16px 0 8px; font-size:15px; }
p.note, .note { color:var(--muted); font-size:12.5px; }
table { border-collapse:collapse; margin:6px 0 10px; font-size:12.5px; }
th, td { border-bottom:1px solid var(--line); padding:4px 9px; text-align:left; vertical-align:top; }
th { background:#eef1f6; font-weight:600; position:sticky; top:38px; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.hl td { background:#fff6d6; }
tr.warn td { background:#ffe6e6; }
p.source { font-size:11.5px; color:#667; margin:6px 0; }
p.source.stale, section.stale > h2 { color:#7a1010; }
img.chart { max-width:100%; height:auto; display:block; margin:6px 0 12px; }
details { margin:6px 0; }
details > summary { cursor:pointer; color:var(--accent); font-size:13px; }
.kv td:first-child { color:var(--muted); white-space:nowrap; }
.badge { display:inline-block; padding:1px 7px; border-radius:9px; font-size:11.5px; background:#e8ecf7; color:#334; }
.badge.bad { background:#ffd9d9; color:#7a1010; }
.badge.good { background:#d9f5df; color:#135b24; }
table.imgs td { text-align:center; border-bottom:1px solid var(--line); }
table.imgs td.prompt { text-align:left; max-width:220px; font-size:12px; }
table.imgs img { display:block; margin:0 auto 2px; }
img.px { image-rendering: pixelated; }
.cap { font-size:11px; color:var(--muted); white-space:nowrap; }
pre { background:#f7f8fa; border:1px solid var(--line); padding:8px; overflow:auto; font-size:12px; max-height:480px; }
.grid2 { display:grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap:10px 24px; }
"""

SECTION_TITLES = {
    "run": "Run configuration and fingerprints",
    "census": "Layer census by block",
    "sensitivity": "Sensitivity by depth",
    "candidates": "Candidate family and Pareto front",
    "allocation": "Final bit allocation by block",
    "images": "Images: full precision vs final plans vs uniform precision",
    "ablation": "Ablation at equal budgets",
    "benchmark": "Benchmark",
    "latency": "Plans under latency budgets: quality vs predicted latency",
    # the comparison page
    "workspaces": "Workspaces and their finals",
    "fronts": "Pareto fronts",
    "finals": "Final plans per block",
    "config": "Configuration differences",
}


# ------------------------------------------------------------------ small builders

def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    return str(v)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chart(png: bytes | None, alt: str) -> str:
    return f'<img class="chart" alt="{esc(alt)}" src="{data_uri(png)}">' if png else ""


def image_file(path: Path, alt: str, max_side: int, display: int | None = None) -> str:
    """An image file embedded: small ones as PNG (pixelated when scaled up), large ones as a JPEG thumbnail."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        buf = io.BytesIO()
        if max(w, h) > max_side:
            im.thumbnail((max_side, max_side))
            im.save(buf, format="JPEG", quality=85)
            mime, cls = "image/jpeg", ""
        else:
            im.save(buf, format="PNG")
            mime, cls = "image/png", "px"
        w2, h2 = im.size
    if display:
        scale = display / max(w2, h2)
        w2, h2 = round(w2 * scale), round(h2 * scale)
    return (f'<img class="{cls}" alt="{esc(alt)}" width="{w2}" height="{h2}" '
            f'src="{data_uri(buf.getvalue(), mime)}">')


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[bool] | None = None,
          row_class: Callable[[int], str] | None = None, raw: bool = False, cls: str = "") -> str:
    """``raw`` cells are HTML already; others are escaped and numbers formatted."""
    num = list(num) if num is not None else [False] * len(columns)
    head = "".join(f'<th class="{"num" if n else ""}">{esc(c)}</th>' for c, n in zip(columns, num))
    body = []
    for i, r in enumerate(rows):
        rc = row_class(i) if row_class else ""
        cells = "".join(f'<td class="{"num" if n else ""}">{c if raw else esc(fmt(c))}</td>' for c, n in zip(r, num))
        body.append(f'<tr class="{rc}">{cells}</tr>')
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def kv_table(items: Sequence[tuple[str, Any]]) -> str:
    return '<table class="kv"><tbody>' + "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(fmt(v))}</td></tr>" for k, v in items) + "</tbody></table>"


def details(summary: str, inner: str, open_: bool = False) -> str:
    return f'<details{" open" if open_ else ""}><summary>{esc(summary)}</summary>{inner}</details>'


def source_note(src: Source | None) -> str:
    """What a block's numbers were computed from, and a STALE mark when they no longer describe the workspace."""
    if src is None:
        return ""
    stale = f'<span class="badge bad stale">STALE</span> {esc(src.stale)}<br>' if src.stale else ""
    return (f'<p class="source{" stale" if src.stale else ""}" data-record="{esc(src.record)}" '
            f'data-plans="{esc(src.plans_digest or "")}">{stale}{esc(src.describe())}</p>')


def _images_source(d: WorkspaceData, manifest: Mapping[str, Any]) -> Source:
    """The comparison images were generated for some plans: stale when the final plans are others now."""
    from .images import _digest, variants

    now = {v.key: _digest(v) for v in variants(d.finals)}
    made = {e.get("key"): e.get("digest") for e in manifest.get("variants") or []}
    stale = None if made == now else ("generated for other final plans than the workspace has now: rerun "
                                      "`python run.py stage=report` (stage.images=true) to generate them again")
    return Source("report/images", {}, d.plans_digest if made == now else None, stale)


def _sources(d: WorkspaceData, *records: str) -> list[Source]:
    return [d.source(r) for r in records if r in d.stages]


def section(sid: str, inner: str, artifacts: Sequence[str], title: str | None = None,
            sources: Sequence[Source] = ()) -> str:
    stale = any(src.stale for src in sources)
    cls = ' class="stale"' if stale else ""
    return (f'<section id="{sid}" data-artifacts="{esc(" ".join(artifacts))}"{cls}>'
            f'<h2>{esc(title or SECTION_TITLES[sid])}{" (stale)" if stale else ""}</h2>{inner}'
            f'{"".join(source_note(src) for src in sources)}</section>')


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{esc(SECTION_TITLES.get(sid, sid).split(":")[0])}</a>' for sid, _ in sections)
    body = "".join(s for _, s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}</style></head><body>'
            f'<header class="top"><h1>{esc(title)}</h1><div class="sub">{subtitle}</div></header>'
            f'<nav>{nav}</nav><main>{body}</main></body></html>')


def _mib(nbytes: float) -> float:
    return nbytes / 2 ** 20


# ------------------------------------------------------------------ sections of a workspace report

def run_section(d: WorkspaceData, note: str | None = None) -> str | None:
    if not d.stages:
        return None
    cfg = d.config() or {}
    model, quant, prompts = cfg.get("model") or {}, cfg.get("quant") or {}, cfg.get("prompts") or {}
    facts = [("workspace", str(d.root))]
    if model:
        facts += [("model", f"{model.get('name')} ({model.get('source')}, weights {model.get('weights', '-')})"),
                  ("resolution / steps / guidance",
                   f"{model.get('resolution')} px / {model.get('num_inference_steps')} / {model.get('guidance_scale')}")]
    if quant:
        facts += [("weight bits (content / quality)",
                   f"{(quant.get('weight_bits_by_group') or {}).get('content')} / "
                   f"{(quant.get('weight_bits_by_group') or {}).get('quality')}"),
                  ("activation bits (content / quality)",
                   f"{(quant.get('act_bits_by_group') or {}).get('content')} / "
                   f"{(quant.get('act_bits_by_group') or {}).get('quality')}")]
    for name in ("calibration", "sensitivity", "selection", "inference"):
        p = prompts.get(name)
        if isinstance(p, Mapping):
            facts.append((f"{name} prompts", ", ".join(f"{k}={v}" for k, v in p.items())))
    st = cfg.get("stage") or {}
    for entry in ("allocate_weight", "allocate_act"):
        a = st.get(entry)
        if isinstance(a, Mapping):
            facts.append((f"{entry} grid", f"target {a.get('target')} × K {a.get('K')} × seed {a.get('seed')}"))
    fps = d.fingerprints()
    distinct = {(f.get("model"), f.get("quant")) for f in fps.values()}
    rows, warn = [], set()
    for i, (s, rec) in enumerate(d.stages.items()):
        f = rec.get("fingerprints") or {}
        head = rec.get("headline") or {}
        scalars = ", ".join(f"{k}={fmt(v)}" for k, v in head.items() if isinstance(v, (int, float, str))
                            and not isinstance(v, bool) and len(str(v)) < 40)[:160]
        rows.append([s, f.get("model"), f.get("quant"), rec.get("wall_time_s"), scalars])
        if len(distinct) > 1 and (f.get("model"), f.get("quant")) != max(distinct, key=lambda x: sum(
                (g.get("model"), g.get("quant")) == x for g in fps.values())):
            warn.add(i)
    badge = ('<span class="badge good">all stages share one model and quantization fingerprint</span>'
             if len(distinct) == 1 else
             f'<span class="badge bad">{len(distinct)} different fingerprints: rows in red were made for another '
             f'model or recipe</span>')
    inner = (kv_table(facts) + "<h3>Stages and fingerprints</h3>" + badge +
             table(["stage", "model fingerprint", "quant fingerprint", "wall time (s)", "headline"], rows,
                   [False, False, False, True, False], row_class=lambda i: "warn" if i in warn else ""))
    if note:
        inner += f'<p class="note">{esc(note)}</p>'
    if cfg:
        inner += details("resolved configuration (YAML)",
                         f"<pre>{esc(yaml.safe_dump(cfg, sort_keys=False, width=110))}</pre>")
    return section("run", inner, [f"{s}.json" for s in d.stages])


def census_section(d: WorkspaceData, figs: Mapping[str, bytes | None]) -> str | None:
    if not d.layers:
        return None
    q = d.quantizable
    n_conv = sum(l.type == "Conv2d" for l in q)
    n_content = sum(l.group == "content" for l in q)
    params = sum(l.params for l in q)
    intro = (f"<p>{len(q)} quantizable layers ({len(q) - n_conv} Linear, {n_conv} Conv2d; {n_content} content, "
             f"{len(q) - n_content} quality), {params / 1e6:,.2f} M parameters ({_mib(2 * params):,.1f} MiB in fp16)"
             f"{f', {len(d.layers) - len(q)} excluded' if len(d.layers) > len(q) else ''}, "
             f"{sum(l.protected for l in q)} with protected (full-precision) activations. "
             f"Blocks in data-flow order.</p>")
    blocks = census_by_block(d.layers)
    rows = [[b["block"], b["layers"], b["linear"], b["conv"], b["content"], b["quality"], b["params"],
             round(_mib(2 * b["params"]), 2), b["act_elems"], b["protected"]] for b in blocks]
    main = table(["block", "layers", "Linear", "Conv2d", "content", "quality", "parameters", "fp16 MiB",
                  "input elems / image", "protected"], rows, [False] + [True] * 9)
    per_block = []
    for b in blocks:
        roles = roles_of_block(d.layers, b["block"])
        role_rows = [[r["role"], r["type"], r["group"], r["layers"], r["params"], r["act_elems"]] for r in roles]
        layer_rows = [[l.name, l.type, l.group, l.params, l.act_elems, "yes" if l.protected else "",
                       "yes" if l.excluded else ""] for l in d.layers if l.block == b["block"]]
        inner = (table(["role", "type", "group", "layers", "parameters", "input elems / image"], role_rows,
                       [False, False, False, True, True, True]) +
                 details(f"all {len(layer_rows)} layers of {b['block']}",
                         table(["name", "type", "group", "parameters", "input elems", "protected", "excluded"],
                               layer_rows, [False, False, False, True, True, False, False])))
        per_block.append(details(f"{b['block']}: {b['layers']} layers by role", inner))
    inner = intro + chart(figs.get("census"), "parameters per block") + main + "".join(per_block)
    return section("census", inner, ["layers.csv"] + (["protected_layers.yaml"] if d.protected else []),
                   sources=_sources(d, "calibrate"))


def sensitivity_section(d: WorkspaceData, figs: Mapping[str, bytes | None]) -> str | None:
    if not d.sensitivity or not d.layers:
        return None
    parts = [f'<p class="note">From {esc(d.sensitivity_source)}. Each point: the metric with only that layer '
             f"quantized at that bit-width (mean over the sensitivity prompts). Content layers (cross-attention, "
             f"feed-forward) are scored by SSIM of the decoded image, quality layers by SQNR of the denoiser "
             f"output.</p>"]
    for k, label in (("w", "Weights"), ("a", "Activations")):
        png = figs.get(f"sensitivity_{k}")
        if png:
            parts.append(f"<h3>{label}</h3>" + chart(png, f"{label} sensitivity by depth"))
    block_of = {l.name: l.block for l in d.layers}
    worst = []
    for (k, g), t in sorted(d.sensitivity.items()):
        if not t:
            continue
        low = min(b for v in t.values() for b in v)
        ranked = sorted((n for n in t if low in t[n]), key=lambda n: t[n][low])[:8]
        worst += [[f"{'W' if k == 'w' else 'A'}{low}", g, n, block_of.get(n, ""), t[n][low]] for n in ranked]
    parts.append(details("most sensitive layers at the lowest bit-width (8 per kind and group)",
                         table(["bits", "group", "layer", "block", "metric"], worst, [False, False, False, False, True]),
                         open_=True))
    if d.protected:
        parts.append(details(f"{len(d.protected)} layers with protected activations",
                             "<pre>" + esc("\n".join(d.protected)) + "</pre>"))
    return section("sensitivity", "".join(parts), [d.sensitivity_source or "sensitivity"],
                   sources=_sources(d, "sensitivity"))


def _selection_index(d: WorkspaceData) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in d.selection}


def candidates_section(d: WorkspaceData, figs: Mapping[str, bytes | None], max_side: int) -> str | None:
    if not d.candidates:
        return None
    chosen = d.chosen_paths()
    sel = _selection_index(d)
    parts = []
    for kind in ("weight", "act"):
        c = [r for r in d.candidates if r["kind"] == kind]
        if c:
            parts.append(f'<span class="badge">{kind}: {len(c)} candidates, {sum(r["pareto"] for r in c)} on the '
                         f'front, targets {sorted({r["target"] for r in c if r["target"] is not None})}, '
                         f'K {sorted({r["K"] for r in c if r["K"] is not None})}, seeds '
                         f'{sorted({r["seed"] for r in c})}</span> ')
    parts.append(chart(figs.get("pareto"), "Pareto front"))
    cols = ["kind", "plan", "target", "K", "seed", "mean bits", "content", "quality", "MiB", "score", "front",
            "select rank", "select MSE"]
    num = [False, False, True, True, True, True, True, True, True, True, False, True, True]

    def row(r):
        s = sel.get(r["path"], {})
        return [r["kind"], r["path"], r["target"], r["K"], r["seed"], r["mean_bits_overall"], r["mean_bits_content"],
                r["mean_bits_quality"], r["mib"], r["score"], "●" if r["pareto"] else "", s.get("rank"), s.get("mse")]

    key = [r for r in d.candidates if r["pareto"] or r["path"] in chosen.values()]
    key.sort(key=lambda r: (r["kind"] != "weight", r["mib"] if r["mib"] is not None else math.inf))
    key_rows = [row(r) for r in key]
    parts.append("<h3>Front and selected plans</h3>" +
                 table(cols, key_rows, num, row_class=lambda i: "hl" if key[i]["path"] in chosen.values() else ""))
    allrows = [row(r) for r in d.candidates]
    parts.append(details(f"all {len(allrows)} candidates", table(
        cols, allrows, num, row_class=lambda i: "hl" if d.candidates[i]["path"] in chosen.values() else "")))
    grids = [r for r in d.selection if r.get("grid") and not r.get("duplicate_of") and (d.root / r["grid"]).exists()]
    if grids:
        ref = ""
        if d.select_reference:
            ref = ("<p>full precision (selection prompts)</p>" +
                   image_file(d.root / d.select_reference, "full precision", max_side * 4, display=None))
        rows = [[esc(r["kind"]), esc(fmt(r["rank"])), esc(r["path"]), esc(fmt(r["mib"])), esc(fmt(r["mse"])),
                 esc(fmt(r["ssim"])), image_file(d.root / r["grid"], r["path"], max_side * 4)] for r in grids]
        parts.append(details(f"selection images of the {len(grids)} distinct candidates (ranked by the select stage)",
                             ref + table(["kind", "rank", "plan", "MiB", "MSE", "SSIM", "images"], rows,
                                         [False, True, False, True, True, True, False], raw=True)))
    arts = ["plans/", "pareto.csv"] + (["select_candidates.csv"] if d.selection else [])
    return section("candidates", "".join(parts), arts, sources=_sources(d, "select"))


def allocation_section(d: WorkspaceData, figs: Mapping[str, bytes | None]) -> str | None:
    if not d.finals or not d.layers:
        return None
    parts = []
    rows = []
    for kind, f in d.finals.items():
        h = f.header
        mb = h.get("achieved_mean_bits") or {}
        rows.append([kind, f.path, h.get("selected_from"), f.typed.budget_value, h.get("K"), h.get("seed"),
                     mb.get("content"), mb.get("quality"), mb.get("overall"), h.get("mib"), h.get("score"),
                     ", ".join(f"{k} {fmt(v)}" for k, v in (h.get("selection_scores") or {}).items())])
    parts.append(table(["kind", "file", "selected from", "target", "K", "seed", "mean bits content", "quality",
                        "overall", "MiB", "score", "selection scores"], rows,
                       [False, False, False, True, True, True, True, True, True, True, True, False]))
    parts.append(chart(figs.get("allocation"), "final allocation per block"))
    parts.append(chart(figs.get("depth"), "bits by depth"))
    brows = []
    w = {r["block"]: r for r in allocation_by_block(d.layers, d.finals["weight"].bits, "params")} \
        if "weight" in d.finals else {}
    a = {r["block"]: r for r in allocation_by_block(d.layers, d.finals["act"].bits, "act_elems")} \
        if "act" in d.finals else {}
    bits_seen = sorted({b for r in list(w.values()) + list(a.values()) for b in r["layers_by_bits"]})
    for bl in d.blocks:
        if bl not in w and bl not in a:
            continue
        row = [bl, sum((w.get(bl) or a.get(bl))["layers_by_bits"].values())]
        row.append(w[bl]["mean_bits"] if bl in w else None)
        row += [w[bl]["layers_by_bits"].get(b, 0) if bl in w else None for b in bits_seen]
        row.append(a[bl]["mean_bits"] if bl in a else None)
        row += [a[bl]["layers_by_bits"].get(b, 0) if bl in a else None for b in bits_seen]
        brows.append(row)
    blabel = [("fp" if b >= FULL_PRECISION_BITS else f"{b}b") for b in bits_seen]
    cols = (["block", "layers", "W mean bits"] + [f"W {x}" for x in blabel] + ["A mean bits"] +
            [f"A {x}" for x in blabel])
    parts.append("<h3>Per block (layers at each bit-width)</h3>" + table(cols, brows, [False] + [True] * (len(cols) - 1)))
    parts.append(f'<p class="source">final plans {esc(d.plans_digest)}</p>')
    lat = final_plan_latency(d)
    if lat and "error" in lat:
        parts.append(f"<p>Latency table: cannot predict the final plans ({esc(lat['error'])}).</p>")
    elif lat:
        slower = ("<strong>slower than 16 bit</strong>: a latency budget (<code>stage=allocate "
                  "stage.budget=latency stage.budget_ms=1x</code>) keeps a plan at or under it")
        verdict = slower if lat["slower_than_16bit"] else "not slower than 16 bit"
        parts.append(f"<p>Latency table{' at ' + esc(lat['shape']) if lat['shape'] else ''}"
                     f"{'' if lat['calibrated'] else ' (uncalibrated)'}: the final plans predicted "
                     f"{fmt(lat['predicted_ms'])} ms against {fmt(lat['model_ms'])} ms at 16 bit "
                     f"({fmt(lat['speedup'])}x), {verdict}.</p>")
    if d.infer:
        wts = d.infer.get("weights") or {}
        parts.append("<h3>Final inference (infer.json)</h3>" + source_note(d.source("infer")) + kv_table([
            ("images", d.infer.get("images")), ("PSNR vs full precision (dB)", d.infer.get("psnr_db")),
            ("SSIM vs full precision", d.infer.get("ssim")), ("adherence", d.infer.get("adherence")),
            ("adherence, full precision", d.infer.get("adherence_full_precision")),
            ("quantized layers MiB (fp16)", f"{fmt(wts.get('quantized_layers_mib'))} ({fmt(wts.get('fp16_mib'))})"),
            ("compression vs fp16", wts.get("compression")),
            ("dispatch", ", ".join(f"{k}: {v}" for k, v in (d.infer.get("dispatch_counts") or {}).items()))]))
    return section("allocation", "".join(parts), [f.path for f in d.finals.values()] +
                   (["infer.json"] if d.infer else []), sources=[d.source("infer")] if d.infer else [])


def images_section(d: WorkspaceData, manifest: Mapping[str, Any] | None, max_side: int, note: str | None) -> str | None:
    display = 112
    if manifest and manifest.get("variants"):
        vs = manifest["variants"]
        heads = []
        for v in vs:
            s = v.get("scores") or {}
            bits = " · ".join(f"{x} {fmt(v[k], 3)}" if v.get(k) is not None else f"{x} fp"
                              for x, k in (("W", "weight_mean_bits"), ("A", "act_mean_bits"))) + " bits"
            mib = f"{fmt(v.get('weight_mib'), 3)} MiB" if v.get("weight_mib") is not None else ""
            sc = " · ".join(f"{lbl} {fmt(s[k], 4)}" for k, lbl in (("psnr_db", "PSNR"), ("ssim", "SSIM"),
                                                                  ("adherence", "adh.")) if s.get(k) is not None)
            heads.append(f'<b>{esc(v["label"])}</b><br><span class="cap">{esc(bits)}<br>{esc(mib)}</span>'
                         f'<br><span class="cap">{esc(sc)}</span>')
        rows = []
        for i, (prompt, seed) in enumerate(manifest["prompts"]):
            cells = [f'<td class="prompt">{esc(prompt)}<br><span class="cap">seed {esc(seed)}</span></td>']
            for v in vs:
                f = d.root / v["files"][i]
                psnr = (v.get("per_image") or {}).get("psnr_db")
                cap = f"PSNR {fmt(psnr[i], 3)} dB" if psnr else ""
                img = image_file(f, f"{v['label']}: {prompt}", max_side, display) if f.exists() else "missing"
                cells.append(f'<td>{img}<span class="cap">{esc(cap)}</span></td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        head = "<th>prompt</th>" + "".join(f"<th>{h}</th>" for h in heads)
        desc = "".join(f"<li><b>{esc(v['label'])}</b>: {esc(v['description'])}</li>" for v in vs)
        inner = (f'<p class="note">{len(manifest["prompts"])} prompts, generated by the report stage with the '
                 f"calibrated model; scores against the full-precision images of the same prompt and seed.</p>"
                 f'<ul class="note">{desc}</ul>'
                 f'<table class="imgs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
        return section("images", inner, ["report/images.json"], sources=[_images_source(d, manifest)])
    if d.generated:
        rows = []
        psnr = ((d.infer or {}).get("per_image") or {}).get("psnr_db") or []
        for i, (q, fp) in enumerate(d.generated):
            from PIL import Image
            with Image.open(d.root / q) as im:
                prompt = im.text.get("prompt", Path(q).stem) if hasattr(im, "text") else Path(q).stem
            cap = f"PSNR {fmt(psnr[i], 3)} dB" if i < len(psnr) else ""
            rows.append([esc(prompt), image_file(d.root / fp, "full precision", max_side, display) if fp else "–",
                         image_file(d.root / q, "final plans", max_side, display) + f'<span class="cap">{esc(cap)}</span>'])
        inner = ((f'<p class="note">{esc(note)}</p>' if note else "") +
                 '<p class="note">Images of the infer stage (final weight + activation plans).</p>' +
                 table(["prompt", "full precision", "final plans"], rows, raw=True, cls="imgs"))
        return section("images", inner, ["generated_images/"], sources=[d.source("infer")] if d.infer else [])
    return None


def ablation_section(d: WorkspaceData, figs: Mapping[str, bytes | None]) -> str | None:
    if not d.evaluate and not d.evaluate_md:
        return None
    rows = (d.evaluate or {}).get("rows") or []
    parts = []
    good = [r for r in rows if isinstance(r, Mapping) and isinstance(r.get("scores"), Mapping)]
    if good:
        keys = [k for k in ("adherence", "ssim", "psnr_db") if any(k in r["scores"] for r in good)]

        def ms(s, k):
            return f"{fmt(s[k]['mean'], 4)} ± {fmt(s[k].get('std', 0.0), 2)}" if k in s else "–"
        def mib(r, key):  # evaluate.json rows from before byte accounting have no bytes
            return None if r.get(key) is None else r[key] / (1 << 20)
        trs = [[r.get("point"), r.get("method"), mib(r, "weight_bytes"), r.get("weight_mean_bits"),
                r.get("act_mean_bits")] + [ms(r["scores"], k) for k in keys] for r in good]
        parts.append(table(["point", "method", "weight MiB", "weight bits", "act bits"] + keys, trs,
                           [False, False, True, True, True] + [True] * len(keys)))
        parts.append(chart(figs.get("ablation"), "ablation"))
        fpa = (d.evaluate or {}).get("full_precision_adherence")
        if fpa is not None:
            parts.append(f'<p class="note">Full-precision adherence on the same prompts and seeds: {fmt(fpa)}; '
                         f'{(d.evaluate or {}).get("seed_sets")} seed sets of '
                         f'{(d.evaluate or {}).get("evaluation_images_per_seed_set")} images.</p>')
    elif d.evaluate_md:
        parts.append(f"<pre>{esc(d.evaluate_md)}</pre>")
    if d.evaluate_md and good:
        parts.append(details("evaluate.md", f"<pre>{esc(d.evaluate_md)}</pre>"))
    return section("ablation", "".join(parts), ["evaluate.json"] + (["evaluate.md"] if d.evaluate_md else []),
                   sources=[d.source("evaluate")] if "evaluate" in d.stages else [])


def _flatten(obj: Any, prefix: str = "", out: list | None = None, limit: int = 300) -> list[tuple[str, Any]]:
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, limit)
    elif isinstance(obj, list) and obj and all(not isinstance(x, (Mapping, list)) for x in obj) and len(obj) <= 12:
        out.append((prefix, ", ".join(fmt(x) for x in obj)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            _flatten(v, f"{prefix}[{i}]", out, limit)
    else:
        out.append((prefix, obj))
    return out


def benchmark_section(d: WorkspaceData) -> str | None:
    if not d.benchmark:
        return None
    parts = []
    plan_rows = benchmark_plan_rows(d.benchmark)
    if plan_rows:
        cols = list(dict.fromkeys(c for r in plan_rows for c in r))
        parts.append("<h3>plans</h3>" + table(cols, [[r.get(c) for c in cols] for r in plan_rows],
                                              [c != "plan" for c in cols]))
    lists = {k: v for k, v in d.benchmark.items() if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v)}
    for k, v in lists.items():
        cols = list(dict.fromkeys(c for x in v for c, val in x.items() if not isinstance(val, (Mapping, list))))
        parts.append(f"<h3>{esc(k)}</h3>" + table(cols, [[x.get(c) for c in cols] for x in v],
                                                   [isinstance(v[0].get(c), (int, float)) for c in cols]))
    rest = {k: v for k, v in d.benchmark.items() if k not in lists}
    flat = _flatten(rest)
    if flat:
        parts.append(kv_table(flat))
    return section("benchmark", "".join(parts), ["benchmark.json"], sources=_sources(d, "benchmark"))


def _latency_table_note(d: WorkspaceData) -> str:
    """One line on how the predictions were made: the table's 16-bit time and its calibration."""
    try:
        data = d.latency_table_json
    except (OSError, ValueError):
        data = None
    if not data:
        return ""
    cal = (data.get("meta") or {}).get("calibration") or {}
    if "measured_ms" in cal:
        how = (f"calibrated: the fastest plan ({cal.get('quantized_layers', '?')} quantized layers) measured "
               f"{fmt(cal['measured_ms'])} ms against {fmt(cal.get('predicted_ms'))} ms predicted from its layers, so "
               f"each quantized layer adds {fmt(1000 * float(data.get('quantized_layer_ms') or 0.0))} us")
    else:
        how = "not calibrated (" + str(cal.get("skipped", "stage.calibrate=false or an older table")) + ")"
    return (f"<p>Latency table: 16-bit denoiser {fmt(data.get('model_ms'))} ms; overhead per quantized layer "
            f"{esc(how)}.</p>")


def latency_section(d: WorkspaceData) -> str | None:
    """The latency-budget plans (stage=allocate stage.budget=latency), their front, and where
    stage=benchmark timed them, the measured latency against the prediction."""
    rows = latency_rows(d)
    if not rows:
        return None
    cols = ["budget_ms", "budget_mib", "predicted_ms", "measured_ms", "error_pct", "within_budget", "mib", "score", "K",
            "seed", "status", "pareto", "pareto_measured", "path"]
    if not any("measured_ms" in r for r in rows):
        cols = [c for c in cols if c not in ("measured_ms", "error_pct", "within_budget", "pareto_measured")]
    if not any(r.get("budget_mib") is not None for r in rows):  # no byte caps: no byte columns
        cols = [c for c in cols if c not in ("budget_mib", "mib")]
    nums = ("budget_ms", "budget_mib", "predicted_ms", "measured_ms", "error_pct", "mib", "score", "K")
    body = table(cols, [[r.get(c) for c in cols] for r in rows], [c in nums for c in cols])
    png = d.root / artifacts.PARETO_LATENCY_PNG
    img = image_file(png, "score vs predicted latency", 720) if png.exists() else ""
    body = _latency_table_note(d) + body
    return section("latency", img + body, [artifacts.PARETO_LATENCY_CSV, artifacts.PARETO_LATENCY_PNG,
                                           artifacts.LAYER_LATENCY])


def render_report(d: WorkspaceData, figs: Mapping[str, bytes | None], manifest: Mapping[str, Any] | None = None,
                  max_side: int = 256, images_note: str | None = None) -> tuple[str, list[str]]:
    """The page and the ids of the sections it has (``figs``: :func:`mixprec.report.plots.report_figures`)."""
    builders = [("run", lambda: run_section(d, images_note)), ("census", lambda: census_section(d, figs)),
                ("sensitivity", lambda: sensitivity_section(d, figs)),
                ("candidates", lambda: candidates_section(d, figs, max_side)),
                ("allocation", lambda: allocation_section(d, figs)),
                ("images", lambda: images_section(d, manifest, max_side, images_note)),
                ("ablation", lambda: ablation_section(d, figs)), ("benchmark", lambda: benchmark_section(d)),
                ("latency", lambda: latency_section(d))]
    sections = [(sid, s) for sid, build in builders if (s := build())]
    cfg = d.config() or {}
    model = (cfg.get("model") or {}).get("name", "")
    sub = (f"workspace <code>{esc(d.root)}</code>{' · model ' + esc(model) if model else ''} · built "
           f"{esc(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}")
    return page(f"mixprec report — {d.name}", sub, sections), [sid for sid, _ in sections]


# ------------------------------------------------------------------ comparison page

def _flat_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for k, v in _flatten(cfg or {}, limit=5000):
        if not k.startswith(("paths.", "hydra")) and not k.endswith(("workspace", ".dir")):
            out[k] = v
    return out


def compare_names(items: Sequence[WorkspaceData]) -> list[str]:
    # two workspaces with one folder name (tiny_random in two output dirs) need telling apart
    return [d.name if sum(x.name == d.name for x in items) == 1 else f"{d.root.parent.name}/{d.name}" for d in items]


def render_compare(items: Sequence[WorkspaceData], figs: Mapping[str, bytes | None]) -> tuple[str, list[str]]:
    names = compare_names(items)
    rows = []
    for n, d in zip(names, items):
        fp = next(iter(d.fingerprints().values()), {})
        row = [n, str(d.root), fp.get("model"), fp.get("quant")]
        for kind in ("weight", "act"):
            c = [r for r in d.candidates if r["kind"] == kind]
            f = d.finals.get(kind)
            mb = (f.header.get("achieved_mean_bits") or {}).get("overall") if f else None
            row += [f"{len(c)} / {sum(r['pareto'] for r in c)}" if c else "–", mb, f.header.get("mib") if f else None,
                    f.header.get("score") if f else None]
        inf = d.infer or {}
        stale = d.source("infer").stale if d.infer else None
        row += [inf.get("psnr_db"), inf.get("ssim"), inf.get("adherence"),
                f"STALE: {stale}" if stale else ("final plans " + str(d.plans_digest) if d.infer else "–")]
        rows.append(row)
    cols = ["workspace", "path", "model fp", "quant fp", "W cand./front", "W mean bits", "W MiB", "W score",
            "A cand./front", "A mean bits", "A MiB", "A score", "PSNR (dB)", "SSIM", "adherence", "inference from"]
    stale_rows = {i for i, r in enumerate(rows) if str(r[-1]).startswith("STALE")}
    sections = [("workspaces", section("workspaces", table(
        cols, rows, [False] * 4 + [False, True, True, True] * 2 + [True] * 3 + [False],
        row_class=lambda i: "warn" if i in stale_rows else ""), ["pareto.csv", "final_*_mp.yaml"]))]
    png = figs.get("compare_pareto")
    if png:
        fronts = ""
        for n, d in zip(names, items):
            front = [r for r in d.candidates if r["pareto"]]
            fronts += details(f"{n}: {len(front)} front points", table(
                ["kind", "plan", "target", "K", "seed", "mean bits", "MiB", "score"],
                [[r["kind"], r["path"], r["target"], r["K"], r["seed"], r["mean_bits_overall"], r["mib"], r["score"]]
                 for r in front], [False, False, True, True, True, True, True, True]))
        sections.append(("fronts", section("fronts", chart(png, "Pareto fronts") + fronts, ["pareto.csv"])))
    with_finals = [(n, d.layers, d.finals) for n, d in zip(names, items) if d.finals and d.layers]
    if with_finals:
        inner = chart(figs.get("compare_allocation"), "final plans per block")
        agree = []
        for i in range(len(with_finals)):
            for j in range(i + 1, len(with_finals)):
                for kind in ("weight", "act"):
                    a, b = with_finals[i][2].get(kind), with_finals[j][2].get(kind)
                    if a and b:
                        common = set(a.bits) & set(b.bits)
                        same = sum(a.bits[n] == b.bits[n] for n in common)
                        agree.append([with_finals[i][0], with_finals[j][0], kind, len(common),
                                      same / len(common) if common else None])
        if agree:
            inner += "<h3>Agreement of the final plans</h3>" + table(
                ["workspace", "workspace", "kind", "common layers", "same bits (fraction)"], agree,
                [False, False, False, True, True])
        sections.append(("finals", section("finals", inner, ["final_*_mp.yaml", "layers.csv"])))
    flats = [_flat_config(d.config()) for d in items]
    keys = sorted(set().union(*flats)) if flats else []
    diff = [[k] + [flats[i].get(k) for i in range(len(items))] for k in keys
            if len({repr(f.get(k)) for f in flats}) > 1]
    if diff:
        sections.append(("config", section("config", table(["setting"] + names, diff[:300]), ["<stage>.json"])))
    sub = f"{len(items)} workspaces · built {esc(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}"
    return page("mixprec comparison — " + " vs ".join(names), sub, sections), [sid for sid, _ in sections]
