"""stage=select: rank the candidate plans against full-precision images.

Every candidate weight plan (activations at full precision) generates the selection prompts; the
best by ``stage.metric`` becomes ``final_weight_mp.yaml``. Then every activation plan is ranked
with that weight plan applied -> ``final_act_mp.yaml``. Identical candidates (common across seeds
and K at low targets) are generated once. Every candidate's images are kept as a grid under
``select/`` and listed in ``select_candidates.csv``; the same table goes to W&B with the images.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from mixprec import search
from mixprec.quantizers import set_plan
from mixprec.selection import METRICS, Candidate, image_grid, image_scores, rank, slug
from mixprec.stages.common import ModelBundle, load_calibrated, model_spec, prompt_set, tracker
from mixprec.workspace import FingerprintMismatchError, MissingArtifactError, Workspace

log = logging.getLogger("mixprec")

FINAL = {"weight": "final_weight_mp.yaml", "act": "final_act_mp.yaml"}
CANDIDATES_CSV = "select_candidates.csv"
COLUMNS = ["kind", "rank", "path", "target", "K", "seed", "mean_bits", "mib", "mse", "ssim", "psnr_db", "adherence",
           "duplicate_of", "grid"]


def check_plan_fingerprints(ws: Workspace, header: dict[str, Any], path: str) -> None:
    found = {"model": header.get("model_fingerprint"), "quant": header.get("quant_fingerprint")}
    if found["model"] is None:
        return
    try:
        ws.check_fingerprints(found, path, "allocate")
    except FingerprintMismatchError as exc:
        raise FingerprintMismatchError(f"plan {exc}") from None


def _budget_of(header: dict[str, Any]) -> float | None:
    value = header.get("budget_mib") if header.get("budget") == "bytes" else header.get("target")
    return None if value is None else float(value)


def load_candidates(ws: Workspace, kind: str, target: float | None = None) -> list[Candidate]:
    """Candidate plans of one kind; with ``target``, only those allocated for that budget (mean bits or MiB).

    Plans of one budget compete: across budgets the largest plan would always win.
    """
    paths = sorted(ws.root.glob(f"plans/{kind}_*/seed*.yaml"), key=lambda p: search.natural_key(str(p)))
    how = (f"`python run.py stage=allocate stage.kind={kind}` (or the sweep "
           f"`python run.py -cd sweeps -cn allocate stage.kind={kind}`)")
    if not paths:
        raise MissingArtifactError(f"no candidate {kind} plans under {ws.root / 'plans'}: run {how} first")
    out, budgets = [], set()
    for p in paths:
        plan = search.read_plan(p)
        rel = str(p.relative_to(ws.root))
        check_plan_fingerprints(ws, plan.header, rel)
        budgets.add(_budget_of(plan.header))
        if target is None or _budget_of(plan.header) == float(target):
            out.append(Candidate(rel, plan.header, plan.bits))
    if not out:
        raise MissingArtifactError(
            f"no candidate {kind} plans for target {target:g} (the workspace has targets "
            f"{sorted(b for b in budgets if b is not None)}): run {how.replace('`(', '` (')} with stage.target={target:g}, "
            f"or set stage.{kind}_target to one of those")
    return out


def output_paths(output_dir: str | None) -> dict[str, str]:
    """Where one selection writes: the workspace root (what infer and report read), or its own folder,
    so that selections for several budgets can run side by side in one workspace."""
    folder = str(output_dir or "").strip("/")
    at = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)
    return {"weight": at(FINAL["weight"]), "act": at(FINAL["act"]), "csv": at(CANDIDATES_CSV),
            "grids": folder or "select"}


def evaluate(bundle: ModelBundle, candidates: list[Candidate], kind: str, fixed_weight: dict | None, reference,
             prompts: list[str], seeds: list[int], checker: str | None, ws: Workspace, progress: bool,
             grids: str = "select") -> None:
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
        if kind == "weight":
            set_plan(bundle.layers, weight_bits=cand.bits)
        else:
            set_plan(bundle.layers, weight_bits=fixed_weight, act_bits=cand.bits)
        images = bundle.sampler.generate(prompts, seeds).images
        cand.scores = image_scores(reference, images, prompts, checker)
        grid = f"{grids}/{kind}/{slug(cand.path)}.png"
        with ws.atomic_path(grid) as tmp:
            image_grid(images).save(tmp, format="PNG")
        cand.scores["grid"] = grid
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
    with ws.atomic_path(path or FINAL[kind]) as tmp:
        search.write_plan(tmp, search.Plan(header, best.bits))


def _row(kind: str, i: int, c: Candidate) -> dict[str, Any]:
    h = c.header
    mean = (h.get("achieved_mean_bits") or {}).get("overall")
    return {"kind": kind, "rank": i + 1, "path": c.path, "target": h.get("target", h.get("budget_mib")),
            "K": h.get("K"), "seed": h.get("seed"), "mean_bits": mean, "mib": h.get("mib"),
            "mse": c.scores.get("mse"), "ssim": c.scores.get("ssim"), "psnr_db": c.scores.get("psnr_db"),
            "adherence": c.scores.get("adherence"), "duplicate_of": c.duplicate_of, "grid": c.scores.get("grid")}


def run(cfg: DictConfig, ws: Workspace) -> dict:
    s = cfg.stage
    metric = str(s.metric)
    kinds = list(s.kinds)
    spec = model_spec(cfg)
    checker = spec.checker
    if metric not in METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; stage.metric is one of {', '.join(METRICS)}")
    if metric == "adherence" and checker is None:  # before loading anything
        raise ValueError(f"stage.metric=adherence needs a model with a content checker; {spec.name} has none "
                         f"(use stage.metric=mse or ssim)")
    pairs = prompt_set(cfg, "selection")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    targets = {"weight": s.weight_target, "act": s.act_target}
    candidates = {k: load_candidates(ws, k, targets[k]) for k in kinds}  # fail early, before generating anything
    out = output_paths(s.get("output_dir"))
    bundle = load_calibrated(cfg, ws, batch_size=int(s.batch_size))
    reference = bundle.sampler.generate(prompts, seeds).images
    with ws.atomic_path(f"{out['grids']}/full_precision.png") as tmp:
        image_grid(reference).save(tmp, format="PNG")
    rows, headline = [], {"metric": metric, "images": len(pairs)}
    fixed_weight = None
    with tracker(cfg, ws, "select") as track:
        for kind in kinds:
            if kind == "act" and fixed_weight is None:
                if not ws.exists(out["weight"]):
                    raise MissingArtifactError(f"{out['weight']} is missing: run stage=select with "
                                               f"stage.kinds=[weight,act] first")
                fixed_weight = search.read_plan(ws.path(out["weight"])).bits
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
            track.log_table(f"select/{kind}", COLUMNS[:-1] + ["images"],
                            [[r[c] for c in COLUMNS[:-1]] + [Image.open(ws.path(r["grid"])) if r["grid"] else None]
                             for r in kind_rows])
            log.info("select %s: %d candidates, best %s (%s=%.5g)", kind, len(cands), best.path, metric,
                     best.scores[metric] if metric in best.scores else float("nan"))
        ws.write_csv(out["csv"], rows, COLUMNS)
        track.log_artifact("final_plans", "plan", [ws.path(out[k]) for k in kinds])
    headline["final_plans"] = {k: out[k] for k in kinds}
    return headline
