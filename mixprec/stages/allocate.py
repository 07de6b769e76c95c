"""stage=allocate: sensitivities -> one plan per (kind, target, K, seed), and the Pareto family.

Reads ``layers.csv`` (census), ``sensitivity_per_prompt.csv`` and, for activations,
``protected_layers.yaml``; writes ``plans/<kind>_<target>_<K>/seed<seed>.yaml`` (budget=bytes:
``plans/weight_<MiB>MiB_<K>/...``). ``stage.kind``, ``stage.target``, ``stage.K`` and ``stage.seed``
take a value or a list; a list solves the product in this one job (what the pipeline uses), a
multirun (``sweeps/allocate.yaml``) gives each job one combination and collects the family at the
end with :class:`mixprec.sweep_callbacks.ParetoCallback`.

Plan header (see :mod:`mixprec.search.plan`): the request, the split per group, achieved mean
bits, ``bytes``/``mib`` (weights: packed weights + fp16 per-channel scales, protected layers at
fp16; activations: input-activation bytes per image), ``objective`` (what the program maximized,
see :func:`mixprec.search.solve_mean_bits` / :func:`~mixprec.search.solve_bytes`),
``objective_by_group`` (raw metric sums), ``score`` and the solver's status. ``score`` is the
normalised objective with K = 1 on the *seed-0* table, the same yardstick for every candidate of a
kind, so that candidates of different K, targets, seeds and budget types share one Pareto axis.
Wall-clock solve time is not in the plan (the file must be identical for identical inputs): it is in
``allocate.json``'s headline and the W&B run.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from mixprec import search
from mixprec.search import MIB, PROTECTED_BITS, InfeasibleBudgetError, Plan
from mixprec.workspace import atomic_path

log = logging.getLogger("mixprec")

LAYERS_CSV = "layers.csv"
PER_PROMPT_CSV = "sensitivity_per_prompt.csv"
PROTECTED_YAML = "protected_layers.yaml"
PLANS_DIR = "plans"
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
KINDS = {"weight": "w", "act": "a"}
PARETO_COLUMNS = ["kind", "budget", "target", "K", "seed", "mean_bits_content", "mean_bits_quality",
                  "mean_bits_overall", "mib", "score", "objective", "objective_content", "objective_quality",
                  "status", "solver", "pareto", "path"]


# ---------------------------------------------------------------------------- inputs

def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def read_census(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Quantizable (non-excluded) census rows with ints parsed, in module order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"name", "group", "params", "act_elems", "out_channels"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path} lacks census columns {sorted(need - set(rows[0]))}; rerun the calibrate stage")
    out = []
    for r in rows:
        if _truthy(r.get("excluded", "False")):
            continue
        out.append({"name": r["name"], "group": r["group"], "params": int(r["params"]),
                    "act_elems": int(r["act_elems"] or 0), "out_channels": int(r["out_channels"])})
    return out


_PER_PROMPT_CACHE: dict[tuple, dict] = {}


def read_per_prompt(path: str | os.PathLike) -> dict[str, dict[str, dict[str, dict[int, list[float]]]]]:
    """``{kind: {group: {layer: {bits: [value per prompt]}}}}`` with kind "weight"/"act".

    Cached on (path, size, mtime): a basic-launcher sweep runs every job in one process and would
    otherwise parse the same table a hundred times.
    """
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key in _PER_PROMPT_CACHE:
        return _PER_PROMPT_CACHE[key]
    raw: dict[tuple, dict[int, float]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            raw.setdefault((r["kind"], r["group"], r["layer"], int(r["bits"])), {})[int(r["prompt"])] = float(r["value"])
    code_to_kind = {v: k for k, v in KINDS.items()}
    out: dict[str, dict[str, dict[str, dict[int, list[float]]]]] = {k: {"content": {}, "quality": {}} for k in KINDS}
    for (code, group, layer, b), by_prompt in raw.items():
        kind = code_to_kind.get(code, code)
        if kind not in out or group not in out[kind]:
            raise ValueError(f"{path}: unknown kind/group {code!r}/{group!r} (expected w|a and content|quality)")
        if sorted(by_prompt) != list(range(len(by_prompt))):
            raise ValueError(f"{path}: layer {layer} at {b} bits has prompts {sorted(by_prompt)}, not 0..n-1; "
                             "the sensitivity merge is incomplete — rerun `stage=sensitivity stage.merge_only=true`")
        out[kind][group].setdefault(layer, {})[b] = [by_prompt[i] for i in range(len(by_prompt))]
    _PER_PROMPT_CACHE.clear()
    _PER_PROMPT_CACHE[key] = out
    return out


def _as_list(v: Any) -> list:
    if v is None:
        return [None]
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping))):
        return list(v)
    return [v]


def _kind(v: Any) -> str:
    k = {"w": "weight", "weights": "weight", "a": "act", "acts": "act", "activation": "act",
         "activations": "act"}.get(str(v), str(v))
    if k not in KINDS:
        raise ValueError(f"stage.kind must be weight or act, got {v!r}")
    return k


# ---------------------------------------------------------------------------- one candidate

def allocate_one(*, kind: str, budget: str, target: float | None, budget_mib: float | None, K: float, seed: int,
                 census: Sequence[Mapping[str, Any]], per_prompt: Mapping[str, Mapping[str, Mapping[int, list[float]]]],
                 bits: Mapping[str, Sequence[int]], protected: Sequence[str], solver: str, time_limit_s: float,
                 tolerance: float, bytes_tolerance: float, metric_cap: float,
                 fingerprints: Mapping[str, str] | None = None) -> tuple[Plan, search.Solution]:
    """Solve one (kind, target, K, seed) request; plain arguments, no Hydra."""
    groups = {r["name"]: r["group"] for r in census}
    prot = [l for l in protected if l in groups]
    metric = {g: search.bootstrap_metric(per_prompt[g], seed, cap=metric_cap) for g in search.GROUPS}
    reference = metric if seed == 0 else {g: search.bootstrap_metric(per_prompt[g], 0, cap=metric_cap)
                                          for g in search.GROUPS}
    params = {r["name"]: r["params"] for r in census}
    out_ch = {r["name"]: r["out_channels"] for r in census}
    sizes = params if kind == "weight" else {r["name"]: r["act_elems"] for r in census}
    if budget == "bytes":
        if kind != "weight":
            raise ValueError("stage.budget=bytes budgets packed weights: use it with stage.kind=weight")
        if budget_mib is None:
            raise ValueError("stage.budget=bytes needs stage.budget_mib (MiB of packed weights + scales)")
        sol = search.solve_bytes(metric, groups, params, out_ch, float(budget_mib), K=float(K), bits=bits,
                                 protected=prot, tolerance_frac=bytes_tolerance, solver=solver,
                                 time_limit_s=time_limit_s, metric_cap=metric_cap)
    elif budget == "mean_bits":
        if target is None:
            raise ValueError("stage.budget=mean_bits needs stage.target (mean bits)")
        if kind == "act" and sum(sizes.values()) == 0:
            raise ValueError("layers.csv has no activation sizes (act_elems); rerun the calibrate stage")
        sol = search.solve_mean_bits(metric, sizes, groups, bits, float(target), float(K), tolerance=tolerance,
                                     protected=prot, solver=solver, time_limit_s=time_limit_s,
                                     metric_cap=metric_cap, kind=kind)
    else:
        raise ValueError(f"stage.budget must be mean_bits or bytes, got {budget!r}")

    if kind == "weight":
        nbytes = search.plan_bytes(sol.bits, params, out_ch)
    else:
        nbytes = sum(-(-sizes[l] * b // 8) for l, b in sol.bits.items())
    score = search.plan_objective(sol.bits, reference, groups, bits, 1.0, prot, metric_cap)
    fp = dict(fingerprints or {})
    header = {
        "kind": kind,
        "budget": budget,
        "target": float(target) if target is not None else None,
        "budget_mib": float(budget_mib) if budget_mib is not None else None,
        "K": float(K),
        "seed": int(seed),
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
        "time_limit_s": float(time_limit_s),
        "tolerance": float(tolerance) if budget == "mean_bits" else float(bytes_tolerance),
        "bits_allowed": {g: [int(b) for b in bits[g]] for g in search.GROUPS},
        "metric_cap": float(metric_cap),
        "layers": {g: sum(1 for l, gg in groups.items() if gg == g and l not in prot) for g in search.GROUPS},
        "protected": len(prot),
        "protected_bits": PROTECTED_BITS,
        "model_fingerprint": fp.get("model"),
        "quant_fingerprint": fp.get("quant"),
    }
    return Plan(header=header, bits=sol.bits), sol


def plan_relpath(kind: str, budget: str, target: float | None, budget_mib: float | None, K: float, seed: int) -> str:
    t = budget_mib if budget == "bytes" else target
    return f"{PLANS_DIR}/{search.plan_dirname(kind, float(t), float(K), budget)}/seed{int(seed)}.yaml"


# ---------------------------------------------------------------------------- the Pareto family

def read_plan_header(path: str | os.PathLike) -> dict[str, Any]:
    """Only the header of a plan file: parsing 800 ``bits`` lines per candidate adds up in a sweep."""
    text = Path(path).read_text()
    cut = text.find("\nbits:")
    data = yaml.safe_load(text[:cut] if cut >= 0 else text) or {}
    return dict(data.get("header") or {})


def collect_candidates(root: str | os.PathLike) -> list[dict[str, Any]]:
    root = Path(root)
    rows = []
    for p in sorted((root / PLANS_DIR).glob("*/seed*.yaml"), key=lambda p: search.natural_key(str(p))):
        h = read_plan_header(p)
        mb = h.get("achieved_mean_bits") or {}
        ob = h.get("objective_by_group") or {}
        rows.append({"kind": h.get("kind"), "budget": h.get("budget"),
                     "target": h.get("budget_mib") if h.get("budget") == "bytes" else h.get("target"),
                     "K": h.get("K"), "seed": h.get("seed"), "mean_bits_content": mb.get("content"),
                     "mean_bits_quality": mb.get("quality"), "mean_bits_overall": mb.get("overall"),
                     "mib": h.get("mib"), "score": h.get("score"), "objective": h.get("objective"),
                     "objective_content": ob.get("content"), "objective_quality": ob.get("quality"),
                     "status": h.get("status"), "solver": h.get("solver"),
                     "path": str(p.relative_to(root)), "model_fingerprint": h.get("model_fingerprint")})
    return rows


def write_pareto(root: str | os.PathLike, fingerprints: Mapping[str, str] | None = None,
                 size_rtol: float = 1e-3) -> dict[str, Any]:
    """Mark the front per kind (size = MiB, objective = score) and write pareto.csv / pareto.png.

    Sizes within ``size_rtol`` count as equal (see :func:`mixprec.search.pareto_front`): plans of
    one mean-bit target differ by a fraction of a MiB. Candidates made for another model
    (fingerprint differs) are left out, so a workspace reused across models cannot mix families.
    """
    root = Path(root)
    rows = collect_candidates(root)
    model_fp = (fingerprints or {}).get("model")
    if model_fp:
        rows = [r for r in rows if r.get("model_fingerprint") in (None, model_fp)]
    marked = []
    for kind in sorted({r["kind"] for r in rows}):
        marked += search.pareto_front([r for r in rows if r["kind"] == kind], size_key="mib", objective_key="score",
                                      size_rtol=size_rtol)
    marked.sort(key=lambda r: search.natural_key(r["path"]))
    search.write_pareto_csv(root / PARETO_CSV, marked, PARETO_COLUMNS)
    png = None
    if marked:
        png = _plot(root / PARETO_PNG, marked)
    return {"candidates": len(marked), "pareto": sum(r["pareto"] for r in marked), "csv": str(root / PARETO_CSV),
            "png": str(png) if png else None, "rows": marked}


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
    rows = summary["rows"]
    track.log_table("pareto", PARETO_COLUMNS, [[r.get(c) for c in PARETO_COLUMNS] for r in rows])
    if summary.get("png"):
        track.log_file_image("pareto_scatter", summary["png"])
    track.log_artifact("pareto", "pareto", [Path(root) / PARETO_CSV] + ([summary["png"]] if summary.get("png") else []))
    track.summary({"candidates": summary["candidates"], "pareto_points": summary["pareto"]})


# ---------------------------------------------------------------------------- the stage

def run(cfg: DictConfig, ws) -> dict:
    from mixprec.stages.common import to_dict, tracker

    s = cfg.stage
    q = to_dict(cfg.quant)
    census = read_census(ws.require(LAYERS_CSV, "calibrate"))
    per_prompt = read_per_prompt(ws.require(PER_PROMPT_CSV, "sensitivity"))
    if ws.exists("sensitivity.json"):
        ws.check_fingerprints(ws.read_json("sensitivity.json", "sensitivity").get("fingerprints"), PER_PROMPT_CSV,
                              "sensitivity")
    else:
        log.warning("allocate: no sensitivity.json in %s; cannot check that %s was made for this model and recipe",
                    ws.root, PER_PROMPT_CSV)
    kinds = [_kind(k) for k in _as_list(s.kind)]
    budget = str(s.budget)
    combos = list(itertools.product(kinds, _as_list(s.target if budget == "mean_bits" else s.budget_mib),
                                    _as_list(s.K), _as_list(s.seed)))
    protected_acts = list(ws.read_yaml(PROTECTED_YAML, "sensitivity") or []) if "act" in kinds else []
    metric_cap = float(s.metric_cap)
    results, failures = [], []
    with tracker(cfg, ws, "allocate") as track:
        for kind, t, K, seed in combos:
            target, budget_mib = (t, None) if budget == "mean_bits" else (None, t)
            rel = plan_relpath(kind, budget, target, budget_mib, K, seed)
            try:
                plan, sol = allocate_one(
                    kind=kind, budget=budget, target=target, budget_mib=budget_mib, K=float(K), seed=int(seed),
                    census=census, per_prompt=per_prompt[kind], bits=q[f"{kind}_bits_by_group"],
                    protected=protected_acts if kind == "act" else [], solver=str(s.solver),
                    time_limit_s=float(s.time_limit_s), tolerance=float(s.tolerance),
                    bytes_tolerance=float(s.bytes_tolerance), metric_cap=metric_cap, fingerprints=ws.fingerprints)
            except InfeasibleBudgetError as exc:
                if str(s.on_infeasible) != "skip":
                    raise
                log.warning("allocate: %s skipped: %s", rel, exc)
                failures.append({"plan": rel, "error": str(exc)})
                continue
            search.write_plan(ws.path(rel), plan)
            h = plan.header
            row = {"plan": rel, "status": h["status"], "mean_bits": h["achieved_mean_bits"], "mib": h["mib"],
                   "score": h["score"], "objective": h["objective"], "solve_time_s": sol.solve_time_s}
            results.append(row)
            log.info("allocate: %s %s mean bits %s, %.1f MiB, score %.4f, solved in %.3f s", rel, h["status"],
                     {g: round(v, 3) for g, v in h["achieved_mean_bits"].items()}, h["mib"], h["score"],
                     sol.solve_time_s)
            track.log({"mib": h["mib"], "score": h["score"], "objective": h["objective"],
                       "mean_bits_overall": h["achieved_mean_bits"].get("overall"), "solve_time_s": sol.solve_time_s,
                       "K": float(K), "target": float(t), "seed": int(seed)})
        headline: dict[str, Any] = {"plans": results, "skipped": failures,
                                    "solve_time_s": sum(r["solve_time_s"] for r in results)}
        if len(results) == 1:
            track.summary({k: v for k, v in results[0].items() if isinstance(v, (int, float))})
        if len(combos) > 1 or bool(s.pareto):
            summary = write_pareto(ws.root, ws.fingerprints, float(s.pareto_size_rtol))
            headline["pareto"] = {k: summary[k] for k in ("candidates", "pareto", "csv", "png")}
            log_pareto(track, summary, ws.root)
    return headline
