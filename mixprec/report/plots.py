"""The report's figures (matplotlib, Agg): each function returns PNG bytes.

Layers are drawn in data-flow order (see :func:`mixprec.report.data.flow_phase`) with the blocks
as alternating bands, so "where in the network" reads the same in every chart.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .data import FULL_PRECISION_BITS, Layer, allocation_by_block, census_by_block  # noqa: E402

DPI = 100
MARKERS = "os^Dv<>pP*hX"
KIND_LABEL = {"weight": "weights", "act": "activations"}
SIZE_LABEL = {"weight": "MiB (packed weights + scales)", "act": "MiB (input activations / image)"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def short_block(block: str) -> str:
    return (block.replace("down_blocks.", "down ").replace("up_blocks.", "up ").replace("mid_block", "mid")
            .replace("time_embedding", "t-emb").replace("add_embedding", "add-emb"))


def bit_color(b: int):
    if b >= FULL_PRECISION_BITS:
        return "#9e9e9e"
    # 2 bits red ... 8 bits green: low precision should look alarming
    return plt.get_cmap("RdYlGn")(min(1.0, max(0.0, (b - 2) / 6.0)) * 0.85 + 0.075)


def human(n: float) -> str:
    """1.2k, 3.4M, 2.6G: sizes of blocks differ by five orders of magnitude between a tiny model and SDXL."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def block_spans(layers: Sequence[Layer]) -> list[tuple[str, int, int]]:
    """(block, first depth, last depth + 1) for each contiguous run of a block in depth order."""
    spans: list[tuple[str, int, int]] = []
    for i, l in enumerate(layers):
        if spans and spans[-1][0] == l.block:
            spans[-1] = (l.block, spans[-1][1], i + 1)
        else:
            spans.append((l.block, i, i + 1))
    return spans


def _bands(ax, spans, n: int, labels: bool = True, shade: bool = True) -> None:
    for j, (block, a, b) in enumerate(spans):
        if shade and j % 2:
            ax.axvspan(a - 0.5, b - 0.5, color="#000000", alpha=0.045, lw=0)
        if labels and (b - a) / max(n, 1) >= 0.025:
            ax.text((a + b - 1) / 2, 1.01, short_block(block), transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=7, color="#444444", clip_on=False)
    ax.set_xlim(-0.5, n - 0.5)


# ------------------------------------------------------------------ census

def census_chart(layers: Sequence[Layer]) -> bytes:
    rows = census_by_block(layers)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    content = [sum(l.params for l in layers if l.block == r["block"] and l.group == "content" and not l.excluded)
               for r in rows]
    quality = [sum(l.params for l in layers if l.block == r["block"] and l.group == "quality" and not l.excluded)
               for r in rows]
    total = sum(content) + sum(quality)
    div, unit = (1e6, "millions") if total >= 1e7 else (1e3, "thousands")
    ax.barh(y, [c / div for c in content], color="#4c78a8", label="content (attn2, ff)")
    ax.barh(y, [q / div for q in quality], left=[c / div for c in content], color="#f58518", label="quality (others)")
    top = max((c + q) / div for c, q in zip(content, quality)) if rows else 1
    for yi, r, c, q in zip(y, rows, content, quality):
        ax.text((c + q) / div + top * 0.01, yi, f"{r['layers']} layers · {human(c + q)}", va="center", fontsize=7,
                color="#333333")
    ax.set_yticks(y, [r["block"] for r in rows], fontsize=8)
    ax.set_xlabel(f"parameters ({unit})")
    ax.set_xlim(0, top * 1.22)
    ax.set_title("Quantizable parameters per block", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ sensitivity

def sensitivity_chart(layers: Sequence[Layer], tables: Mapping[tuple[str, str], Mapping[str, Mapping[int, float]]],
                      kind: str, cap_db: float = 100.0) -> bytes | None:
    """One figure per kind ("w"/"a"): a panel per group, one line per bit-width, x = depth."""
    groups = [g for g in ("content", "quality") if tables.get((kind, g))]
    if not groups:
        return None
    q = [l for l in layers if not l.excluded]
    depth = {l.name: i for i, l in enumerate(q)}
    spans = block_spans(q)
    prot = {l.name for l in q if l.protected}
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.1 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        table = tables[(kind, g)]
        names = sorted((n for n in table if n in depth), key=depth.get)
        bits = sorted({b for n in names for b in table[n]})
        _bands(ax, spans, len(q))
        for b in bits:
            xs = [depth[n] for n in names if b in table[n]]
            if g == "content":
                # SSIM sits at 0.9999... for most layers: 1 - SSIM on a log axis shows the spread
                ys = [max(1.0 - table[n][b], 1e-9) for n in names if b in table[n]]
            else:
                ys = [min(table[n][b], cap_db) if math.isfinite(table[n][b]) else cap_db for n in names if b in table[n]]
            ax.plot(xs, ys, marker=".", ms=3 if len(xs) > 200 else 5, lw=0.6, color=bit_color(b),
                    label=f"{'W' if kind == 'w' else 'A'}{b}")
        if kind == "a" and prot:
            px = [depth[n] for n in names if n in prot]
            if px:
                ax.scatter(px, [ax.get_ylim()[0]] * len(px), marker="^", color="black", s=18, zorder=5, clip_on=False,
                           label="protected (fp)")
        if g == "content":
            ax.set_yscale("log")
            ax.set_ylabel("1 − SSIM (log)\nlower = less sensitive", fontsize=8)
        else:
            ax.set_ylabel("SQNR (dB)\nhigher = less sensitive", fontsize=8)
        ax.set_title(f"{'weight' if kind == 'w' else 'activation'} sensitivity — {g} layers ({len(names)})",
                     fontsize=10, pad=14)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="upper right", ncol=len(bits) + 1)
    axes[-1, 0].set_xlabel("layer depth (data-flow order; bands = blocks)")
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ candidates

def _k_colors(ks: Sequence[float]):
    cmap = plt.get_cmap("viridis")
    return {k: cmap(0.15 + 0.7 * i / max(len(ks) - 1, 1)) for i, k in enumerate(ks)}


def pareto_chart(candidates: Sequence[Mapping[str, Any]], chosen: Mapping[str, str]) -> bytes | None:
    """Size vs score per kind: colour = K, marker = seed, red step = front, gold star = the plan kept."""
    kinds = [k for k in ("weight", "act") if any(c["kind"] == k for c in candidates)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 5.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        pts = [c for c in candidates if c["kind"] == kind and c.get("mib") is not None and c.get("score") is not None]
        ks = sorted({float(c.get("K") or 1.0) for c in pts})
        seeds = sorted({int(c.get("seed") or 0) for c in pts})
        colors = _k_colors(ks)
        for c in pts:
            ax.scatter(c["mib"], c["score"], color=colors[float(c.get("K") or 1.0)],
                       marker=MARKERS[seeds.index(int(c.get("seed") or 0)) % len(MARKERS)], s=34, alpha=0.8,
                       edgecolors="none", zorder=3)
        front = sorted((c for c in pts if c.get("pareto")), key=lambda c: (c["mib"], -c["score"]))
        if front:
            ax.step([c["mib"] for c in front], [c["score"] for c in front], where="post", color="crimson", lw=1.2,
                    zorder=2)
            ax.scatter([c["mib"] for c in front], [c["score"] for c in front], facecolors="none",
                       edgecolors="crimson", s=95, lw=1.2, zorder=4)
        pick = [c for c in pts if c.get("path") == chosen.get(kind)]
        xs = [c["mib"] for c in pts]
        mid = (min(xs) + max(xs)) / 2 if xs else 0
        for c in pick:
            ax.scatter(c["mib"], c["score"], marker="*", s=340, color="gold", edgecolors="black", lw=0.8, zorder=6)
            right = c["mib"] <= mid  # label towards the middle so it never leaves the axes
            ax.annotate(f"selected: {c['path'].split('/')[1]}", (c["mib"], c["score"]),
                        xytext=(12 if right else -12, 10), textcoords="offset points", fontsize=8,
                        ha="left" if right else "right",
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="#999999", alpha=0.9))
        handles = [Line2D([], [], ls="", marker="o", color=colors[k], label=f"K={k:g}") for k in ks]
        handles += [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="grey", label=f"seed {s}")
                    for i, s in enumerate(seeds)]
        handles.append(Line2D([], [], color="crimson", marker="o", mfc="none", label="Pareto front"))
        if pick:
            handles.append(Line2D([], [], ls="", marker="*", ms=13, color="gold", mec="black", label="selected"))
        # below the axes: inside, it hides the small plans where the front starts
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=min(len(handles), 6), frameon=False)
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel(SIZE_LABEL[kind])
        ax.set_ylabel("score (normalised metric, K=1, seed-0 table)")
        ax.set_title(f"{KIND_LABEL[kind]}: {len(pts)} candidates, {len(front)} on the front", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ final allocation

def allocation_chart(layers: Sequence[Layer], finals: Mapping[str, Any]) -> bytes | None:
    """Per block, the share of parameters (weights) / input elements (activations) at each bit-width."""
    kinds = [k for k in ("weight", "act") if k in finals]
    if not kinds or not layers:
        return None
    blocks = list(dict.fromkeys(l.block for l in layers if not l.excluded))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.6 * len(kinds), 0.36 * len(blocks) + 1.6), squeeze=False)
    all_bits: set[int] = set()
    for ax, kind in zip(axes[0], kinds):
        attr = "params" if kind == "weight" else "act_elems"
        rows = {r["block"]: r for r in allocation_by_block(layers, finals[kind].bits, attr)}
        y = list(range(len(blocks)))[::-1]
        bits = sorted({b for r in rows.values() for b in r["by_bits"]})
        all_bits |= set(bits)
        left = [0.0] * len(blocks)
        for b in bits:
            frac = [rows[bl]["by_bits"].get(b, 0) / rows[bl]["size"] if rows[bl]["size"] else 0 for bl in blocks]
            ax.barh(y, frac, left=left, color=bit_color(b), edgecolor="white", lw=0.4)
            left = [a + f for a, f in zip(left, frac)]
        for yi, bl in zip(y, blocks):
            r = rows[bl]
            mb = f"{r['mean_bits']:.2f} b" if r["mean_bits"] is not None else "fp"
            ax.text(1.01, yi, f"{mb} · {human(r['size'])}", va="center", fontsize=7, transform=ax.get_yaxis_transform())
        ax.set_yticks(y, blocks, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of " + ("parameters" if kind == "weight" else "input-activation elements"))
        h = finals[kind].header.get("achieved_mean_bits") or {}
        ax.set_title(f"{KIND_LABEL[kind]} ({finals[kind].path}): mean {h.get('overall', float('nan')):.2f} bits",
                     fontsize=10)
    handles = [Patch(color=bit_color(b), label="full precision" if b >= FULL_PRECISION_BITS else f"{b} bits")
               for b in sorted(all_bits)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 0.93, 1))
    return _png(fig)


def depth_strip(layers: Sequence[Layer], finals: Mapping[str, Any]) -> bytes | None:
    """Bits of every layer along the depth, one row per kind: where the low bits went."""
    kinds = [k for k in ("weight", "act") if k in finals]
    q = [l for l in layers if not l.excluded]
    if not kinds or not q:
        return None
    bits = sorted({int(finals[k].bits.get(l.name, FULL_PRECISION_BITS)) for k in kinds for l in q})
    index = {b: i for i, b in enumerate(bits)}
    grid = [[index[int(finals[k].bits.get(l.name, FULL_PRECISION_BITS))] for l in q] for k in kinds]
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(kinds) + 1.3))
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap([bit_color(b) for b in bits]),
              vmin=-0.5, vmax=len(bits) - 0.5, extent=(-0.5, len(q) - 0.5, len(kinds) - 0.5, -0.5))
    spans = block_spans(q)
    for _, a, _b in spans[1:]:
        ax.axvline(a - 0.5, color="white", lw=1.2)
    _bands(ax, spans, len(q), shade=False)
    ax.set_yticks(range(len(kinds)), [KIND_LABEL[k] for k in kinds], fontsize=8)
    ax.set_xlabel("layer depth (data-flow order; lines = block boundaries)")
    handles = [Patch(color=bit_color(b), label="full precision" if b >= FULL_PRECISION_BITS else f"{b} bits")
               for b in bits]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(handles), fontsize=8,
              frameon=False)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ evaluation

def ablation_chart(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """evaluate.json rows: one panel per score, bars per method grouped by budget point, std as error bars."""
    rows = [r for r in rows if isinstance(r, Mapping) and isinstance(r.get("scores"), Mapping)]
    if not rows:
        return None
    points = list(dict.fromkeys(r["point"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = [k for k in ("adherence", "ssim", "psnr_db") if any(k in r["scores"] for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    colors = plt.get_cmap("tab10")
    for ax, key in zip(axes[0], keys):
        for mi, m in enumerate(methods):
            xs, ys, es = [], [], []
            for pi, p in enumerate(points):
                r = next((r for r in rows if r["point"] == p and r["method"] == m), None)
                if r and key in r["scores"]:
                    xs.append(pi + (mi - (len(methods) - 1) / 2) * width)
                    ys.append(r["scores"][key]["mean"])
                    es.append(r["scores"][key].get("std", 0.0))
            ax.bar(xs, ys, width=width, yerr=es, capsize=2, color=colors(mi), label=m)
        ax.set_xticks(range(len(points)), points, fontsize=8)
        ax.set_title({"adherence": "caption adherence", "ssim": "SSIM vs full precision",
                      "psnr_db": "PSNR vs full precision (dB)"}[key], fontsize=10)
        if key == "ssim":
            lo = min((r["scores"][key]["mean"] for r in rows if key in r["scores"]), default=0)
            ax.set_ylim(max(0.0, lo - 0.1 * (1 - lo) - 0.02), 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ comparison of workspaces

def compare_pareto_chart(families: Sequence[tuple[str, Sequence[Mapping[str, Any]], Mapping[str, str]]]) -> bytes | None:
    """Every workspace's candidates (faint) and front (line), one colour per workspace, a panel per kind."""
    kinds = [k for k in ("weight", "act") if any(c["kind"] == k for _, cands, _ in families for c in cands)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.6 * len(kinds), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, kind in zip(axes[0], kinds):
        for i, (name, cands, chosen) in enumerate(families):
            pts = [c for c in cands if c["kind"] == kind and c.get("mib") is not None and c.get("score") is not None]
            if not pts:
                continue
            col = colors(i % 10)
            ax.scatter([c["mib"] for c in pts], [c["score"] for c in pts], color=col, s=16, alpha=0.35, lw=0)
            front = sorted((c for c in pts if c.get("pareto")), key=lambda c: (c["mib"], -c["score"]))
            if front:  # fronts often coincide: dashes and markers keep the one drawn first visible
                ax.step([c["mib"] for c in front], [c["score"] for c in front], where="post", color=col,
                        lw=2.2 - 0.4 * (i % 3), ls=("-", "--", ":", "-.")[i % 4], marker=MARKERS[i % len(MARKERS)],
                        ms=5, mfc="none", label=f"{name} ({len(pts)} cand., {len(front)} front)")
            for c in pts:
                if c.get("path") == chosen.get(kind):
                    ax.scatter(c["mib"], c["score"], marker="*", s=300, color=col, edgecolors="black", lw=0.8,
                               zorder=6)
        ax.set_xlabel(SIZE_LABEL[kind])
        ax.set_ylabel("score (normalised metric, K=1, seed-0 table)")
        ax.set_title(f"{KIND_LABEL[kind]}: Pareto fronts (stars = selected)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def compare_allocation_chart(items: Sequence[tuple[str, Sequence[Layer], Mapping[str, Any]]]) -> bytes | None:
    """Mean bits per block of each workspace's final plans, grouped bars, a panel per kind."""
    kinds = [k for k in ("weight", "act") if any(k in finals for _, _, finals in items)]
    if not kinds:
        return None
    blocks = list(dict.fromkeys(l.block for _, layers, _ in items for l in layers if not l.excluded))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.6 * len(kinds), 0.42 * len(blocks) + 1.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    height = 0.8 / max(len(items), 1)
    for ax, kind in zip(axes[0], kinds):
        y0 = list(range(len(blocks)))[::-1]
        for i, (name, layers, finals) in enumerate(items):
            if kind not in finals:
                continue
            attr = "params" if kind == "weight" else "act_elems"
            rows = {r["block"]: r for r in allocation_by_block(layers, finals[kind].bits, attr)}
            ys, xs = [], []
            for yi, bl in zip(y0, blocks):
                mb = rows.get(bl, {}).get("mean_bits")
                if mb is not None:
                    ys.append(yi + ((len(items) - 1) / 2 - i) * height)
                    xs.append(mb)
            ax.barh(ys, xs, height=height, color=colors(i % 10), label=name)
        ax.set_yticks(y0, blocks, fontsize=8)
        ax.set_xlabel("mean bits of the block's quantized layers")
        ax.set_title(f"final {KIND_LABEL[kind]} plan per block", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ all figures of a page

def report_figures(d) -> dict[str, bytes | None]:
    """Every chart of a workspace report (None where its artifacts are missing), drawn once for HTML and W&B."""
    figs: dict[str, bytes | None] = {}
    if d.layers:
        figs["census"] = census_chart(d.layers)
        for k in ("w", "a"):
            figs[f"sensitivity_{k}"] = sensitivity_chart(d.layers, d.sensitivity, k) if d.sensitivity else None
        figs["allocation"] = allocation_chart(d.layers, d.finals)
        figs["depth"] = depth_strip(d.layers, d.finals)
    figs["pareto"] = pareto_chart(d.candidates, d.chosen_paths()) if d.candidates else None
    rows = (d.evaluate or {}).get("rows")
    figs["ablation"] = ablation_chart(rows) if isinstance(rows, list) else None
    return figs


def compare_figures(names, items) -> dict[str, bytes | None]:
    return {
        "compare_pareto": compare_pareto_chart([(n, d.candidates, d.chosen_paths()) for n, d in zip(names, items)]),
        "compare_allocation": compare_allocation_chart([(n, d.layers, d.finals) for n, d in zip(names, items)
                                                        if d.finals and d.layers]),
    }
