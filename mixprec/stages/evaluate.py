"""stage=evaluate: the ablation at equal bytes — uniform vs single-metric vs metric-decoupled, and
one row per new piece of the search.

For every budget point (e.g. W3A8, W4A8, W5A8 and a W8A5-class point) the plans compared are:
- ``uniform``: every layer at the same bit-width (any width: scales come from the weights and the
  calibrated activation ranges, so 3 or 5 bits need no new calibration); its bytes are the point's
  budget (:mod:`mixprec.search.budget`);
- ``sqnr_only``: the integer program with one metric for all layers — content layers scored by
  the denoiser-output SQNR too (measured here, resumable, for content layers only);
- ``decoupled``: the published method — SSIM for content layers, SQNR for quality layers;
- one row per entry of ``stage.variants``: the decoupled method with the joint byte program, both
  programs' plans as candidates (``program: both``, what the pipeline allocates), the uniform guard and
  the refinement switched on one at a time (:mod:`mixprec.finalize`).
``stage.methods`` picks the base rows (a quick probe may leave out ``sqnr_only`` and its content-layer
SQNR sweep). Each row records its layers per width and ``cost.selection_key``, the chosen plan's ranking
key on the selection prompts (:func:`mixprec.selection.sort_key`), so rows of one point compare there too.
Every mixed plan lies within ``stage.bytes_tolerance`` (1%) below the uniform plan's bytes; each row
records its bytes and mean bits of both kinds. The mixed methods get the same candidate grid (K
values, seed 0) and the same selection on the selection prompts. Each plan generates the
evaluation prompts under several seed sets; adherence (models with a checker), SSIM and PSNR
against full precision are reported as mean and spread over the seed sets. Each row records its
cost (programs solved, selection and refinement evaluations and wall time), the headline the
sensitivity sweep's. Output: evaluate.json (via the runner) and evaluate.md.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mixprec import artifacts, search
from mixprec import sensitivity as sens
from mixprec.allocation import PROGRAM_CHOICES, AllocationRequest, allocate, programs_of
from mixprec.artifacts import Budget
from mixprec.calibration import extend_params
from mixprec.context import ModelBundle, StageContext, load_calibrated
from mixprec.models import layer_group
from mixprec.quantizers import set_plan
from mixprec.finalize import JointScorer, RefineOptions, refine_plan, sensitivity_prior
from mixprec.search import MIB, InfeasibleBudgetError, LayerSizes, mean_bits
from mixprec.selection import adherence, generate_and_score, resolve_metric
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

METHODS = ("uniform", "sqnr_only", "decoupled")


def content_sqnr(bundle: ModelBundle, ws: Workspace, prompts: list[str], seeds: list[int], weight_bits: Sequence[int],
                 act_bits: Sequence[int], cap: float, progress: bool,
                 perturbations_per_batch: int = 1) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Per-prompt SQNR of the denoiser output for content layers: {kind: {layer: {bits: [...]}}}.

    ``perturbations_per_batch`` > 1: several single-layer perturbations per batched generation, as
    the sensitivity sweep does (equal to the one-at-a-time path up to float rounding)."""
    content = {n: "quality" for n in bundle.layers if layer_group(n, bundle.spec.content_patterns) == "content"}
    # Scored as if quality layers: the task's group picks the metric.
    tasks = sens.make_tasks(content, weight_bits, act_bits)
    ref = sens.compute_reference(bundle.sampler, prompts, seeds, need_images=False, need_denoiser=True)
    records = sens.run_tasks(tasks, bundle.layers, bundle.sampler, ref, prompts, seeds,
                             sens.RecordFile(ws.path(artifacts.EVALUATE_SQNR_RECORDS)), cap, progress=progress,
                             perturbations_per_batch=perturbations_per_batch)
    out: dict[str, dict[str, dict[int, list[float]]]] = {"weight": {}, "act": {}}
    for rec in records.values():
        kind = artifacts.kind_name(rec["kind"])
        out[kind][rec["layer"]] = {int(b): v for b, v in rec["values"].items()}
    return out


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (population std over seed sets) of each score."""
    out = {}
    for key in ("adherence", "ssim", "psnr_db"):
        vals = [s[key] for s in per_seed if s.get(key) is not None]
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                        "values": vals}
    return out


def markdown(rows: list[dict[str, Any]], fp_adherence: float | None) -> str:
    has_adh = any("adherence" in r.get("scores", {}) for r in rows)
    head = ("| point | method | weight MiB | weight bits | act KiB/image | act bits | bytes vs uniform | "
            + ("adherence | " if has_adh else "") + "SSIM | PSNR (dB) | layers per width |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['point']} | {r['method']} | infeasible: {r['infeasible'].split(';')[0]} |")
            continue
        s = r["scores"]

        def fmt(k, digits):
            return f"{s[k]['mean']:.{digits}f} ± {s[k]['std']:.{digits}f}" if k in s else "-"
        def num(key, scale, fmt):  # rows of evaluate.json files from before byte accounting lack the bytes
            return format(r[key] / scale, fmt) if r.get(key) is not None else "-"
        cells = [r["point"], r["method"], num("weight_bytes", MIB, ".4f"), f"{r['weight_mean_bits']:.2f}",
                 num("act_bytes", 1024, ".1f"), f"{r['act_mean_bits']:.2f}",
                 f"{100 * r['bytes_ratio'] - 100:+.2f}%" if r.get("bytes_ratio") is not None else "-"]
        if has_adh:
            cells.append(fmt("adherence", 3))
        cells += [fmt("ssim", 4), fmt("psnr_db", 2), " ".join(f"{b}:{n}" for b, n in r.get("widths", {}).items())]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nBytes: stored weights (codes at their width + fp16 scales, 16-bit layers at 2 bytes per weight) "
                 "and input activations per image, as counted by mixprec.search.budget; \"bytes vs uniform\" is the "
                 "mixed kind's bytes against the uniform plan of the point; \"layers per width\": the mixed kind's "
                 "plan (width:layers; 16 = protected).")
    if fp_adherence is not None:
        lines.append(f"\nFull-precision adherence on the same prompts and seeds: {fp_adherence:.3f}")
    return "\n".join(lines) + "\n"


def _mean_bits(plan: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Size-weighted mean over quantized layers; 16 when every layer is at full precision."""
    m = mean_bits(plan, sizes)
    return 16.0 if m is None else m


@dataclass(frozen=True)
class Variant:
    """One ablation row of the decoupled method: which new pieces it adds (``stage.variants``)."""

    name: str
    program: str = "split"
    guard: bool = False
    refine: RefineOptions = RefineOptions()
    metric: str = "decoupled"  # or sqnr_only: the same pieces on the single-metric table
    # per-group weight options (quant.weight_group_sizes) as choices of the program and the refinement
    groups: bool = False
    # the content layers' SSIM as is ("ssim") or in dB ("ssim_db", AllocationRequest.content_metric)
    content_metric: str = "ssim"
    # the quality layers' SQNR in dB ("sqnr_db") or as noise power ("noise_power", AllocationRequest.quality_metric)
    quality_metric: str = "sqnr_db"
    # widths the row may give each group (a subset of the recipe's, e.g. {content: [2,4,8], quality: [4,8]}
    # on a sweep of quant=more_bits_gptq: the row without the extra widths); None = the recipe's
    bits: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> "Variant":
        node = dict(node)
        keys = ("name", "program", "guard", "refine", "metric", "groups", "content_metric", "quality_metric", "bits")
        unknown = sorted(set(node) - set(keys))
        if unknown or "name" not in node:
            raise ValueError(f"stage.variants entries take {', '.join(keys)}; got {sorted(node)}")
        program, metric = str(node.get("program", "split")), str(node.get("metric", "decoupled"))
        content, quality = str(node.get("content_metric", "ssim")), str(node.get("quality_metric", "sqnr_db"))
        if (program not in PROGRAM_CHOICES or metric not in METHODS[1:] or content not in search.CONTENT_METRICS
                or quality not in search.QUALITY_METRICS):
            raise ValueError(f"stage.variants {node['name']}: program is one of {PROGRAM_CHOICES} (got {program!r}), "
                             f"metric one of {METHODS[1:]} (got {metric!r}), content_metric one of "
                             f"{search.CONTENT_METRICS} (got {content!r}), quality_metric one of "
                             f"{search.QUALITY_METRICS} (got {quality!r})")
        if content != "ssim" and metric != "decoupled":
            raise ValueError(f"stage.variants {node['name']}: content_metric {content!r} transforms the content "
                             f"layers' SSIM; the {metric} table has none")
        bits = node.get("bits")
        if bits is not None and (not isinstance(bits, Mapping) or set(bits) != set(search.GROUPS)):
            raise ValueError(f"stage.variants {node['name']}: bits maps each of {search.GROUPS} to a list of widths, "
                             f"got {bits!r}")
        bits = None if bits is None else tuple((g, tuple(sorted(int(b) for b in bits[g]))) for g in search.GROUPS)
        return cls(str(node["name"]), program, bool(node.get("guard", False)), RefineOptions.of(node.get("refine")),
                   metric, bool(node.get("groups", False)), content, quality, bits)

    def widths(self, kind: str, recipe: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """The widths this row may give each group of ``kind``: the recipe's (``quant.*_bits_by_group``), or
        ``bits`` (weights only), which must be a subset of them (the sweep measured nothing else)."""
        if self.bits is None or kind != "weight":
            return {g: list(v) for g, v in recipe.items()}
        out = {g: list(v) for g, v in self.bits}
        extra = {g: sorted(set(v) - set(recipe[g])) for g, v in out.items() if set(v) - set(recipe[g])}
        if extra:
            raise ValueError(f"stage.variants {self.name}: bits {extra} are not widths of the recipe "
                             f"(quant.weight_bits_by_group {dict(recipe)}); the sensitivity sweep has no values there")
        return out


@dataclass
class _Point:
    """One budget point: which kind is mixed, its byte budget (the uniform plan's bytes), the other kind's plan."""

    label: str
    kind: str
    target: float
    uniform: dict[str, int]
    fixed: dict[str, int]
    budget: Budget
    scorer: JointScorer


class _Ablation:
    """One budget point at a time: each method's candidate plans, the method's selection, its scores."""

    def __init__(self, ctx: StageContext, bundle: ModelBundle, census, per_prompt, protected: list[str],
                 single_metric) -> None:
        s = ctx.settings
        self.s, self.ws, self.bundle, self.census, self.protected = s, ctx.workspace, bundle, census, protected
        self.tables = {"decoupled": per_prompt, "sqnr_only": single_metric}
        self.names = [c.name for c in census]
        self.sizes = {"weight": {c.name: c.params for c in census}, "act": {c.name: c.act_elems for c in census}}
        self.bytes = LayerSizes.of(census)
        sel = ctx.run.prompt_set("selection")
        self.sel_prompts, self.sel_seeds = [p for p, _ in sel], [sd for _, sd in sel]
        evalset = ctx.run.prompt_set("evaluation")
        self.eval_prompts = [p for p, _ in evalset]
        self.seed_sets = [[sd + off for _, sd in evalset] for off in s.seed_offsets]
        self.metric = resolve_metric(str(s.select_metric), bundle.spec.checker, "stage.select_metric")
        self.sel_ref = bundle.sampler.generate(self.sel_prompts, self.sel_seeds).images
        self.refs = [bundle.sampler.generate(self.eval_prompts, seeds).images for seeds in self.seed_sets]
        fp_checks = [adherence(r, self.eval_prompts, bundle.spec.checker) for r in self.refs]
        self.fp_adherence = statistics.fmean(c["all"] for c in fp_checks) if fp_checks[0] else None
        groups = {c.name: c.group for c in census}
        # weights: per-group options (quant.weight_group_sizes) are choices of the programs and the refinement;
        # plans below hold one choice per layer (4 or "4g64", search.option_keys)
        self.group_sizes = tuple(bundle.quant.weight_group_sizes)
        self.groups = groups
        self.priors: dict[str, dict] = {}  # per kind, made when a refinement first needs it
        self.plans: dict[tuple, tuple[list[dict[str, int | str]], dict[str, Any]]] = {}

    def prior(self, kind: str) -> dict:
        """The refinement's move prior of ``kind`` (:func:`sensitivity_prior`), computed once."""
        if kind not in self.priors:
            self.priors[kind] = sensitivity_prior(self.tables["decoupled"][kind], self.bundle.quant.bits_by_group(kind),
                                                  self.groups, self.protected if kind == "act" else [],
                                                  group_sizes=self.group_sizes if kind == "weight" else ())
        return self.priors[kind]

    def point(self, point: Mapping[str, Any]) -> _Point:
        label = point["name"]
        kind = "weight" if point.get("weight_target") is not None else "act"
        target = float(point["weight_target"] if kind == "weight" else point["act_target"])
        if round(target) != target:
            raise ValueError(f"evaluate point {label}: no uniform plan for {target} bits; give an integer target")
        fixed = (search.uniform_plan(self.names, int(point["act"]), self.protected) if kind == "weight"
                 else search.uniform_plan(self.names, int(point["weight"])))
        uniform = search.uniform_plan(self.names, round(target), self.protected if kind == "act" else ())
        budget = Budget(self.bytes.plan_bytes(kind, uniform) / MIB, "MiB")
        scorer = JointScorer(self.bundle.sampler, self.bundle.layers, self.sel_prompts, self.sel_seeds, self.sel_ref,
                             self.bundle.spec.checker, self.metric, kind, fixed)
        return _Point(label, kind, target, uniform, fixed, budget, scorer)

    def candidates(self, pt: _Point, method: str, variant: Variant) -> tuple[list[dict[str, int | str]], dict[str, Any]]:
        """One plan per K of the grid (seed 0) within the point's bytes, the method's table: the published
        split program with each group within ``bytes_tolerance`` of its mean-bit share, or the joint one,
        or ``both`` (the joint plans, then the split ones: what stage.program=both gives selection);
        ``groups``: the recipe's per-group weight options are choices too (a byte program)."""
        program, group_sizes = variant.program, self.group_sizes if variant.groups and pt.kind == "weight" else ()
        widths = variant.widths(pt.kind, self.bundle.quant.bits_by_group(pt.kind))
        if program == "both":
            parts = [self.candidates(pt, method, replace(variant, program=p)) for p in programs_of(program)
                     if p == "joint" or not group_sizes]  # with group scales the split request is the joint one
            return ([plan for plans, _ in parts for plan in plans],
                    {"program": program, "programs": sum(c["programs"] for _, c in parts),
                     "solve_s": sum(c["solve_s"] for _, c in parts)})
        key = (pt.label, method, program, group_sizes, variant.content_metric, variant.quality_metric, str(widths))
        if key in self.plans:
            return self.plans[key]
        s, plans, solve_s = self.s, [], 0.0
        for K in s.K:
            request = AllocationRequest(
                kind=pt.kind, budget=Budget(pt.target), K=float(K), seed=0,
                bits=widths, solver=str(s.solver), time_limit_s=float(s.time_limit_s),
                tolerance=float(s.bytes_tolerance) * pt.target, bytes_tolerance=float(s.bytes_tolerance),
                metric_cap=float(s.sqnr_cap_db), program=program,
                group_sizes=group_sizes, content_metric=variant.content_metric,
                quality_metric=variant.quality_metric)
            plan, sol = allocate(request, self.census, self.tables[method][pt.kind],
                                 self.protected if pt.kind == "act" else [], self.ws.fingerprints)
            plans.append(search.option_keys(plan.bits, plan.group_size))
            solve_s += sol.solve_time_s
        self.plans[key] = plans, {"program": program, "programs": len(plans), "solve_s": solve_s}
        return self.plans[key]

    def choose(self, pt: _Point, plans: list[dict[str, int]], variant: Variant) -> tuple[dict[str, int], dict]:
        """Selection as in the method (best on the selection prompts; first of ties), the guard's
        uniform plan among the candidates when the variant has it, then its refinement."""
        cands = plans + ([pt.uniform] if variant.guard else [])
        scored = [(pt.scorer(p)[0], i) for i, p in enumerate(cands)]
        best = cands[min(scored)[1]]
        # the chosen plan's ranking key on the selection prompts (smaller is better): rows of one point compare
        cost: dict[str, Any] = {"selection": pt.scorer.cost_of(cands), "selected_uniform": best is pt.uniform,
                                "selection_key": list(min(scored)[0])}
        if variant.refine.evaluations:
            # a scorer of its own: the refinement's recorded time is what it costs alone, not what another
            # row's cached generations saved it
            scorer = replace(pt.scorer, cache={}, seconds={}, evaluations=0, wall_s=0.0)
            prior = self.prior(pt.kind)
            widths = variant.widths(pt.kind, self.bundle.quant.bits_by_group(pt.kind))
            allowed = {w for ws in widths.values() for w in ws}
            # per-group options ("4g64") are moves only in a variant with groups: true; widths: the row's
            prior = {l: {b: v for b, v in row.items() if (variant.groups or not isinstance(b, str))
                         and search.split_option(b)[0] in allowed | {search.PROTECTED_BITS}}
                     for l, row in prior.items()}
            result = refine_plan(best, pt.scorer(best), scorer, pt.kind, pt.budget, self.census,
                                 widths, variant.refine, prior,
                                 self.protected, float(self.s.bytes_tolerance), bool(self.s.progress))
            best = result.bits
            cost["refinement"] = result.summary()
            cost["selection_key"] = list(result.key)
        return best, cost

    def row(self, pt: _Point, method: str, variant: Variant | None = None) -> dict[str, Any]:
        """One method at one point: the mixed kind is allocated, the other uniform at the point's width."""
        name = variant.name if variant else method
        cost: dict[str, Any] = {}
        if method == "uniform":
            plans = [pt.uniform]
        else:
            try:
                plans, cost["allocation"] = self.candidates(pt, method, variant or Variant(name))
            except InfeasibleBudgetError as exc:
                log.warning("evaluate %s %s: %s", pt.label, name, exc)
                return {"point": pt.label, "method": name, "infeasible": str(exc)}
        best, chosen = self.choose(pt, plans, variant or Variant(name))
        cost.update(chosen)
        best, groups = search.option_bits(best)
        wp, ap = (best, pt.fixed) if pt.kind == "weight" else (pt.fixed, best)
        wg = groups if pt.kind == "weight" else None
        b = self.bundle
        per_seed = [generate_and_score(b.sampler, b.layers, self.eval_prompts, seeds, ref, b.spec.checker, wp, ap,
                                       weight_groups=wg).scores for ref, seeds in zip(self.refs, self.seed_sets)]
        set_plan(b.layers)
        size = {"weight": self.bytes.plan_bytes("weight", wp, wg), "act": self.bytes.plan_bytes("act", ap)}
        row = {"point": pt.label, "method": name, "weight_mean_bits": _mean_bits(wp, self.sizes["weight"]),
               "act_mean_bits": _mean_bits(ap, self.sizes["act"]), "weight_bytes": size["weight"],
               "act_bytes": size["act"], "budget_bytes": self.bytes.plan_bytes(pt.kind, pt.uniform),
               "candidates": len(plans), "scores": summarize(per_seed), "cost": cost,
               # layers per width of the mixed kind ("4g64": grouped weights), protected ones at 16
               "widths": _widths(search.option_keys(wp, wg) if pt.kind == "weight" else ap)}
        row["bytes_ratio"] = size[pt.kind] / row["budget_bytes"]
        row["equal_bytes"] = search.same_bytes(size[pt.kind], row["budget_bytes"], float(self.s.bytes_tolerance))
        if per_seed[0].get("adherence_detail"):
            row["adherence_detail"] = {k: statistics.fmean(p["adherence_detail"][k] for p in per_seed)
                                       for k in per_seed[0]["adherence_detail"]}
        log.info("evaluate %s %-9s W%.2f (%d B) A%.2f (%d B/image) %s", pt.label, name, row["weight_mean_bits"],
                 size["weight"], row["act_mean_bits"], size["act"],
                 {k: round(v["mean"], 4) for k, v in row["scores"].items()})
        return row


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    variants = [Variant.of(dict(v)) for v in (s.variants or [])]
    bundle = load_calibrated(ctx.run, ws, batch_size=int(s.batch_size))
    q = bundle.quant
    census = artifacts.read_census(ws)
    per_prompt = artifacts.read_per_prompt(ws, grouped=bool(ctx.run.quant.weight_group_sizes))
    protected = artifacts.read_protected(ws)
    points = [dict(p) for p in s.points]
    methods = _methods(s.methods)
    mixed = {"weight" if p.get("weight_target") is not None else "act" for p in points}  # kinds a point mixes
    missing = sorted(k for k in mixed if not any((per_prompt.get(k) or {}).values()))
    if missing:
        raise ValueError(f"stage=evaluate: the points mix {missing} but {artifacts.PER_PROMPT_CSV} has no "
                         f"{' or '.join(missing)} sensitivities; rerun stage=sensitivity with those kinds "
                         f"(stage.kinds=[w, a])")
    # Uniform plans may use widths the calibration did not include (3 or 5 bits).
    extra_w = {round(p[k]) for p in points for k in ("weight", "weight_target") if p.get(k) is not None}
    extra_a = {round(p[k]) for p in points for k in ("act", "act_target") if p.get(k) is not None}
    extend_params(bundle.layers, sorted(extra_w | set(q.weight_bits)), sorted(extra_a | set(q.act_bits)),
                  weight_clip=q.weight_clip)
    # The same prompts as the sensitivity stage, so the two metrics rank the same images.
    sens_pairs = ctx.run.prompt_set("sensitivity")
    t0 = time.perf_counter()
    # Content layers only, at the widths a plan may give them (as the sensitivity stage measures them), and
    # only for the kinds the points mix and only when a row uses the single-metric table.
    need_sqnr = "sqnr_only" in methods or any(v.metric == "sqnr_only" for v in variants)
    content_w, content_a = (q.bits_by_group(k).get("content", calibrated) if k in mixed and need_sqnr
                            else () for k, calibrated in (("weight", q.weight_bits), ("act", q.act_bits)))
    # stage.batch_size rows per generation: with few sensitivity prompts, several layers per batch
    per_batch = sens.fill_batch(s.batch_size, len(sens_pairs))
    sqnr = content_sqnr(bundle, ws, [p for p, _ in sens_pairs], [sd for _, sd in sens_pairs],
                        [b for b in q.weight_bits if b in content_w], [b for b in q.act_bits if b in content_a],
                        float(s.sqnr_cap_db), bool(s.progress), per_batch)
    sqnr_s = time.perf_counter() - t0
    single_metric = {kind: {"content": sqnr[kind], "quality": per_prompt[kind]["quality"]} for kind in sqnr
                     if kind in per_prompt}
    ablation = _Ablation(ctx, bundle, census, per_prompt, protected, single_metric)
    rows = []
    for point in points:
        pt = ablation.point(point)
        rows += [ablation.row(pt, method) for method in methods]
        rows += [ablation.row(pt, v.metric, v) for v in variants]
    table_md = markdown(rows, ablation.fp_adherence)
    ws.write_text(artifacts.EVALUATE_MD, table_md)
    track.log_table("evaluate/ablation", ["point", "method", "weight_bits", "act_bits", "weight_bytes", "act_bytes",
                                          "adherence", "ssim", "psnr_db"],
                    [[r["point"], r["method"], r["weight_mean_bits"], r["act_mean_bits"], r["weight_bytes"],
                      r["act_bytes"], r["scores"].get("adherence", {}).get("mean"), r["scores"]["ssim"]["mean"],
                      r["scores"]["psnr_db"]["mean"]] for r in rows if "scores" in r])
    print(table_md)
    return {"rows": rows, "full_precision_adherence": ablation.fp_adherence,
            "evaluation_images_per_seed_set": len(ablation.eval_prompts), "seed_sets": len(ablation.seed_sets),
            "select_metric": ablation.metric, "bytes_tolerance": float(s.bytes_tolerance),
            "cost": {"sensitivity": sensitivity_cost(ws), "content_sqnr": {"wall_s": sqnr_s}}}


def _widths(plan: Mapping[str, int | str]) -> dict[str, int]:
    """Layers per choice of a plan (``{"3": 40, "4": 120, "16": 4}``), in width order."""
    counts = Counter(str(v) for v in plan.values())
    return {k: counts[k] for k in sorted(counts, key=lambda k: (int(k.split("g")[0]), k))}


def _methods(value: Sequence[str] | None) -> list[str]:
    """``stage.methods``: the base rows of every point, in the order of :data:`METHODS` (default: all)."""
    chosen = [str(m) for m in (value if value is not None else METHODS)]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise ValueError(f"stage.methods takes a non-empty list of {list(METHODS)}, got {chosen}")
    return [m for m in METHODS if m in chosen]


def sensitivity_cost(ws: Workspace) -> dict[str, Any] | None:
    """Evaluations and wall time of the workspace's sensitivity sweep (its stage record)."""
    if not ws.exists(artifacts.stage_record("sensitivity")):
        return None
    record = ws.read_json(artifacts.stage_record("sensitivity"), "sensitivity")
    head = record.get("headline") or {}
    evals = head.get("evals") or {}
    return {"wall_s": record.get("wall_time_s"), "evaluations": sum(evals.values()) if evals else None,
            "measured_eval_s": head.get("measured_eval_s")}
