"""stage=select: rank the candidate plans against full-precision images.

Every candidate weight plan (activations at full precision) generates the selection prompts; the
best by ``stage.metric`` becomes ``final_weight_mp.yaml``. Then every activation plan is ranked
with that weight plan applied -> ``final_act_mp.yaml``. Identical candidates (common across seeds
and K at low targets) are generated once. Every candidate's images are kept as a grid under
``select/`` and listed in ``select_candidates.csv``; the same table goes to W&B with the images.
"""

from __future__ import annotations

import logging


from mixprec import artifacts, search
from mixprec.artifacts import SELECT_COLUMNS
from mixprec.quantizers import set_plan
from mixprec.selection import METRICS, Candidate, generate_and_score, load_candidates, rank, save_grid, slug
from mixprec.context import ModelBundle, StageContext, load_calibrated
from mixprec.workspace import MissingArtifactError, Workspace

log = logging.getLogger("mixprec")


def evaluate(bundle: ModelBundle, candidates: list[Candidate], kind: str, fixed_weight: dict | None, reference,
             prompts: list[str], seeds: list[int], checker: str | None, ws: Workspace, progress: bool,
             grids: str = artifacts.SELECT_GRIDS_DIR) -> None:
    seen: dict[str, Candidate] = {}
    items = candidates
    if progress:
        from tqdm import tqdm
        items = tqdm(candidates, desc=f"select {kind}", unit="plan", leave=False)
    for cand in items:
        first = seen.get(cand.digest)
        if first is not None:
            cand.scores, cand.duplicate_of = dict(first.scores), first.path
            continue
        weight, act = (cand.bits, None) if kind == "weight" else (fixed_weight, cand.bits)
        generated = generate_and_score(bundle.sampler, bundle.layers, prompts, seeds, reference, checker, weight, act)
        cand.scores = generated.scores
        cand.scores["grid"] = save_grid(ws, f"{grids}/{kind}/{slug(cand.path)}.png", generated.images)
        seen[cand.digest] = cand
    set_plan(bundle.layers)


def write_final(ws: Workspace, kind: str, best: Candidate, metric: str, n_candidates: int,
                weight_plan: str | None = None, path: str | None = None) -> None:
    header = dict(best.header)
    header.update({"selected_from": best.path, "selected_by": metric, "candidates": n_candidates,
                   "selection_scores": {k: best.scores.get(k) for k in ("mse", "ssim", "psnr_db", "adherence")
                                        if best.scores.get(k) is not None}})
    if weight_plan:
        header["with_weight_plan"] = weight_plan
    artifacts.write_plan_file(ws, path or artifacts.FINAL_PLANS[kind], search.Plan(header, best.bits))


def _row(kind: str, i: int, c: Candidate) -> dict:
    return artifacts.selection_row(kind, i + 1, c.path, c.header, c.scores, c.duplicate_of)


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    metric = str(s.metric)
    kinds = list(s.kinds)
    spec = ctx.run.model
    checker = spec.checker
    if metric not in METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; stage.metric is one of {', '.join(METRICS)}")
    if metric == "adherence" and checker is None:  # before loading anything
        raise ValueError(f"stage.metric=adherence needs a model with a content checker; {spec.name} has none "
                         f"(use stage.metric=mse or ssim)")
    pairs = ctx.run.prompt_set("selection")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    targets = {"weight": s.weight_target, "act": s.act_target}
    candidates = {k: load_candidates(ws, k, targets[k]) for k in kinds}  # fail early, before generating anything
    out = artifacts.final_plan_paths(s.output_dir)
    bundle = load_calibrated(ctx.run, ws, batch_size=int(s.batch_size))
    reference = bundle.sampler.generate(prompts, seeds).images
    save_grid(ws, f"{out['grids']}/full_precision.png", reference)
    rows, headline = [], {"metric": metric, "images": len(pairs)}
    fixed_weight = None
    for kind in kinds:
        if kind == "act" and fixed_weight is None:
            if not ws.exists(out["weight"]):
                raise MissingArtifactError(f"{out['weight']} is missing: run stage=select with "
                                           f"stage.kinds=[weight,act] first")
            fixed_weight = artifacts.read_plan_file(ws, out["weight"]).bits
        cands = candidates[kind]
        evaluate(bundle, cands, kind, fixed_weight, reference, prompts, seeds, checker, ws, bool(s.progress),
                 out["grids"])
        ranked = rank(cands, metric)
        best = ranked[0]
        write_final(ws, kind, best, metric, len(cands), out["weight"] if kind == "act" else None, out[kind])
        if kind == "weight":
            fixed_weight = best.bits
        kind_rows = [_row(kind, i, c) for i, c in enumerate(ranked)]
        rows += kind_rows
        headline[kind] = {"candidates": len(cands), "unique": len({c.digest for c in cands}),
                          "best": best.path, "scores": {k: best.scores.get(k) for k in ("mse", "ssim", "adherence")}}
        from PIL import Image
        track.log_table(f"select/{kind}", SELECT_COLUMNS[:-1] + ["images"],
                        [[r[c] for c in SELECT_COLUMNS[:-1]] + [Image.open(ws.path(r["grid"])) if r["grid"] else None]
                         for r in kind_rows])
        log.info("select %s: %d candidates, best %s (%s=%.5g)", kind, len(cands), best.path, metric,
                 best.scores[metric] if metric in best.scores else float("nan"))
    artifacts.write_selection(ws, out["csv"], rows)
    track.log_artifact("final_plans", "plan", [ws.path(out[k]) for k in kinds])
    headline["final_plans"] = {k: out[k] for k in kinds}
    return headline
