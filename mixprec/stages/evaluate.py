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

from omegaconf import DictConfig

from mixprec import sensitivity as sens
from mixprec.calibration import extend_params
from mixprec.models import layer_group
from mixprec.quantizers import set_plan
from mixprec.search import InfeasibleBudgetError
from mixprec.selection import adherence, image_scores, sort_key
from mixprec.stages import allocate as alloc
from mixprec.stages.common import LAYERS_CSV, ModelBundle, load_calibrated, prompt_set, to_dict, tracker
from mixprec.stages.sensitivity import PER_PROMPT_CSV, PROTECTED_YAML
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

METHODS = ("uniform", "sqnr_only", "decoupled")
SQNR_RECORDS = "evaluate/sqnr_content.jsonl"


def content_sqnr(bundle: ModelBundle, ws: Workspace, prompts: list[str], seeds: list[int], weight_bits: Sequence[int],
                 act_bits: Sequence[int], cap: float, progress: bool) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Per-prompt SQNR of the denoiser output for content layers: {kind: {layer: {bits: [...]}}}."""
    content = {n: "quality" for n in bundle.layers if layer_group(n, bundle.spec.content_patterns) == "content"}
    # Scored as if quality layers: the task's group picks the metric.
    tasks = sens.make_tasks(content, weight_bits, act_bits)
    ref = sens.compute_reference(bundle.sampler, prompts, seeds, need_images=False, need_denoiser=True)
    records = sens.run_tasks(tasks, bundle.layers, bundle.sampler, ref, prompts, seeds,
                             sens.RecordFile(ws.path(SQNR_RECORDS)), cap, progress=progress)
    out: dict[str, dict[str, dict[int, list[float]]]] = {"weight": {}, "act": {}}
    for rec in records.values():
        kind = "weight" if rec["kind"] == "w" else "act"
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
    """Size-weighted mean over quantized layers (full-precision layers, 16 bits, left out)."""
    q = {n: b for n, b in plan.items() if b < 16}
    total = sum(sizes[n] for n in q)
    return sum(sizes[n] * b for n, b in q.items()) / total if total else 16.0


def run(cfg: DictConfig, ws: Workspace) -> dict:
    s = cfg.stage
    bundle = load_calibrated(cfg, ws, batch_size=int(s.batch_size))
    q = bundle.quant
    census = alloc.read_census(ws.require(LAYERS_CSV, "calibrate"))
    per_prompt = alloc.read_per_prompt(ws.require(PER_PROMPT_CSV, "sensitivity"))
    protected = list(ws.read_yaml(PROTECTED_YAML, "sensitivity") or [])
    names = [r["name"] for r in census]
    params = {r["name"]: r["params"] for r in census}
    acts = {r["name"]: r["act_elems"] for r in census}
    points = [to_dict(p) for p in s.points]
    # Uniform plans may use widths the calibration did not include (3 or 5 bits).
    extra_w = {round(p[k]) for p in points for k in ("weight", "weight_target") if p.get(k) is not None}
    extra_a = {round(p[k]) for p in points for k in ("act", "act_target") if p.get(k) is not None}
    extend_params(bundle.layers, sorted(extra_w | set(q["weight_bits"])), sorted(extra_a | set(q["act_bits"])),
                  weight_clip=str(q["weight_clip"]))

    sel = prompt_set(cfg, "selection")
    sel_prompts, sel_seeds = [p for p, _ in sel], [sd for _, sd in sel]
    evalset = prompt_set(cfg, "evaluation")
    eval_prompts = [p for p, _ in evalset]
    seed_sets = [[sd + off for _, sd in evalset] for off in s.seed_offsets]
    metric = str(s.select_metric)

    with tracker(cfg, ws, "evaluate") as track:
        # The same prompts as the sensitivity stage, so the two metrics rank the same images.
        sens_pairs = prompt_set(cfg, "sensitivity")
        sqnr = content_sqnr(bundle, ws, [p for p, _ in sens_pairs], [sd for _, sd in sens_pairs], q["weight_bits"],
                            q["act_bits"], float(s.sqnr_cap_db), bool(s.progress))
        single_metric = {kind: {"content": sqnr[kind], "quality": per_prompt[kind]["quality"]} for kind in sqnr}

        sel_ref = bundle.sampler.generate(sel_prompts, sel_seeds).images
        refs = [bundle.sampler.generate(eval_prompts, seeds).images for seeds in seed_sets]
        fp_checks = [adherence(r, eval_prompts, bundle.spec.checker) for r in refs]
        fp_adherence = statistics.fmean(c["all"] for c in fp_checks) if fp_checks[0] else None

        def allocate(kind: str, target: float, table) -> list[dict[str, int]]:
            plans = []
            for K in s.K:
                plan, _ = alloc.allocate_one(
                    kind=kind, budget="mean_bits", target=float(target), budget_mib=None, K=float(K), seed=0,
                    census=census, per_prompt=table,
                    bits=dict(to_dict(q["weight_bits_by_group"] if kind == "weight" else q["act_bits_by_group"])),
                    protected=protected if kind == "act" else [], solver=str(s.solver),
                    time_limit_s=float(s.time_limit_s), tolerance=float(s.tolerance), bytes_tolerance=0.01,
                    metric_cap=float(s.sqnr_cap_db), fingerprints=ws.fingerprints)
                plans.append(plan.bits)
            return plans

        def choose(candidates: list[tuple[dict, dict]]) -> tuple[dict, dict]:
            """Selection as in the method: best on the selection prompts (deterministic: first of ties)."""
            if len(candidates) == 1:
                return candidates[0]
            scored = []
            for i, (wp, ap) in enumerate(candidates):
                set_plan(bundle.layers, wp, ap)
                scored.append((sort_key(image_scores(sel_ref, bundle.sampler.generate(sel_prompts, sel_seeds).images,
                                                     sel_prompts, bundle.spec.checker), metric), i))
            set_plan(bundle.layers)
            return candidates[min(scored)[1]]

        rows = []
        for point in points:
            label = point["name"]
            for method in METHODS:
                # The mixed kind is allocated; the other kind is uniform at the point's fixed width.
                mixed = "weight" if point.get("weight_target") is not None else "act"
                target = point["weight_target"] if mixed == "weight" else point["act_target"]
                fixed = (uniform_plan(names, int(point["act"]), protected) if mixed == "weight"
                         else uniform_plan(names, int(point["weight"])))
                if method == "uniform":
                    if round(target) != target:
                        raise ValueError(f"evaluate point {label}: no uniform plan for {target} bits")
                    plans = [uniform_plan(names, round(target), protected if mixed == "act" else ())]
                else:
                    table = per_prompt[mixed] if method == "decoupled" else single_metric[mixed]
                    try:
                        plans = allocate(mixed, target, table)
                    except InfeasibleBudgetError as exc:
                        rows.append({"point": label, "method": method, "infeasible": str(exc)})
                        log.warning("evaluate %s %s: %s", label, method, exc)
                        continue
                cands = [(p, fixed) if mixed == "weight" else (fixed, p) for p in plans]
                wp, ap = choose(cands)
                set_plan(bundle.layers, wp, ap)
                per_seed = [image_scores(ref, bundle.sampler.generate(eval_prompts, seeds).images, eval_prompts,
                                         bundle.spec.checker) for ref, seeds in zip(refs, seed_sets)]
                set_plan(bundle.layers)
                row = {"point": label, "method": method, "weight_mean_bits": _mean_bits(wp, params),
                       "act_mean_bits": _mean_bits(ap, acts), "candidates": len(cands), "scores": summarize(per_seed)}
                if per_seed[0].get("adherence_detail"):
                    row["adherence_detail"] = {k: statistics.fmean(p["adherence_detail"][k] for p in per_seed)
                                               for k in per_seed[0]["adherence_detail"]}
                rows.append(row)
                log.info("evaluate %s %-9s W%.2f A%.2f %s", label, method, row["weight_mean_bits"],
                         row["act_mean_bits"], {k: round(v["mean"], 4) for k, v in row["scores"].items()})
        table_md = markdown(rows, fp_adherence)
        ws.write_text("evaluate.md", table_md)
        track.log_table("evaluate/ablation", ["point", "method", "weight_bits", "act_bits", "adherence", "ssim", "psnr_db"],
                        [[r["point"], r["method"], r["weight_mean_bits"], r["act_mean_bits"],
                          r["scores"].get("adherence", {}).get("mean"), r["scores"]["ssim"]["mean"],
                          r["scores"]["psnr_db"]["mean"]] for r in rows if "scores" in r])
    print(table_md)
    return {"rows": rows, "full_precision_adherence": fp_adherence, "evaluation_images_per_seed_set": len(evalset),
            "seed_sets": len(seed_sets), "select_metric": metric}
