"""stage=select: rank the candidate plans against full-precision images.

Every candidate weight plan (activations at full precision) generates the selection prompts; the
best by ``stage.metric`` becomes ``final_weight_mp.yaml``. Then every activation plan is ranked
with that weight plan applied -> ``final_act_mp.yaml``. Identical candidates (common across seeds
and K at low targets) are generated once. Every candidate's images are kept as a grid under
``select/`` and listed in ``select_candidates.csv``; the same table goes to W&B with the images.

``stage.guard`` (default on) adds the uniform plan of the same budget to the candidates
(``uniform/<kind>_<target>`` in the table), so the final plan never loses to uniform on the
selection prompts. ``stage.refine.evaluations`` > 0 then runs the local search of
:mod:`mixprec.search.refine` from the winner, scored by the same generation; a refined plan that
beats it becomes final (``<path>+refined``). The final plan's header records the refinement's
moves and the cost (evaluations, wall time) of selection and refinement; so does ``select.json``.
See :mod:`mixprec.finalize`.
"""

from __future__ import annotations

import logging
import time

from mixprec import artifacts, search
from mixprec.artifacts import SELECT_COLUMNS
from mixprec.finalize import (JointScorer, RefineOptions, refine_plan, sensitivity_prior, uniform_candidate,
                              uniform_path)
from mixprec.quantizers import set_plan
from mixprec.selection import (Candidate, generate_and_score, load_candidates, rank, resolve_metric, save_grid, slug,
                               sort_key)
from mixprec.context import ModelBundle, StageContext, load_calibrated
from mixprec.workspace import MissingArtifactError, Workspace

log = logging.getLogger("mixprec")


def evaluate(bundle: ModelBundle, candidates: list[Candidate], kind: str, fixed_weight: dict | None, reference,
             prompts: list[str], seeds: list[int], checker: str | None, ws: Workspace, progress: bool,
             grids: str = artifacts.SELECT_GRIDS_DIR, fixed_groups: dict | None = None) -> None:
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
        groups = cand.group_size if kind == "weight" else fixed_groups
        generated = generate_and_score(bundle.sampler, bundle.layers, prompts, seeds, reference, checker, weight, act,
                                       weight_groups=groups)
        cand.scores = generated.scores
        cand.scores["grid"] = save_grid(ws, f"{grids}/{kind}/{slug(cand.path)}.png", generated.images)
        seen[cand.digest] = cand
    set_plan(bundle.layers)


def write_final(ws: Workspace, kind: str, best: Candidate, metric: str, n_candidates: int,
                weight_plan: str | None = None, path: str | None = None, extra: dict | None = None) -> None:
    header = dict(best.header)
    # selected_from names the candidate (a file under plans/, or the guard's uniform plan); a refined
    # final plan says so with refined: true, its moves in the refinement record
    header.update({"selected_from": header.pop("refined_from", best.path), "refined": best.path.endswith("+refined"),
                   "selected_by": metric, "candidates": n_candidates,
                   "selection_scores": {k: best.scores.get(k) for k in ("mse", "ssim", "psnr_db", "adherence")
                                        if best.scores.get(k) is not None}})
    if weight_plan:
        header["with_weight_plan"] = weight_plan
    header.update(extra or {})
    artifacts.write_plan_file(ws, path or artifacts.FINAL_PLANS[kind], search.Plan(header, best.bits, best.group_size))


def _row(kind: str, i: int, c: Candidate) -> dict:
    return artifacts.selection_row(kind, i + 1, c.path, c.header, c.scores, c.duplicate_of)


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    kinds = list(s.kinds)
    spec = ctx.run.model
    checker = spec.checker
    metric = resolve_metric(str(s.metric), checker)  # before loading anything
    refine_opts = RefineOptions.of(dict(s.refine or {}))
    pairs = ctx.run.prompt_set("selection")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    targets = {"weight": s.weight_target, "act": s.act_target}
    candidates = {k: load_candidates(ws, k, targets[k]) for k in kinds}  # fail early, before generating anything
    out = artifacts.final_plan_paths(s.output_dir)
    bundle = load_calibrated(ctx.run, ws, batch_size=int(s.batch_size))
    search_ctx = _SearchInputs(ws, bundle, bool(s.guard), refine_opts, bool(s.progress))
    reference = bundle.sampler.generate(prompts, seeds).images
    save_grid(ws, f"{out['grids']}/full_precision.png", reference)
    rows, headline = [], {"metric": metric, "images": len(pairs), "cost": {}}
    fixed_weight, fixed_groups = None, None
    for kind in kinds:
        if kind == "act" and fixed_weight is None:
            if not ws.exists(out["weight"]):
                raise MissingArtifactError(f"{out['weight']} is missing: run stage=select with "
                                           f"stage.kinds=[weight,act] first")
            weight_plan = artifacts.read_plan_file(ws, out["weight"])
            fixed_weight, fixed_groups = weight_plan.bits, weight_plan.group_size
        scorer = JointScorer(bundle.sampler, bundle.layers, prompts, seeds, reference, checker, metric, kind,
                             fixed_weight, fixed_groups)
        cands = candidates[kind] + search_ctx.guard_candidates(kind, candidates[kind])
        t0 = time.perf_counter()
        evaluate(bundle, cands, kind, fixed_weight, reference, prompts, seeds, checker, ws, bool(s.progress),
                 out["grids"], fixed_groups)
        cost = {"selection": {"evaluations": len({c.digest for c in cands}), "wall_s": time.perf_counter() - t0}}
        ranked = rank(cands, metric)
        best, refined = search_ctx.refine(kind, ranked[0], scorer, metric)
        if refined is not None:
            cost["refinement"] = {k: refined.summary()[k] for k in ("evaluations", "operating_point_evaluations",
                                                                     "wall_s")}
            ranked = [best] + ranked if best is not ranked[0] else ranked
        # the plan file holds no wall-clock time (identical inputs -> identical bytes): that is in select.json
        write_final(ws, kind, best, metric, len(cands), out["weight"] if kind == "act" else None, out[kind],
                    extra={"guard": search_ctx.guard, "refinement": _timeless(refined.summary()) if refined else None,
                           "evaluations": {k: v["evaluations"] for k, v in cost.items()}})
        set_plan(bundle.layers)
        if kind == "weight":
            fixed_weight, fixed_groups = best.bits, best.group_size
        kind_rows = [_row(kind, i, c) for i, c in enumerate(ranked)]
        rows += kind_rows
        headline["cost"][kind] = cost
        headline[kind] = {"candidates": len(cands), "unique": len({c.digest for c in cands}),
                          "best": best.path, "scores": {k: best.scores.get(k) for k in ("mse", "ssim", "adherence")},
                          "refinement": refined.summary() if refined else None}
        from PIL import Image
        track.log_table(f"select/{kind}", SELECT_COLUMNS[:-1] + ["images"],
                        [[r[c] for c in SELECT_COLUMNS[:-1]] + [Image.open(ws.path(r["grid"])) if r["grid"] else None]
                         for r in kind_rows])
        log.info("select %s: %d candidates, best %s (%s: %s)", kind, len(cands), best.path, metric,
                 ", ".join(f"{k} {best.scores[k]:.5g}" for k in ("adherence", "psnr_db", "ssim", "mse")
                           if best.scores.get(k) is not None))
    artifacts.write_selection(ws, out["csv"], rows)
    track.log_artifact("final_plans", "plan", [ws.path(out[k]) for k in kinds])
    headline["final_plans"] = {k: out[k] for k in kinds}
    return headline


def _timeless(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "wall_s"}


class _SearchInputs:
    """What the guard and the refinement need beyond the candidates: census, tables, calibrated widths."""

    def __init__(self, ws: Workspace, bundle: ModelBundle, guard: bool, refine_opts: RefineOptions,
                 progress: bool) -> None:
        self.ws, self.bundle, self.guard, self.refine_opts, self.progress = ws, bundle, guard, refine_opts, progress
        self.census = artifacts.read_census(ws)
        self.protected = artifacts.read_protected(ws) if ws.exists(artifacts.PROTECTED_YAML) else []
        self.group_sizes = tuple(bundle.quant.weight_group_sizes)
        self.per_prompt = (artifacts.read_per_prompt(ws, grouped=bool(self.group_sizes))
                           if refine_opts.evaluations else None)

    def guard_candidates(self, kind: str, cands: list[Candidate]) -> list[Candidate]:
        """The uniform plan of the candidates' budget (none without one budget, or with the guard off)."""
        budgets = {artifacts.PlanHeader(c.header).budget for c in cands}
        if not self.guard or len(budgets) != 1 or None in budgets:
            return []
        budget = budgets.pop()
        q = self.bundle.quant
        plan = uniform_candidate(kind, budget, self.census, self.protected, self.ws.fingerprints,
                                 q.weight_bits if kind == "weight" else q.act_bits)
        if plan is None:
            log.info("select %s: no uniform plan within %s %s of the calibrated widths: no guard candidate",
                     kind, budget.value, budget.unit)
            return []
        return [Candidate(uniform_path(kind, budget), plan.header, plan.bits)]

    def refine(self, kind: str, best: Candidate, scorer: JointScorer, metric: str):
        """(final candidate, refinement result or None): the refined plan when it beats ``best``."""
        budget = artifacts.PlanHeader(best.header).budget
        if not self.refine_opts.evaluations or budget is None:
            return best, None
        q = self.bundle.quant
        groups = {c.name: c.group for c in self.census}
        prior = sensitivity_prior(self.per_prompt[kind], q.bits_by_group(kind), groups,
                                  self.protected if kind == "act" else [],
                                  group_sizes=self.group_sizes if kind == "weight" else ())
        result = refine_plan(best.bits_or_full(), (sort_key(best.scores, metric), best.scores), scorer, kind, budget,
                             self.census, q.bits_by_group(kind), self.refine_opts, prior, self.protected,
                             progress=self.progress, group_size=best.group_size)
        if not result.improved:
            return best, result
        bits, group_size = search.option_bits(result.bits)
        size = search.LayerSizes.of(self.census).describe(kind, bits, group_size)
        header = dict(best.header) | {"refined_from": best.path, "achieved_mean_bits": {"overall": size["mean_bits"]},
                                      "bytes": size["bytes"], "mib": size["mib"]}
        refined = Candidate(f"{best.path}+refined", header, bits, group_size)
        refined.scores = dict(result.scores)
        return refined, result
