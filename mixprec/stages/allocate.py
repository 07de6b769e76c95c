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

import itertools
import logging
import re
from collections.abc import Mapping
from typing import Any

from mixprec import artifacts
from mixprec.allocation import (AllocationRequest, allocate, kind_of, log_pareto, programs_of, reachable_error,
                                write_pareto)
from mixprec.artifacts import Budget
from mixprec.context import StageContext
from mixprec.kernels.latency_table import LatencyTable
from mixprec.latency_allocation import LatencyRequest, allocate_latency
from mixprec.search import InfeasibleBudgetError
from mixprec.settings import AllocateSettings

log = logging.getLogger("mixprec")


def _as_list(v: Any) -> list:
    if v is None:
        return [None]
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping))):
        return list(v)
    return [v]


def _budgets(mode: str, s: AllocateSettings) -> list[Budget]:
    if mode == "bytes":
        values, missing = _as_list(s.budget_mib), "stage.budget=bytes needs stage.budget_mib (MiB of packed weights + scales)"
    elif mode == "mean_bits":
        values, missing = _as_list(s.target), "stage.budget=mean_bits needs stage.target (mean bits)"
    else:
        raise ValueError(f"stage.budget must be mean_bits, bytes or latency, got {mode!r}")
    if any(v is None for v in values):
        raise ValueError(missing)
    return [Budget.of(mode, v) for v in values]


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    q = ctx.run.quant
    census = artifacts.read_census(ws)
    # per-group weight options (quant.weight_group_sizes) are choices of the byte programs, not of latency ones
    per_prompt = artifacts.read_per_prompt(ws, grouped=bool(q.weight_group_sizes) and str(s.budget) != "latency")
    if not artifacts.check_sensitivity_fingerprints(ws):
        log.warning("allocate: no sensitivity.json in %s; cannot check that %s was made for this model and recipe",
                    ws.root, artifacts.PER_PROMPT_CSV)
    if str(s.budget) == "latency":  # one program over weight and activation bits
        return _latency(ctx, q, census, per_prompt)
    kinds = [kind_of(k) for k in _as_list(s.kind)]
    programs = programs_of(str(s.program))
    combos = list(itertools.product(kinds, _budgets(str(s.budget), s), _as_list(s.K), _as_list(s.seed)))
    protected_acts = artifacts.read_protected(ws) if "act" in kinds else []
    combos, failures = _reachable(combos, census, q, protected_acts, str(s.on_infeasible))
    results = []
    for (kind, budget, K, seed), program in itertools.product(combos, programs):
        group_sizes = tuple(int(g) for g in q.weight_group_sizes) if kind == "weight" else ()
        if program == "split" and len(programs) > 1 and (group_sizes or budget.unit != "mean_bits"):
            continue  # a byte program either way (group scales or a MiB budget): the joint plan is that plan
        request = AllocationRequest(
            kind=kind, budget=budget, K=float(K), seed=int(seed), bits=q.bits_by_group(kind),
            solver=str(s.solver), time_limit_s=float(s.time_limit_s), tolerance=float(s.tolerance),
            bytes_tolerance=float(s.bytes_tolerance), metric_cap=float(s.metric_cap), program=program,
            group_sizes=group_sizes, program_in_path=program == "split" and len(programs) > 1,
            content_metric=str(s.content_metric), quality_metric=str(s.quality_metric))
        try:
            plan, sol = allocate(request, census, per_prompt[kind], protected_acts if kind == "act" else [],
                                 ws.fingerprints)
        except InfeasibleBudgetError as exc:
            if str(s.on_infeasible) != "skip":
                raise
            log.warning("allocate: %s skipped: %s", request.path, exc)
            failures.append({"plan": request.path, "error": str(exc)})
            continue
        artifacts.write_plan_file(ws, request.path, plan)
        results.append(_record(track, request, plan.header, sol.solve_time_s))
    headline: dict[str, Any] = {"plans": results, "skipped": failures,
                                "solve_time_s": sum(r["solve_time_s"] for r in results)}
    if len(results) == 1:
        track.summary({k: v for k, v in results[0].items() if isinstance(v, (int, float))})
    if len(combos) > 1 or bool(s.pareto):
        summary = write_pareto(ws.root, ws.fingerprints, float(s.pareto_size_rtol))
        headline["pareto"] = {k: summary[k] for k in ("candidates", "pareto", "csv", "png")}
        log_pareto(track, summary, ws.root)
    return headline


def _reachable(combos: list, census, q, protected_acts: list[str], on_infeasible: str) -> tuple[list, list[dict]]:
    """Drop the requests whose budget the allowed widths cannot reach, saying so once per budget, up front
    (or raise, with stage.on_infeasible=raise, before anything is solved)."""
    keep, skipped = [], []
    unreachable: dict[tuple[str, Budget], str] = {}
    for kind, budget, *_ in combos:
        if (kind, budget) not in unreachable:
            unreachable[kind, budget] = reachable_error(kind, budget, census, q.bits_by_group(kind),
                                                        protected_acts if kind == "act" else []) or ""
    for kind, budget in [k for k, why in unreachable.items() if why]:
        plans = [c for c in combos if c[:2] == (kind, budget)]
        if on_infeasible != "skip":
            raise InfeasibleBudgetError(unreachable[kind, budget])
        log.warning("allocate: skipping %s %s %s (%d plan(s)): %s", kind, budget.value, budget.unit, len(plans),
                    unreachable[kind, budget])
        skipped.append({"kind": kind, "budget": budget.value, "unit": budget.unit, "plans": len(plans),
                        "error": unreachable[kind, budget]})
    keep = [c for c in combos if not unreachable[c[0], c[1]]]
    return keep, skipped


def latency_budget_ms(value: Any, full_ms: float) -> float:
    """One ``stage.budget_ms`` item in milliseconds: a number is milliseconds; ``"<f>x"`` is ``f`` times
    the latency table's 16-bit time ``full_ms`` (``"1x"``: not slower than 16 bit, ``"0.95x"``: 5 %
    faster), rounded to the microsecond."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*x\s*", value.lower())
        if not m:
            raise ValueError(f"stage.budget_ms: {value!r} is neither milliseconds nor a multiple of the 16-bit time "
                             f"written '<f>x' (e.g. 9.2, '1x', '0.95x')")
        return round(float(m.group(1)) * full_ms, 3)
    return float(value)


def _latency(ctx: StageContext, q, census, per_prompt) -> dict:
    """stage.budget=latency: plans under the latency table's prediction (mixprec.latency_allocation)."""
    s, ws = ctx.settings, ctx.workspace
    if s.budget_ms is None:
        raise ValueError("stage.budget=latency needs stage.budget_ms (milliseconds per denoiser call at the latency "
                         "table's resolution and batch)")
    rel = str(s.latency_table)
    table = LatencyTable.from_json(artifacts.read_latency_table(ws, rel), str(ws.path(rel)))
    budgets = [latency_budget_ms(b, table.model_ms) for b in _as_list(s.budget_ms)]
    bits = {"weight": q.bits_by_group("weight"), "act": q.bits_by_group("act")}
    headroom = table.default_headroom if s.latency_headroom is None else float(s.latency_headroom)
    if s.latency_headroom is None:
        log.info("allocate: latency headroom %.0f%% (the default for a%s table)", 100 * headroom,
                 " calibrated" if table.calibrated else "n uncalibrated")
    # stage.budget_mib beside budget=latency: a cap on the plan's weight MiB too (e.g. half the size, 1x the time)
    caps = [None if m is None else float(m) for m in _as_list(s.budget_mib)]
    requests = [LatencyRequest(float(b), bits, float(K), int(seed), str(s.solver), float(s.time_limit_s),
                               float(s.metric_cap), headroom, mib)
                for b, mib, K, seed in itertools.product(budgets, caps, _as_list(s.K), _as_list(s.seed))]
    protected = artifacts.read_protected(ws) if ws.exists(artifacts.PROTECTED_YAML) else []
    return allocate_latency(ws, requests, table, census, per_prompt, protected, ctx.tracker, rel)


def _record(track, request: AllocationRequest, h: Mapping[str, Any], solve_time_s: float) -> dict[str, Any]:
    """Log one solved candidate; its row of the stage's headline."""
    log.info("allocate: %s %s mean bits %s, %.1f MiB, score %.4f, solved in %.3f s", request.path, h["status"],
             {g: round(v, 3) for g, v in h["achieved_mean_bits"].items()}, h["mib"], h["score"], solve_time_s)
    track.log({"mib": h["mib"], "score": h["score"], "objective": h["objective"],
               "mean_bits_overall": h["achieved_mean_bits"].get("overall"), "solve_time_s": solve_time_s,
               "K": request.K, "target": request.budget.value, "seed": request.seed})
    return {"plan": request.path, "status": h["status"], "mean_bits": h["achieved_mean_bits"], "mib": h["mib"],
            "score": h["score"], "objective": h["objective"], "solve_time_s": solve_time_s}
