"""Allocation requests -> plans, and the Pareto family of a workspace's candidates (no Hydra).

One :class:`AllocationRequest` names one candidate (kind, budget, K, seed, the bit-widths each
group may use, the solver's settings); :func:`allocate` solves it against the census and the
per-prompt sensitivity table and returns the plan with its header (see :mod:`mixprec.search.plan`).

``score`` in the header is the normalised objective with K = 1 on the *seed-0* table, the same
yardstick for every candidate of a kind, so that candidates of different K, targets, seeds and
budget types share one Pareto axis (:func:`write_pareto`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixprec import artifacts, search
from mixprec.artifacts import Budget, CensusLayer
from mixprec.search import MIB, PROTECTED_BITS, Plan
from mixprec.workspace import atomic_path

KINDS = tuple(artifacts.KIND_CODES)
PROGRAMS = ("split", "joint")
# stage.program: one program, or "both": the joint program's plans and the split program's plans are all
# candidates of selection (the split ones under plans/<kind>_<target>_<K>_split/), so the selected plan
# is never worse on the selection prompts than the better of the two programs
PROGRAM_CHOICES = PROGRAMS + ("both",)


def programs_of(program: str, setting: str = "stage.program") -> tuple[str, ...]:
    """The programs a ``stage.program`` value solves: ``both`` -> joint and split; one name -> itself."""
    if program not in PROGRAM_CHOICES:
        raise ValueError(f"{setting} must be one of {PROGRAM_CHOICES}, got {program!r}")
    return ("joint", "split") if program == "both" else (program,)


def kind_of(v: Any) -> str:
    """``weight`` / ``act`` from any of the spellings a config may use (``w``, ``acts``, ...)."""
    k = {"w": "weight", "weights": "weight", "a": "act", "acts": "act", "activation": "act",
         "activations": "act"}.get(str(v), str(v))
    if k not in KINDS:
        raise ValueError(f"stage.kind must be weight or act, got {v!r}")
    return k


@dataclass(frozen=True)
class AllocationRequest:
    """One candidate to solve: plain values, usable from a notebook."""

    kind: str                                # "weight" | "act"
    budget: Budget                           # mean bits, or MiB of packed weights + scales
    K: float = 1.0                           # content/quality split (objective weight with MiB budgets)
    seed: int = 0                            # 0 = mean over prompts; >0 = a bootstrap resample
    bits: Mapping[str, Sequence[int]] | None = None  # group -> allowed widths (the recipe's *_bits_by_group)
    solver: str = "cp-sat"
    time_limit_s: float = 10.0
    tolerance: float = 0.1                   # mean bits a group may fall below its target
    bytes_tolerance: float = 0.01            # fraction of the MiB budget the plan may fall below it
    metric_cap: float = 100.0                # per-prompt metric values clamped to [-cap, cap]
    # mean-bit budgets: "split" = the published program (the target split between the groups by K,
    # one program per group, each within `tolerance` bits below its share); "joint" = the target's bytes
    # (mixprec.search.budget) as one program over both groups, within `bytes_tolerance` below it
    program: str = "split"
    # weights: per-group scale options (quant.weight_group_sizes) the program may choose per layer. Group
    # scales cost bytes, not mean bits, so such a request is solved as a byte program ("joint")
    group_sizes: tuple[int, ...] = ()
    # the plan's folder gets "_<program>" (program=both: the split plans beside the joint ones)
    program_in_path: bool = False
    # how the content layers' per-prompt SSIM enters the programs: "ssim" (the published metric) or
    # "ssim_db" (-10 log10(1 - SSIM), mixprec.search.ssim_db: does not saturate near 1). Only for a
    # table whose content layers hold SSIM (not the sqnr_only ablation's SQNR)
    content_metric: str = "ssim"
    # how the quality layers' per-prompt SQNR enters them: "sqnr_db" (the published metric) or "noise_power"
    # (-10^(-SQNR/10), mixprec.search.noise_power: errors add in power, the worst layers dominate)
    quality_metric: str = "sqnr_db"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage.kind must be weight or act, got {self.kind!r}")
        if not self.bits:
            raise ValueError("an allocation request needs the bit-widths each group may use (bits=)")
        if self.program not in PROGRAMS:
            raise ValueError(f"stage.program must be one of {PROGRAMS}, got {self.program!r}")
        if self.content_metric not in search.CONTENT_METRICS:
            raise ValueError(f"stage.content_metric must be one of {search.CONTENT_METRICS}, "
                             f"got {self.content_metric!r}")
        if self.quality_metric not in search.QUALITY_METRICS:
            raise ValueError(f"stage.quality_metric must be one of {search.QUALITY_METRICS}, "
                             f"got {self.quality_metric!r}")

    @property
    def path(self) -> str:
        """Where the plan goes in the workspace."""
        return artifacts.plan_path(self.kind, self.budget, self.K, self.seed,
                                   self.program if self.program_in_path else "")


def reachable_error(kind: str, budget: Budget, census: Sequence[CensusLayer], bits: Mapping[str, Sequence[int]],
                    protected: Sequence[str] = ()) -> str | None:
    """Why no plan of ``kind`` can meet ``budget`` with these widths (None when one can): the check
    the solvers make, done once per budget before any program is built."""
    prot = set(protected)
    layers = [c for c in census if c.name not in prot]
    sizes = search.LayerSizes.of(census)
    if budget.unit == "MiB":
        low = {c.name: min(bits[c.group]) for c in layers} | {p: PROTECTED_BITS for p in prot}
        high = {c.name: max(bits[c.group]) for c in layers} | {p: PROTECTED_BITS for p in prot}
        lo, hi = sizes.plan_bytes(kind, low) / MIB, sizes.plan_bytes(kind, high) / MIB
        if lo <= budget.value:  # above the largest plan: the solver's window check says by how much
            return None
        return (f"budget {budget.value:g} MiB is below the smallest {kind} plan ({lo:.4f} MiB; the largest is "
                f"{hi:.4f} MiB) "
                f"with content bits {list(bits['content'])} and quality bits {list(bits['quality'])}")
    size = {c.name: (c.params if kind == "weight" else c.act_elems) for c in layers}
    group = {g: sum(size[c.name] for c in layers if c.group == g) for g in search.GROUPS}
    total = sum(group.values())
    if not total:
        return None
    lo = sum(group[g] * min(bits[g]) for g in search.GROUPS if group[g]) / total
    hi = sum(group[g] * max(bits[g]) for g in search.GROUPS if group[g]) / total
    if lo - 1e-9 <= budget.value <= hi + 1e-9:
        return None
    return (f"target {budget.value:g} mean bits is outside the reachable range [{lo:.4f}, {hi:.4f}] of {kind} plans "
            f"(content bits {list(bits['content'])} on {group['content']} elements, quality bits "
            f"{list(bits['quality'])} on {group['quality']} elements); choose targets in that range "
            f"(stage.target) or widen the recipe's {kind}_bits_by_group")


def _solve(request: AllocationRequest, metric, groups: Mapping[str, str], sizes: Mapping[str, int],
           params: Mapping[str, int], out_ch: Mapping[str, int], protected: list[str],
           layer_sizes: search.LayerSizes) -> search.Solution:
    r = request
    grouped = r.kind == "weight" and bool(r.group_sizes)  # group scales cost bytes: a byte program
    if grouped or r.budget.unit == "MiB" and r.kind == "act" or r.budget.unit == "mean_bits" and r.program == "joint":
        if r.budget.unit == "MiB":
            budget = r.budget.value * MIB
        else:
            budget = layer_sizes.target_bytes(r.kind, r.budget.value, list(groups), protected)
        what = "input activations per image" if r.kind == "act" else "packed weights + scales"

        def cost(layer: str, key: int | str) -> int:  # key: 4, or a per-group weight option "4g64"
            return layer_sizes.layer_bytes(r.kind, layer, *search.split_option(key))

        return search.solve_budget(metric, groups, cost, sizes, budget, K=float(r.K), bits=r.bits, protected=protected,
                                   tolerance_frac=r.bytes_tolerance, solver=r.solver, time_limit_s=r.time_limit_s,
                                   metric_cap=r.metric_cap, what=what, group_sizes=r.group_sizes if grouped else ())
    if r.budget.unit == "MiB":
        return search.solve_bytes(metric, groups, params, out_ch, r.budget.value, K=float(r.K), bits=r.bits,
                                  protected=protected, tolerance_frac=r.bytes_tolerance, solver=r.solver,
                                  time_limit_s=r.time_limit_s, metric_cap=r.metric_cap)
    if r.kind == "act" and sum(sizes.values()) == 0:
        raise ValueError("layers.csv has no activation sizes (act_elems); rerun the calibrate stage")
    return search.solve_mean_bits(metric, sizes, groups, r.bits, r.budget.value, float(r.K), tolerance=r.tolerance,
                                  protected=protected, solver=r.solver, time_limit_s=r.time_limit_s,
                                  metric_cap=r.metric_cap, kind=r.kind)


def allocate(request: AllocationRequest, census: Sequence[CensusLayer],
             per_prompt: Mapping[str, Mapping[str, Mapping[int, list[float]]]], protected: Sequence[str] = (),
             fingerprints: Mapping[str, str] | None = None) -> tuple[Plan, search.Solution]:
    """Solve one request. ``census``: the quantizable layers; ``per_prompt``: this kind's
    ``{group: {layer: {bits: [value per prompt]}}}``; ``protected``: layers kept at full precision."""
    r = request
    groups = {c.name: c.group for c in census}
    prot = [name for name in protected if name in groups]
    if r.content_metric == "ssim_db":
        per_prompt = {**per_prompt, "content": search.ssim_db(per_prompt["content"], r.metric_cap)}
    if r.quality_metric == "noise_power":
        per_prompt = {**per_prompt, "quality": search.noise_power(per_prompt["quality"], r.metric_cap)}
    metric = {g: search.bootstrap_metric(per_prompt[g], r.seed, cap=r.metric_cap) for g in search.GROUPS}
    reference = metric if r.seed == 0 else {g: search.bootstrap_metric(per_prompt[g], 0, cap=r.metric_cap)
                                            for g in search.GROUPS}
    params = {c.name: c.params for c in census}
    out_ch = {c.name: c.out_channels for c in census}
    sizes = params if r.kind == "weight" else {c.name: c.act_elems for c in census}
    layer_sizes = search.LayerSizes.of(census)
    sol = _solve(r, metric, groups, sizes, params, out_ch, prot, layer_sizes)
    nbytes = layer_sizes.plan_bytes(r.kind, sol.bits, sol.group_size)
    score = search.plan_objective(sol.bits, reference, groups, r.bits, 1.0, prot, r.metric_cap, sol.group_size)
    header = _header(r, sol, nbytes, score, groups, prot, dict(fingerprints or {}))
    return Plan(header=header, bits=sol.bits, group_size=dict(sol.group_size)), sol


def _header(r: AllocationRequest, sol: search.Solution, nbytes: int, score: float, groups: Mapping[str, str],
            prot: list[str], fp: Mapping[str, str]) -> dict[str, Any]:
    """The plan header, keys in the stored order (plans are byte-identical for identical inputs)."""
    return {
        **artifacts.plan_header_fields(r.kind, r.budget, r.K, r.seed),
        "targets": sol.targets or None,
        "achieved_mean_bits": sol.mean_bits,
        "bytes": int(nbytes),
        "mib": nbytes / MIB,
        "objective": sol.objective,
        "objective_by_group": sol.objective_by_group,
        "score": score,
        "solver": sol.solver,
        "status": sol.status,
        "status_by_group": sol.status_by_group or None,
        "deterministic_time": sol.deterministic_time,
        "time_limit_s": float(r.time_limit_s),
        "tolerance": float(r.tolerance) if r.budget.unit == "mean_bits" and r.program == "split"
        else float(r.bytes_tolerance),
        "program": r.program if r.budget.unit == "mean_bits" and not (r.kind == "weight" and r.group_sizes)
        else "joint",
        "bits_allowed": {g: [int(b) for b in r.bits[g]] for g in search.GROUPS},
        "metric_cap": float(r.metric_cap),
        **({"content_metric": r.content_metric} if r.content_metric != "ssim" else {}),
        **({"quality_metric": r.quality_metric} if r.quality_metric != "sqnr_db" else {}),
        "layers": {g: sum(1 for name, gg in groups.items() if gg == g and name not in prot) for g in search.GROUPS},
        **({"group_sizes_allowed": [int(g) for g in r.group_sizes]} if r.kind == "weight" and r.group_sizes else {}),
        "protected": len(prot),
        "protected_bits": PROTECTED_BITS,
        "model_fingerprint": fp.get("model"),
        "quant_fingerprint": fp.get("quant"),
    }


# ---------------------------------------------------------------------------- the Pareto family

def mark_front(rows: Sequence[Mapping[str, Any]], size_rtol: float = 1e-3) -> list[dict[str, Any]]:
    """Rows with ``pareto`` marked per kind (size = MiB, objective = score), in natural path order."""
    marked = []
    for kind in sorted({r["kind"] for r in rows}):
        marked += search.pareto_front([r for r in rows if r["kind"] == kind], size_key="mib", objective_key="score",
                                      size_rtol=size_rtol)
    marked.sort(key=lambda r: search.natural_key(r["path"]))
    return marked


def write_pareto(root: str | os.PathLike, fingerprints: Mapping[str, str] | None = None,
                 size_rtol: float = 1e-3) -> dict[str, Any]:
    """Mark the front per kind and write pareto.csv / pareto.png.

    Sizes within ``size_rtol`` count as equal (see :func:`mixprec.search.pareto_front`): plans of
    one mean-bit target differ by a fraction of a MiB. Candidates made for another model
    (fingerprint differs) are left out, so a workspace reused across models cannot mix families.
    """
    root = Path(root)
    rows = artifacts.collect_candidates(root)
    model_fp = (fingerprints or {}).get("model")
    if model_fp:
        rows = [r for r in rows if r.get("model_fingerprint") in (None, model_fp)]
    marked = mark_front(rows, size_rtol)
    search.write_pareto_csv(root / artifacts.PARETO_CSV, marked, artifacts.PARETO_COLUMNS)
    png = _plot(root / artifacts.PARETO_PNG, marked) if marked else None
    return {"candidates": len(marked), "pareto": sum(r["pareto"] for r in marked),
            "csv": str(root / artifacts.PARETO_CSV), "png": str(png) if png else None, "rows": marked}


def _plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    kinds = sorted({r["kind"] for r in rows})
    if len(kinds) == 1:
        unit = "packed weights + scales" if kinds[0] == "weight" else "activation bytes / image"
        return search.plot_pareto(path, rows, size_key="mib", objective_key="score", xlabel=f"MiB ({unit})",
                                  ylabel="score (normalised metric, K=1, seed-0 table)",
                                  title=f"{kinds[0]} plans: {len(rows)} candidates")
    # one panel per kind, each written by the same helper, then tiled
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    parts = []
    for k in kinds:
        sub = path.with_name(f".{path.stem}_{k}.png")
        parts.append(_plot(sub, [r for r in rows if r["kind"] == k]))
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 5), dpi=110)
    for ax, p in zip(axes, parts):
        ax.imshow(mpimg.imread(p))
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    for p in parts:
        p.unlink(missing_ok=True)
    return path


def log_pareto(track, summary: Mapping[str, Any], root: str | os.PathLike) -> None:
    """The family as a W&B table, scatter and artifact."""
    rows = summary["rows"]
    columns = artifacts.PARETO_COLUMNS
    track.log_table("pareto", columns, [[r.get(c) for c in columns] for r in rows])
    if summary.get("png"):
        track.log_file_image("pareto_scatter", summary["png"])
    track.log_artifact("pareto", "pareto",
                       [Path(root) / artifacts.PARETO_CSV] + ([summary["png"]] if summary.get("png") else []))
    track.summary({"candidates": summary["candidates"], "pareto_points": summary["pareto"]})
