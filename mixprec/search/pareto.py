"""The Pareto family of candidate plans: size (lower is better) vs objective (higher is better)."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mixprec.workspace import atomic_path, atomic_write_text


def pareto_front(points: Sequence[Mapping[str, Any]], size_key: str = "size",
                 objective_key: str = "objective", size_rtol: float = 0.0) -> list[dict[str, Any]]:
    """Copies of ``points`` with ``pareto: True`` on those no other point dominates.

    q dominates p when q is no larger and scores no lower, and is strictly better in one of the
    two. Identical points do not dominate each other, so duplicates are all on the front. Points
    with a missing or NaN size/objective are never on the front. O(n log n).

    ``size_rtol`` > 0 treats sizes within that relative tolerance as equal (q may be up to
    ``size_rtol * size(p)`` larger and still dominate p by scoring higher): mean-bit plans of one
    target differ by a few parameters' worth of bits, which is no reason to keep a worse plan on the
    front. The maximum-score point is never dominated, so the front is never empty. O(n^2) then.
    """
    out = [dict(p) for p in points]
    valid = []
    for i, p in enumerate(out):
        p["pareto"] = False
        s, o = p.get(size_key), p.get(objective_key)
        if s is None or o is None or (isinstance(s, float) and math.isnan(s)) or (isinstance(o, float) and math.isnan(o)):
            continue
        valid.append((float(s), -float(o), i))
    if size_rtol > 0:
        import numpy as np

        if not valid:
            return out
        sz = np.array([v[0] for v in valid])
        ob = -np.array([v[1] for v in valid])
        dominated = np.zeros(len(valid), dtype=bool)
        for a in range(0, len(valid), 1024):  # rows = candidate p, columns = every q
            S, O = sz[a:a + 1024, None], ob[a:a + 1024, None]
            dom = (sz[None, :] <= S * (1 + size_rtol)) & (ob[None, :] >= O) & ((sz[None, :] < S) | (ob[None, :] > O))
            dominated[a:a + 1024] = dom.any(1)
        for (s, o, i), d in zip(valid, dominated):
            out[i]["pareto"] = not bool(d)
        return out
    valid.sort()
    best = -math.inf  # best objective among strictly smaller sizes
    j = 0
    while j < len(valid):
        k = j
        while k < len(valid) and valid[k][0] == valid[j][0]:
            k += 1
        top = -valid[j][1]  # highest objective at this size
        if top > best:
            for s, negobj, i in valid[j:k]:
                if -negobj == top:
                    out[i]["pareto"] = True
            best = top
        j = k
    return out


def write_pareto_csv(path: str | os.PathLike, points: Sequence[Mapping[str, Any]],
                     columns: Sequence[str] | None = None) -> Path:
    """One row per candidate; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = []
        for p in points:
            columns += [k for k in p if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for p in points:
        w.writerow({c: p.get(c) for c in columns})
    return atomic_write_text(path, buf.getvalue())


def plot_pareto(path: str | os.PathLike, points: Sequence[Mapping[str, Any]], size_key: str = "size",
                objective_key: str = "objective", k_key: str = "K", seed_key: str = "seed",
                xlabel: str | None = None, ylabel: str | None = None, title: str | None = None) -> Path:
    """Scatter of size vs objective: colour by K, marker by seed, the front drawn as a step line.

    ``points`` must carry ``pareto`` (see :func:`pareto_front`). Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p.get(size_key) is not None and p.get(objective_key) is not None]
    ks = sorted({float(p.get(k_key, 1.0)) for p in pts})
    seeds = sorted({int(p.get(seed_key, 0)) for p in pts})
    markers = "os^Dv<>pP*hX"
    cmap = plt.get_cmap("viridis", max(len(ks), 2))
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for ki, k in enumerate(ks):
        for si, sd in enumerate(seeds):
            sel = [p for p in pts if float(p.get(k_key, 1.0)) == k and int(p.get(seed_key, 0)) == sd]
            if sel:
                ax.scatter([p[size_key] for p in sel], [p[objective_key] for p in sel], color=cmap(ki),
                           marker=markers[si % len(markers)], s=28, alpha=0.75,
                           label=f"K={k:g}" if si == 0 else None)
    front = sorted((p for p in pts if p.get("pareto")), key=lambda p: (p[size_key], -p[objective_key]))
    if front:
        ax.step([p[size_key] for p in front], [p[objective_key] for p in front], where="post", color="crimson",
                lw=1.2, zorder=3)
        ax.scatter([p[size_key] for p in front], [p[objective_key] for p in front], facecolors="none",
                   edgecolors="crimson", s=90, lw=1.3, zorder=4, label="Pareto front")
    for si, sd in enumerate(seeds):
        ax.scatter([], [], color="grey", marker=markers[si % len(markers)], label=f"seed {sd}")
    ax.set_xlabel(xlabel or size_key)
    ax.set_ylabel(ylabel or objective_key)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
