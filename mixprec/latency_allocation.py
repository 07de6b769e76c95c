"""Plans under measured latency budgets, and their front (no Hydra).

For each :class:`LatencyRequest` (budget in ms per denoiser call at the latency table's resolution
and batch, K, seed): :func:`mixprec.search.latency.latency_plans` chooses (weight bits, activation
bits) per layer against ``layer_latency.json``; the weight plan goes to
``plans/latency_<ms>ms_<K>/seed<seed>.yaml`` and the activation plan beside it
(``act_seed<seed>.yaml``, named in the weight plan's header), both with the table's predicted
latency. :func:`write_latency_pareto` marks the front of score vs predicted latency
(``pareto_latency.csv``/``.png``). ``stage=benchmark stage.plans=[<weight plan path>]`` runs both parts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixprec import artifacts, search
from mixprec.artifacts import FULL_PRECISION_BITS, CensusLayer
from mixprec.kernels.latency_table import LatencyTable
from mixprec.search.budget import LayerSizes
from mixprec.search.latency import latency_plans
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")


@dataclass(frozen=True)
class LatencyRequest:
    budget_ms: float
    bits: Mapping[str, Mapping[str, Sequence[int]]]  # {"weight": {group: bits}, "act": {group: bits}}
    K: float = 1.0
    seed: int = 0
    solver: str = "cp-sat"
    time_limit_s: float = 10.0
    metric_cap: float = 100.0
    headroom: float = 0.0  # fraction of the budget the prediction keeps free (see solve_latency)
    budget_mib: float | None = None  # a cap on the plan's weight MiB beside the latency budget

    @property
    def paths(self) -> tuple[str, str]:
        return artifacts.latency_plan_paths(self.budget_ms, self.K, self.seed, self.budget_mib)


def allocate_latency(ws: Workspace, requests: Sequence[LatencyRequest], table: LatencyTable,
                     census: Sequence[CensusLayer], per_prompt: Mapping[str, Any], protected_acts: Sequence[str],
                     track, table_file: str = artifacts.LAYER_LATENCY) -> dict[str, Any]:
    """Solve and write every request; refresh the latency front; the stage's headline."""
    groups = {c.name: c.group for c in census}
    settings = table.meta.get("settings") or {}
    layer_bytes = None
    if any(r.budget_mib is not None for r in requests):  # stored weight bytes per layer at every allowed width
        sizes = LayerSizes.of(census)
        widths = {b for r in requests for g in r.bits["weight"].values() for b in g} | {FULL_PRECISION_BITS}
        layer_bytes = {l: {b: sizes.layer_bytes("weight", l, b) for b in widths} for l in groups}
    results = []
    for r in requests:
        wplan, aplan, sol = latency_plans(
            groups=groups, per_prompt=per_prompt, bits=r.bits, act_protected=protected_acts, layer_ms=table.plan_ms,
            rest_ms=table.rest_ms, budget_ms=r.budget_ms, K=r.K, seed=r.seed, solver=r.solver,
            time_limit_s=r.time_limit_s, metric_cap=r.metric_cap, headroom=r.headroom,
            table_meta={"file": table_file, "model_ms": table.model_ms, **settings}, fingerprints=ws.fingerprints,
            layer_bytes=layer_bytes, max_bytes=None if r.budget_mib is None else int(r.budget_mib * 2 ** 20))
        wrel, arel = r.paths
        wplan.header["act_plan"] = Path(arel).name
        artifacts.write_plan_file(ws, arel, aplan)
        artifacts.write_plan_file(ws, wrel, wplan)
        h = wplan.header
        results.append({"plan": wrel, "status": h["status"], "budget_ms": r.budget_ms, "predicted_ms": h["predicted_ms"],
                        "budget_mib": r.budget_mib, "mib": h.get("mib"),
                        "score": h["score"], "objective": h["objective"], "layers_by_choice": h["layers_by_choice"],
                        "solve_time_s": sol.solve_time_s})
        log.info("allocate: %s %s predicted %.3f ms (budget %.3f), score %.4f, %s", wrel, h["status"],
                 h["predicted_ms"], r.budget_ms, h["score"], h["layers_by_choice"])
        track.log({"budget_ms": r.budget_ms, "predicted_ms": h["predicted_ms"], "score": h["score"], "K": r.K,
                   "seed": r.seed, "solve_time_s": sol.solve_time_s})
    front = write_latency_pareto(ws.root)
    columns = artifacts.PARETO_LATENCY_COLUMNS
    track.log_table("pareto_latency", columns, [[row.get(c) for c in columns] for row in front["rows"]])
    if front.get("png"):
        track.log_file_image("pareto_latency_scatter", front["png"])
    return {"plans": results, "solve_time_s": sum(x["solve_time_s"] for x in results),
            "pareto_latency": {k: front[k] for k in ("candidates", "pareto", "csv", "png")}}


def write_latency_pareto(root) -> dict[str, Any]:
    """Every latency plan of the workspace: the front of score vs predicted latency."""
    root = Path(root)
    marked = search.pareto_front(artifacts.latency_candidate_rows(root), size_key="predicted_ms",
                                 objective_key="score")
    search.write_pareto_csv(root / artifacts.PARETO_LATENCY_CSV, marked, artifacts.PARETO_LATENCY_COLUMNS)
    png = None
    if marked:
        png = search.plot_pareto(root / artifacts.PARETO_LATENCY_PNG, marked, size_key="predicted_ms",
                                 objective_key="score", xlabel="predicted denoiser latency (ms, latency table)",
                                 ylabel="score (weight + act sensitivity, K=1, seed-0 tables)",
                                 title=f"latency plans: {len(marked)} candidates")
    return {"candidates": len(marked), "pareto": sum(r["pareto"] for r in marked),
            "csv": str(root / artifacts.PARETO_LATENCY_CSV), "png": str(png) if png else None, "rows": marked}
