"""stage=evaluate: the ablation at equal budgets — uniform vs single-metric vs metric-decoupled.

For every budget point (e.g. W3A8, W4A8, W5A8 and a W8A5-class point) three plans are compared:
- ``uniform``: every layer at the same bit-width (any width: scales come from the weights and the
  calibrated activation ranges, so 3 or 5 bits need no new calibration);
- ``sqnr_only``: the integer program with one metric for all layers — content layers scored by
  the denoiser-output SQNR too (measured here, resumable, for content layers only);
- ``decoupled``: the published method — SSIM for content layers, SQNR for quality layers.
Both mixed methods get the same candidate grid (K values, seed 0) and the same selection on the
selection prompts, so only the metric differs. Each plan generates the evaluation prompts under
several seed sets; adherence (models with a checker), SSIM and PSNR against full precision are
reported as mean and spread over the seed sets. Output: evaluate.json (via the runner) and
evaluate.md.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


from mixprec import artifacts
from mixprec import sensitivity as sens
from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget
from mixprec.calibration import extend_params
from mixprec.context import ModelBundle, StageContext, load_calibrated
from mixprec.models import layer_group
from mixprec.quantizers import set_plan
from mixprec.search import InfeasibleBudgetError, mean_bits
from mixprec.selection import adherence, generate_and_score, sort_key
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

METHODS = ("uniform", "sqnr_only", "decoupled")


def content_sqnr(bundle: ModelBundle, ws: Workspace, prompts: list[str], seeds: list[int], weight_bits: Sequence[int],
                 act_bits: Sequence[int], cap: float, progress: bool) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Per-prompt SQNR of the denoiser output for content layers: {kind: {layer: {bits: [...]}}}."""
    content = {n: "quality" for n in bundle.layers if layer_group(n, bundle.spec.content_patterns) == "content"}
    # Scored as if quality layers: the task's group picks the metric.
    tasks = sens.make_tasks(content, weight_bits, act_bits)
    ref = sens.compute_reference(bundle.sampler, prompts, seeds, need_images=False, need_denoiser=True)
    records = sens.run_tasks(tasks, bundle.layers, bundle.sampler, ref, prompts, seeds,
                             sens.RecordFile(ws.path(artifacts.EVALUATE_SQNR_RECORDS)), cap, progress=progress)
    out: dict[str, dict[str, dict[int, list[float]]]] = {"weight": {}, "act": {}}
    for rec in records.values():
        kind = artifacts.kind_name(rec["kind"])
        out[kind][rec["layer"]] = {int(b): v for b, v in rec["values"].items()}
    return out


def uniform_plan(layers: Sequence[str], bits: int, protected: Sequence[str] = ()) -> dict[str, int]:
    return {n: (16 if n in protected else int(bits)) for n in layers}


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
    head = "| point | method | weight bits | act bits | " + ("adherence | " if has_adh else "") + "SSIM | PSNR (dB) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['point']} | {r['method']} | infeasible: {r['infeasible'].split(';')[0]} |")
            continue
        s = r["scores"]

        def fmt(k, digits):
            return f"{s[k]['mean']:.{digits}f} ± {s[k]['std']:.{digits}f}" if k in s else "-"
        cells = [r["point"], r["method"], f"{r['weight_mean_bits']:.2f}", f"{r['act_mean_bits']:.2f}"]
        if has_adh:
            cells.append(fmt("adherence", 3))
        cells += [fmt("ssim", 4), fmt("psnr_db", 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if fp_adherence is not None:
        lines.append(f"\nFull-precision adherence on the same prompts and seeds: {fp_adherence:.3f}")
    return "\n".join(lines) + "\n"


def _mean_bits(plan: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    """Size-weighted mean over quantized layers; 16 when every layer is at full precision."""
    m = mean_bits(plan, sizes)
    return 16.0 if m is None else m


class _Ablation:
    """One budget point at a time: each method's candidate plans, the method's selection, its scores."""

    def __init__(self, ctx: StageContext, bundle: ModelBundle, census, per_prompt, protected: list[str],
                 single_metric) -> None:
        s = ctx.settings
        self.s, self.ws, self.bundle, self.census, self.protected = s, ctx.workspace, bundle, census, protected
        self.tables = {"decoupled": per_prompt, "sqnr_only": single_metric}
        self.names = [c.name for c in census]
        self.sizes = {"weight": {c.name: c.params for c in census}, "act": {c.name: c.act_elems for c in census}}
        sel = ctx.run.prompt_set("selection")
        self.sel_prompts, self.sel_seeds = [p for p, _ in sel], [sd for _, sd in sel]
        evalset = ctx.run.prompt_set("evaluation")
        self.eval_prompts = [p for p, _ in evalset]
        self.seed_sets = [[sd + off for _, sd in evalset] for off in s.seed_offsets]
        self.metric = str(s.select_metric)
        self.sel_ref = bundle.sampler.generate(self.sel_prompts, self.sel_seeds).images
        self.refs = [bundle.sampler.generate(self.eval_prompts, seeds).images for seeds in self.seed_sets]
        fp_checks = [adherence(r, self.eval_prompts, bundle.spec.checker) for r in self.refs]
        self.fp_adherence = statistics.fmean(c["all"] for c in fp_checks) if fp_checks[0] else None

    def candidates(self, kind: str, target: float, table) -> list[dict[str, int]]:
        """One plan per K of the grid (seed 0), the method's sensitivity table."""
        s, plans = self.s, []
        for K in s.K:
            request = AllocationRequest(
                kind=kind, budget=Budget(float(target)), K=float(K), seed=0, bits=self.bundle.quant.bits_by_group(kind),
                solver=str(s.solver), time_limit_s=float(s.time_limit_s), tolerance=float(s.tolerance),
                metric_cap=float(s.sqnr_cap_db))
            plan, _ = allocate(request, self.census, table, self.protected if kind == "act" else [],
                               self.ws.fingerprints)
            plans.append(plan.bits)
        return plans

    def choose(self, candidates: list[tuple[dict, dict]]) -> tuple[dict, dict]:
        """Selection as in the method: best on the selection prompts (deterministic: first of ties)."""
        if len(candidates) == 1:
            return candidates[0]
        scored = []
        for i, (wp, ap) in enumerate(candidates):
            scores = generate_and_score(self.bundle.sampler, self.bundle.layers, self.sel_prompts, self.sel_seeds,
                                        self.sel_ref, self.bundle.spec.checker, wp, ap).scores
            scored.append((sort_key(scores, self.metric), i))
        set_plan(self.bundle.layers)
        return candidates[min(scored)[1]]

    def row(self, point: Mapping[str, Any], method: str) -> dict[str, Any]:
        """One method at one point: the mixed kind is allocated, the other uniform at the point's width."""
        label = point["name"]
        mixed = "weight" if point.get("weight_target") is not None else "act"
        target = point["weight_target"] if mixed == "weight" else point["act_target"]
        fixed = (uniform_plan(self.names, int(point["act"]), self.protected) if mixed == "weight"
                 else uniform_plan(self.names, int(point["weight"])))
        if method == "uniform":
            if round(target) != target:
                raise ValueError(f"evaluate point {label}: no uniform plan for {target} bits")
            plans = [uniform_plan(self.names, round(target), self.protected if mixed == "act" else ())]
        else:
            try:
                plans = self.candidates(mixed, target, self.tables[method][mixed])
            except InfeasibleBudgetError as exc:
                log.warning("evaluate %s %s: %s", label, method, exc)
                return {"point": label, "method": method, "infeasible": str(exc)}
        cands = [(p, fixed) if mixed == "weight" else (fixed, p) for p in plans]
        wp, ap = self.choose(cands)
        b = self.bundle
        per_seed = [generate_and_score(b.sampler, b.layers, self.eval_prompts, seeds, ref, b.spec.checker, wp, ap).scores
                    for ref, seeds in zip(self.refs, self.seed_sets)]
        set_plan(b.layers)
        row = {"point": label, "method": method, "weight_mean_bits": _mean_bits(wp, self.sizes["weight"]),
               "act_mean_bits": _mean_bits(ap, self.sizes["act"]), "candidates": len(cands),
               "scores": summarize(per_seed)}
        if per_seed[0].get("adherence_detail"):
            row["adherence_detail"] = {k: statistics.fmean(p["adherence_detail"][k] for p in per_seed)
                                       for k in per_seed[0]["adherence_detail"]}
        log.info("evaluate %s %-9s W%.2f A%.2f %s", label, method, row["weight_mean_bits"],
                 row["act_mean_bits"], {k: round(v["mean"], 4) for k, v in row["scores"].items()})
        return row


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    bundle = load_calibrated(ctx.run, ws, batch_size=int(s.batch_size))
    q = bundle.quant
    census = artifacts.read_census(ws)
    per_prompt = artifacts.read_per_prompt(ws)
    protected = artifacts.read_protected(ws)
    points = [dict(p) for p in s.points]
    # Uniform plans may use widths the calibration did not include (3 or 5 bits).
    extra_w = {round(p[k]) for p in points for k in ("weight", "weight_target") if p.get(k) is not None}
    extra_a = {round(p[k]) for p in points for k in ("act", "act_target") if p.get(k) is not None}
    extend_params(bundle.layers, sorted(extra_w | set(q.weight_bits)), sorted(extra_a | set(q.act_bits)),
                  weight_clip=q.weight_clip)
    # The same prompts as the sensitivity stage, so the two metrics rank the same images.
    sens_pairs = ctx.run.prompt_set("sensitivity")
    sqnr = content_sqnr(bundle, ws, [p for p, _ in sens_pairs], [sd for _, sd in sens_pairs], q.weight_bits,
                        q.act_bits, float(s.sqnr_cap_db), bool(s.progress))
    single_metric = {kind: {"content": sqnr[kind], "quality": per_prompt[kind]["quality"]} for kind in sqnr}
    ablation = _Ablation(ctx, bundle, census, per_prompt, protected, single_metric)
    rows = [ablation.row(point, method) for point in points for method in METHODS]
    table_md = markdown(rows, ablation.fp_adherence)
    ws.write_text(artifacts.EVALUATE_MD, table_md)
    track.log_table("evaluate/ablation", ["point", "method", "weight_bits", "act_bits", "adherence", "ssim", "psnr_db"],
                    [[r["point"], r["method"], r["weight_mean_bits"], r["act_mean_bits"],
                      r["scores"].get("adherence", {}).get("mean"), r["scores"]["ssim"]["mean"],
                      r["scores"]["psnr_db"]["mean"]] for r in rows if "scores" in r])
    print(table_md)
    return {"rows": rows, "full_precision_adherence": ablation.fp_adherence,
            "evaluation_images_per_seed_set": len(ablation.eval_prompts), "seed_sets": len(ablation.seed_sets),
            "select_metric": ablation.metric}
