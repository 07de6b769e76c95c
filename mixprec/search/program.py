"""The integer programs that turn sensitivities into bit-width plans.

Two programs, both multiple-choice knapsacks (one bit-width per layer):

* :func:`solve_group` — the published MixDQ program, one group (content or quality) and one kind
  (weights or activations) at a time: maximize the summed metric subject to the size-weighted
  mean bit-width lying in ``[target - tolerance, target + eps]``.
* :func:`solve_bytes` — one joint program over both groups of the weights with a budget in MiB
  of packed weights plus per-channel scales; metrics of the two groups are normalised so that
  they can share one objective, and K weights content against quality.

Every returned solution is re-checked in exact integer arithmetic against the constraints it was
solved under (:class:`PlanVerificationError` if a solver ever hands back something else), and
every request is checked for feasibility before a model is built, so that an impossible target
fails with the range that *is* reachable rather than with a solver status.

Protected layers (kept in full precision, e.g. activation protection) are not variables: they are
excluded from the mean-bit budget and appear in a plan with :data:`PROTECTED_BITS` (16), so that
every value in a plan is an int and "16" reads as what the layer runs in (fp16/bf16).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

from mixprec.quant.options import parse_weight_option, table_key

from .budget import weight_layer_bytes, weight_plan_bytes
from .plan import natural_key

PROTECTED_BITS = 16
SOLVERS = ("cp-sat", "highs", "scip", "cbc")
GROUPS = ("content", "quality")
MIB = 1 << 20


class AllocationError(ValueError):
    """A request the allocator cannot turn into a plan; the message says what to change."""


class InfeasibleBudgetError(AllocationError):
    """The target (mean bits or bytes) lies outside what the allowed bit-widths can reach."""


class SensitivityError(AllocationError):
    """Sensitivities are missing, non-finite in a way that cannot be capped, or for unknown bits."""


class SolverError(RuntimeError):
    """The solver returned no solution (time limit reached before the first one, or invalid model)."""


class PlanVerificationError(RuntimeError):
    """A solver's answer broke a constraint; never expected, checked so it can never pass silently."""


@dataclass(frozen=True)
class Solution:
    """One solved program.

    ``bits`` holds every layer of the program plus protected layers at :data:`PROTECTED_BITS`.
    ``objective`` is the float objective of the returned plan recomputed from the (capped) input
    metric, not the solver's scaled integer objective. ``mean_bits`` is per group (and
    ``"overall"`` over all solved layers) size-weighted, protected layers excluded.
    ``deterministic_time`` is CP-SAT's reproducible work measure (None for MIP solvers);
    ``solve_time_s`` is wall-clock and therefore not reproducible.
    """

    bits: dict[str, int]
    status: str
    objective: float
    mean_bits: dict[str, float]
    solve_time_s: float
    solver: str
    deterministic_time: float | None = None
    bytes: int | None = None
    objective_by_group: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    status_by_group: dict[str, str] = field(default_factory=dict)
    # layer -> group size for layers the byte program gave per-group weight scales (bits: their width)
    group_size: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- validation

def _check_solver(solver: str) -> str:
    s = solver.lower().replace("_", "-")
    if s == "cpsat":
        s = "cp-sat"
    if s not in SOLVERS:
        raise AllocationError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    return s


def _check_bits(bits: Iterable[int], what: str) -> tuple[int, ...]:
    out = []
    for b in bits:
        if isinstance(b, bool) or int(b) != b or not 1 <= int(b) <= 32:
            raise AllocationError(f"{what}: bit-width {b!r} is not an integer between 1 and 32")
        out.append(int(b))
    if not out:
        raise AllocationError(f"{what}: the set of allowed bit-widths is empty")
    return tuple(sorted(set(out)))


def _capped(value: float, cap: float, layer: str, b: int) -> float:
    v = float(value)
    if math.isnan(v):
        raise SensitivityError(f"sensitivity of layer {layer!r} at {b} bits is NaN; rerun the sensitivity stage "
                               f"for this layer")
    # SQNR of a lossless layer is +inf; capping keeps it comparable and the objective finite.
    return max(-cap, min(cap, v))


def _table(metric: Mapping[str, Mapping[int, float]], layers: Sequence[str], bits: Sequence[int],
           cap: float, what: str) -> dict[str, dict[int, float]]:
    """Capped metric for exactly ``layers`` x ``bits``; every gap is reported at once."""
    missing_layers = [l for l in layers if l not in metric]
    missing_bits: list[str] = []
    table: dict[str, dict[int, float]] = {}
    for l in layers:
        if l not in metric:
            continue
        row = {table_key(k): v for k, v in metric[l].items()}
        gaps = [b for b in bits if b not in row]
        if gaps:
            missing_bits.append(f"{l} (no {', '.join(map(str, gaps))}-bit value; has {sorted(row)})")
            continue
        table[l] = {b: _capped(row[b], cap, l, b) for b in bits}
    if missing_layers or missing_bits:
        parts = []
        if missing_layers:
            parts.append(f"{len(missing_layers)} layer(s) have no sensitivities at all: "
                         f"{', '.join(missing_layers[:8])}{' ...' if len(missing_layers) > 8 else ''}")
        if missing_bits:
            parts.append(f"{len(missing_bits)} layer(s) lack allowed bit-widths {list(bits)}: "
                         f"{'; '.join(missing_bits[:5])}{' ...' if len(missing_bits) > 5 else ''}")
        raise SensitivityError(f"{what}: " + ". ".join(parts) + ". Rerun the sensitivity stage for these layers/bits, "
                               "mark the layers protected or excluded, or restrict the allowed bits.")
    return table


def _check_sizes(sizes: Mapping[str, int], layers: Sequence[str], what: str) -> dict[str, int]:
    out = {}
    for l in layers:
        s = sizes[l]
        if isinstance(s, bool) or int(s) != s or int(s) < 0:
            raise AllocationError(f"{what}: size of layer {l!r} must be a non-negative integer, got {s!r}")
        out[l] = int(s)
    if sum(out.values()) <= 0:
        raise AllocationError(f"{what}: the layers to allocate have total size 0")
    return out


def mean_bits(bits: Mapping[str, int], sizes: Mapping[str, int], include_full_precision: bool = False,
              full_precision_bits: int = PROTECTED_BITS) -> float | None:
    """Size-weighted mean bit-width of a plan: the one definition (plan headers, report, evaluate).

    Full-precision layers (``full_precision_bits`` and above) are left out unless
    ``include_full_precision``; layers without a size count 0; None when nothing has a size.
    """
    items = [(sizes.get(n, 0), b) for n, b in bits.items() if include_full_precision or b < full_precision_bits]
    total = sum(s for s, _ in items)
    return sum(s * b for s, b in items) / total if total else None


def _mean(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    m = mean_bits(bits, sizes)
    return float("nan") if m is None else m


# ---------------------------------------------------------------------------- target split

def reachable_mean(bits: Sequence[int]) -> tuple[int, int]:
    """Reachable size-weighted mean of one group: every layer shares the group's bit set."""
    b = _check_bits(bits, "reachable_mean")
    return b[0], b[-1]


def split_target(target: float, K: float, content_size: int, quality_size: int,
                 content_bits: Sequence[int], quality_bits: Sequence[int]) -> tuple[float, float]:
    """Split an overall mean-bit target into (content_target, quality_target).

    With sizes S_c, S_q and S = S_c + S_q, the split keeps the overall size-weighted mean at the
    target and gives content K times the quality mean bits::

        t_q = target * S / (K * S_c + S_q)        t_c = K * t_q
        so that  (S_c * t_c + S_q * t_q) / S == target.

    A share outside its group's reachable range ``[min bits, max bits]`` is clipped to it and the
    remainder moved to the other group (content first, then quality, then content again — on the
    line S_c*t_c + S_q*t_q = target*S that is the point of the box nearest the K ray). If the
    other group cannot absorb the remainder either, the overall target is infeasible and
    :class:`InfeasibleBudgetError` reports the reachable overall range.

    t_c grows with K (K*S/(K*S_c + S_q) is increasing for K > 0) and clipping is monotone, so a
    larger K never gives content fewer target bits. K = 1 gives equal mean bits. A group of size
    0 takes no budget: the whole target goes to the other one.
    """
    if not (K > 0 and math.isfinite(K)):
        raise AllocationError(f"K must be a positive finite number, got {K!r}")
    cb, qb = _check_bits(content_bits, "content bits"), _check_bits(quality_bits, "quality bits")
    sc, sq = int(content_size), int(quality_size)
    if sc < 0 or sq < 0 or sc + sq == 0:
        raise AllocationError(f"group sizes must be non-negative with a positive sum, got {sc}, {sq}")
    s = sc + sq
    lo = (sc * cb[0] + sq * qb[0]) / s
    hi = (sc * cb[-1] + sq * qb[-1]) / s
    tiny = 1e-9
    if not (lo - tiny <= target <= hi + tiny):
        raise InfeasibleBudgetError(
            f"overall target {target} bits is outside the reachable range [{lo:.4f}, {hi:.4f}] "
            f"(content bits {list(cb)} on {sc} elements, quality bits {list(qb)} on {sq} elements); "
            f"choose a target in that range or change the allowed bit-widths")
    if sc == 0:
        return float("nan"), min(max(float(target), qb[0]), qb[-1])
    if sq == 0:
        return min(max(float(target), cb[0]), cb[-1]), float("nan")

    tq = target * s / (K * sc + sq)
    tc = K * tq
    for _ in range(2):
        if not cb[0] <= tc <= cb[-1]:
            tc = min(max(tc, cb[0]), cb[-1])
            tq = (target * s - sc * tc) / sq
        if not qb[0] <= tq <= qb[-1]:
            tq = min(max(tq, qb[0]), qb[-1])
            tc = (target * s - sq * tq) / sc
    # rounding can leave a hair outside after moving the remainder: snap, the range check passed
    tc = min(max(tc, cb[0]), cb[-1])
    tq = min(max(tq, qb[0]), qb[-1])
    return float(tc), float(tq)


# ---------------------------------------------------------------------------- solver plumbing

def _gcd(values: Iterable[int]) -> int:
    g = reduce(math.gcd, (abs(v) for v in values), 0)
    return g or 1


@dataclass
class _Program:
    """A multiple-choice knapsack: one choice per layer, a weighted sum within [lo, hi]."""

    layers: list[str]
    choices: dict[str, tuple[int, ...]]
    weight: dict[str, dict[int, int]]  # integer constraint coefficient per (layer, bits)
    lo: int
    hi: int
    value: dict[str, dict[int, float]]  # float objective per (layer, bits), maximized
    int_value: dict[str, dict[int, int]]  # the same, scaled and rounded for CP-SAT
    # further rows that must hold too, each (coefficient per (layer, bits), lo, hi, what it is): e.g.
    # a byte cap beside a latency budget
    extra: tuple[tuple[dict[str, dict[int, int]], int, int, str], ...] = ()


def _int_values(value: Mapping[str, Mapping[int, float]], scale: float) -> dict[str, dict[int, int]]:
    # Regret vs the layer's best choice: a constant shift per layer (exactly one choice is taken),
    # so the optimum is unchanged while coefficients stay small whatever the metric's offset.
    out = {}
    for l, row in value.items():
        best = max(row.values())
        out[l] = {b: int(round((v - best) * scale)) for b, v in row.items()}
    return out


def _row(layers: Sequence[str], weight: Mapping[str, Mapping[int, int]], lo: int, hi: int):
    """A constraint row shifted by each layer's cheapest choice and divided by the gcd: the same
    feasible set with smaller numbers. (coefficients, lo, hi)."""
    base = sum(min(weight[l].values()) for l in layers)
    w = {l: {b: c - min(weight[l].values()) for b, c in weight[l].items()} for l in layers}
    g = _gcd(c for row in w.values() for c in row.values())
    w = {l: {b: c // g for b, c in row.items()} for l, row in w.items()}
    return w, -(-(lo - base) // g), (hi - base) // g  # lo rounded up, hi down


def _solve(p: _Program, solver: str, time_limit_s: float) -> tuple[dict[str, int], str, float, float | None]:
    rows = [_row(p.layers, p.weight, p.lo, p.hi)] + [_row(p.layers, w, lo, hi) for w, lo, hi, _ in p.extra]
    t0 = time.perf_counter()
    if solver == "cp-sat":
        bits, status, det = _solve_cpsat(p, rows, time_limit_s)
    else:
        once = _highs_once if solver == "highs" else _ortools_mip_once
        bits, status = _solve_mip(p, rows, solver, time_limit_s, once)
        det = None
    return bits, status, time.perf_counter() - t0, det


def _solve_cpsat(p: _Program, rows, time_limit_s: float):
    from ortools.sat.python import cp_model

    m = cp_model.CpModel()
    x = {(l, b): m.NewBoolVar(f"x{i}_{b}") for i, l in enumerate(p.layers) for b in p.choices[l]}
    for l in p.layers:
        m.AddExactlyOne(x[l, b] for b in p.choices[l])
    for w, lo, hi in rows:
        expr = sum(w[l][b] * x[l, b] for l in p.layers for b in p.choices[l] if w[l][b])
        m.AddLinearConstraint(expr, lo, hi)
    m.Maximize(sum(p.int_value[l][b] * x[l, b] for l in p.layers for b in p.choices[l] if p.int_value[l][b]))
    s = cp_model.CpSolver()
    # One worker, a fixed seed and a deterministic-time limit: same input -> same plan, even when
    # the limit is reached. The wall-clock limit is only a guard against a stalled machine.
    s.parameters.num_workers = 1
    s.parameters.random_seed = 0
    # The default single-worker search stalls on this knapsack (tens of seconds on SDXL sizes);
    # level 2 adds the LP cuts that close it in well under a second.
    s.parameters.linearization_level = 2
    s.parameters.max_deterministic_time = float(time_limit_s)
    s.parameters.max_time_in_seconds = 4.0 * float(time_limit_s) + 1.0
    st = s.Solve(m)
    name = s.StatusName(st)
    if st == cp_model.INFEASIBLE:
        return None, "INFEASIBLE", s.deterministic_time
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise SolverError(f"CP-SAT returned {name} after {s.WallTime():.2f}s (time limit {time_limit_s}s): "
                          f"no plan found; raise stage.time_limit_s or widen stage.tolerance")
    bits = {}
    for l in p.layers:
        chosen = [b for b in p.choices[l] if s.BooleanValue(x[l, b])]
        bits[l] = chosen[0] if len(chosen) == 1 else -1  # -1: caught by verification
    return bits, name, s.deterministic_time


def _solve_mip(p: _Program, rows, solver: str, time_limit_s: float, once):
    """A float MIP (objective: regret vs each layer's best choice), re-solved with tightened rows
    when the answer breaks an exact bound."""
    bounds = [(lo, hi) for _, lo, hi in rows]
    # A MIP accepts a row violated within its (relative) feasibility tolerance; on big coefficients
    # that can exceed the exact budget by a few units. Tighten by the excess and solve again.
    bits: dict[str, int] | None = None
    for _ in range(4):
        bits, optimal = once(p, [(w, lo, hi) for (w, _, _), (lo, hi) in zip(rows, bounds)], solver, time_limit_s)
        if bits is None:
            return None, "INFEASIBLE"
        status = "OPTIMAL" if optimal else "FEASIBLE"
        if -1 in bits.values():
            return bits, status
        broken = False
        for i, (w, lo, hi) in enumerate(rows):
            used = sum(w[l][bits[l]] for l in p.layers)
            if used > hi:
                bounds[i] = (bounds[i][0], bounds[i][1] - (used - hi))
            elif used < lo:
                bounds[i] = (bounds[i][0] + (lo - used), bounds[i][1])
            broken |= not lo <= used <= hi
        if not broken:
            return bits, status
    return bits, "FEASIBLE"


def _ortools_mip_once(p: _Program, rows, solver: str, time_limit_s: float):
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver(solver.upper())
    if s is None:
        raise AllocationError(f"OR-Tools in this environment has no {solver.upper()} backend")
    s.SetNumThreads(1)
    s.SetTimeLimit(max(1, int(time_limit_s * 1000)))
    x = {(l, b): s.BoolVar(f"x{i}_{b}") for i, l in enumerate(p.layers) for b in p.choices[l]}
    for l in p.layers:
        s.Add(sum(x[l, b] for b in p.choices[l]) == 1)
    for w, lo, hi in rows:
        s.Add(sum(w[l][b] * x[l, b] for l in p.layers for b in p.choices[l]) <= hi)
        s.Add(sum(w[l][b] * x[l, b] for l in p.layers for b in p.choices[l]) >= lo)
    obj = s.Objective()
    for l in p.layers:
        best = max(p.value[l].values())
        for b in p.choices[l]:
            obj.SetCoefficient(x[l, b], p.value[l][b] - best)
    obj.SetMaximization()
    params = pywraplp.MPSolverParameters()
    # pywraplp's default relative gap is 1e-4: ask for a proven optimum instead.
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)
    st = s.Solve(params)
    if st == pywraplp.Solver.INFEASIBLE:
        return None, False
    if st not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise SolverError(f"{solver.upper()} returned status {st} (time limit {time_limit_s}s): no plan found; "
                          f"raise stage.time_limit_s or widen stage.tolerance")
    return {l: _chosen(p, l, lambda b: x[l, b].solution_value()) for l in p.layers}, st == pywraplp.Solver.OPTIMAL


def _chosen(p: _Program, layer: str, value) -> int:
    """The one choice a solver set to 1 for ``layer``; -1 (caught by verification) otherwise."""
    chosen = [b for b in p.choices[layer] if value(b) > 0.5]
    return chosen[0] if len(chosen) == 1 else -1


def _highs_once(p: _Program, rows, solver: str, time_limit_s: float):
    """HiGHS through scipy.optimize.milp: no OR-Tools needed (e.g. on a machine without its wheel).

    HiGHS' branch and bound runs on one thread here and is deterministic for the same model, and the
    variables are laid out in the program's canonical layer order, so the plan depends only on the data.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    index = [(l, b) for l in p.layers for b in p.choices[l]]
    cost = np.array([max(p.value[l].values()) - p.value[l][b] for l, b in index])  # regret: minimized
    a = lil_matrix((len(p.layers) + len(rows), len(index)))
    start = 0
    for r, l in enumerate(p.layers):
        a[r, start:start + len(p.choices[l])] = 1.0
        start += len(p.choices[l])
    for r, (w, _, _) in enumerate(rows):
        a[len(p.layers) + r, :] = np.array([float(w[l][b]) for l, b in index])
    lower = np.r_[np.ones(len(p.layers)), [float(lo) for _, lo, _ in rows]]
    upper = np.r_[np.ones(len(p.layers)), [float(hi) for _, _, hi in rows]]
    res = milp(cost, constraints=LinearConstraint(a.tocsr(), lower, upper), integrality=np.ones(len(index)),
               bounds=Bounds(0, 1), options={"time_limit": float(time_limit_s), "mip_rel_gap": 0.0,
                                             "presolve": True, "disp": False})
    if res.x is None:
        if res.status == 2:  # infeasible
            return None, False
        raise SolverError(f"HiGHS returned no plan ({res.message}; time limit {time_limit_s}s); raise "
                          f"stage.time_limit_s or widen stage.tolerance")
    x = dict(zip(index, res.x))
    return {l: _chosen(p, l, lambda b: x[l, b]) for l in p.layers}, res.status == 0


def _verify(p: _Program, bits: Mapping[str, int], what: str) -> None:
    bad = [l for l in p.layers if bits.get(l) not in p.choices[l]]
    if bad:
        raise PlanVerificationError(f"{what}: solver plan has no single allowed bit-width for {bad[:5]}")
    used = sum(p.weight[l][bits[l]] for l in p.layers)
    if not p.lo <= used <= p.hi:
        raise PlanVerificationError(f"{what}: solver plan uses {used}, outside the budget [{p.lo}, {p.hi}]")
    for weight, lo, hi, name in p.extra:
        used = sum(weight[l][bits[l]] for l in p.layers)
        if not lo <= used <= hi:
            raise PlanVerificationError(f"{what}: solver plan uses {used} of {name}, outside [{lo}, {hi}]")


# ---------------------------------------------------------------------------- mean-bit program

def solve_group(metric: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], bits: Sequence[int],
                target: float, *, tolerance: float = 0.1, protected: Iterable[str] = (), solver: str = "cp-sat",
                time_limit_s: float = 10.0, metric_cap: float = 100.0, objective_scale: float = 1e6,
                eps: float = 1e-9, what: str = "group") -> Solution:
    """Choose one bit-width per layer of one group, maximizing the summed metric.

    Args:
        metric: ``{layer: {bits: value}}``, higher is better (SSIM, SQNR dB). Values are clamped to
            ``[-metric_cap, metric_cap]`` (lossless SQNR is +inf); NaN is an error. Entries for
            protected layers and for bits outside ``bits`` are ignored.
        sizes: ``{layer: size}`` — parameter count (weights) or input elements (activations). Its
            keys, minus ``protected``, are the layers of the program; each needs a metric for every
            allowed bit-width.
        bits: the group's allowed bit-widths.
        target: mean bits; the plan's size-weighted mean lies in ``[target - tolerance, target + eps]``.
        protected: layers kept in full precision; they get :data:`PROTECTED_BITS` in the plan and
            take no part in the mean.
        solver: ``"cp-sat"`` (integer objective ``round((metric - layer best) * objective_scale)``,
            one worker, fixed seed, ``time_limit_s`` as a *deterministic*-time limit, so even a
            time-limited FEASIBLE answer is reproducible; a wall-clock guard of 4x + 1 s only
            catches a stalled machine), ``"highs"`` (scipy.optimize.milp, no OR-Tools needed) or
            ``"scip"`` / ``"cbc"`` (float objective, one thread, relative gap 0, wall-clock limit). Layers
            are ordered canonically before modelling, so the plan does not depend on the caller's dict order.
        what: a label for messages, e.g. ``"content weights"``.

    Raises:
        InfeasibleBudgetError: target window outside ``[min bits, max bits]``, or no combination of
            layer bit-widths lands inside it (sizes too coarse for the tolerance).
        SensitivityError: a layer lacks a metric for an allowed bit-width.
    """
    solver = _check_solver(solver)
    allowed = _check_bits(bits, what)
    if tolerance < 0:
        raise AllocationError(f"{what}: tolerance must be >= 0, got {tolerance}")
    prot = set(protected)
    # A canonical order: CP-SAT's search (and so its deterministic time, and which of several tied
    # optima it returns) depends on variable order; the plan must depend only on the data.
    layers = sorted((l for l in sizes if l not in prot), key=natural_key)
    unknown = [l for l in metric if l not in sizes and l not in prot]
    if unknown:
        raise SensitivityError(f"{what}: sensitivities given for {len(unknown)} layer(s) with no size, e.g. "
                               f"{unknown[:5]}; the census and the sensitivity tables disagree — rerun both stages")
    prot_bits = {l: PROTECTED_BITS for l in sizes if l in prot}
    if not layers:
        return Solution(bits=prot_bits, status="OPTIMAL", objective=0.0, mean_bits={"overall": float("nan")},
                        solve_time_s=0.0, solver=solver)
    sz = _check_sizes(sizes, layers, what)
    table = _table(metric, layers, allowed, metric_cap, what)
    total = sum(sz.values())
    lo_b, hi_b = allowed[0], allowed[-1]
    if target + eps < lo_b or target - tolerance > hi_b:
        raise InfeasibleBudgetError(
            f"{what}: target {target:.4f} bits (window [{target - tolerance:.4f}, {target:.4f}]) is outside the "
            f"reachable range [{lo_b}, {hi_b}] of size-weighted mean bits with bits {list(allowed)}; "
            f"choose a target in that range (or a K that moves less budget to this group) or change the allowed bits")
    # Exact integer bounds on sum(size * bits): the tiny eps absorbs float targets like 4.1.
    hi = math.floor((target + eps) * total)
    lo = max(0, math.ceil((target - tolerance - eps) * total))
    prog = _Program(layers=layers, choices={l: allowed for l in layers},
                    weight={l: {b: sz[l] * b for b in allowed} for l in layers}, lo=lo, hi=hi,
                    value=table, int_value=_int_values(table, objective_scale))
    plan, status, dt, det = _solve(prog, solver, time_limit_s)
    if plan is None:
        raise InfeasibleBudgetError(
            f"{what}: no combination of bit-widths {list(allowed)} gives a size-weighted mean in "
            f"[{target - tolerance:.4f}, {target:.4f}] (reachable range [{lo_b}, {hi_b}], but layer sizes are too "
            f"coarse for this window); widen stage.tolerance or move the target")
    _verify(prog, plan, what)
    objective = sum(table[l][plan[l]] for l in layers)
    return Solution(bits={**plan, **prot_bits}, status=status, objective=objective,
                    mean_bits={"overall": _mean(plan, sz)}, solve_time_s=dt, solver=solver,
                    deterministic_time=det)


# ---------------------------------------------------------------------------- byte program

def layer_bytes(params: int, bits: int, out_channels: int) -> int:
    """Packed bytes of one per-channel layer's weights (:func:`mixprec.search.budget.weight_layer_bytes`)."""
    return weight_layer_bytes(params, out_channels, bits)


def plan_bytes(bits: Mapping[str, int | None], params: Mapping[str, int], out_channels: Mapping[str, int]) -> int:
    """Packed bytes of a plan (``None`` bits count as 16: not quantized)."""
    return weight_plan_bytes(bits, params, out_channels)


def normalized_tables(metric: Mapping[str, Mapping[str, Mapping[int, float]]], layers: Mapping[str, Sequence[str]],
                      bits: Mapping[str, Sequence[int]], metric_cap: float = 100.0,
                      group_sizes: Sequence[int] = ()) -> dict[str, dict[str, dict[int | str, float]]]:
    """Per group, ``(metric - min) / (max - min)`` over that group's whole table (its layers x its bits).

    An affine map with a positive scale, so within a group it ranks plans exactly as the raw metric
    does; it puts SSIM (~0.9-1) and SQNR (tens of dB) on one 0..1 scale so that both can share an
    objective. A group whose table is constant maps to 0.

    ``group_sizes``: per-group weight options (``"4g64"``) present in a layer's row join it, mapped
    by the same affine map as the per-channel table (which alone sets min and max, so a recipe
    without group sizes normalises exactly as before).
    """
    out = {}
    for g, ls in layers.items():
        allowed = _check_bits(bits[g], g)
        t = _table(metric[g], list(ls), allowed, metric_cap, g)
        vals = [v for row in t.values() for v in row.values()]
        mn, mx = (min(vals), max(vals)) if vals else (0.0, 0.0)
        span = mx - mn
        t = with_grouped_options(t, metric[g], allowed, group_sizes, metric_cap)
        out[g] = {l: {b: ((v - mn) / span if span > 0 else 0.0) for b, v in row.items()} for l, row in t.items()}
    return out


def with_grouped_options(table: Mapping[str, Mapping[int, float]], metric: Mapping[str, Mapping[int | str, float]],
                         allowed: Sequence[int], group_sizes: Sequence[int], metric_cap: float = 100.0
                         ) -> dict[str, dict[int | str, float]]:
    """``table`` (per-channel widths) plus each layer's measured per-group options ``"4g64"`` whose
    width is allowed and whose group size is in ``group_sizes``: one more choice per layer each.
    A layer without such a measurement (too few input columns for the group) keeps its row."""
    sizes = {int(g) for g in group_sizes}
    out: dict[str, dict[int | str, float]] = {}
    for l, row in table.items():
        out[l] = dict(row)
        if not sizes:
            continue
        for k, v in sorted(metric.get(l, {}).items(), key=lambda kv: str(kv[0])):
            key = table_key(k)
            opt = parse_weight_option(key) if isinstance(key, str) else None
            if opt is not None and opt.group_size in sizes and opt.bits in allowed:
                out[l][key] = _capped(v, metric_cap, l, key)
    return out


def split_option(key: int | str) -> tuple[int, int]:
    """A program choice (``4``, ``"4g64"``, 16 for full precision) -> (bits, group size; 0 = per channel)."""
    if isinstance(key, str):
        opt = parse_weight_option(key)
        return opt.bits, opt.group_size
    return int(key), 0


def option_keys(bits: Mapping[str, int], group_size: Mapping[str, int] | None = None) -> dict[str, int | str]:
    """A plan's (``bits``, ``group_size``) -> one choice per layer (``4``, ``"4g64"``): :func:`option_bits` reversed."""
    gs = group_size or {}
    return {l: f"{int(b)}g{int(gs[l])}" if gs.get(l) else int(b) for l, b in bits.items()}


def option_bits(plan: Mapping[str, int | str]) -> tuple[dict[str, int], dict[str, int]]:
    """A program's choice per layer (``4`` or ``"4g64"``) -> (``bits``, ``group_size``) of a plan file."""
    bits, groups = {}, {}
    for l, k in plan.items():
        opt = parse_weight_option(k) if isinstance(k, str) else None
        bits[l] = opt.bits if opt else int(k)
        if opt and opt.group_size:
            groups[l] = opt.group_size
    return bits, groups


def group_weights(K: float, counts: Mapping[str, int]) -> dict[str, float]:
    """Objective weight per layer of each group: K / N_content and 1 / N_quality, so each group
    contributes its *mean* normalised metric and K = 1 weighs the two groups equally."""
    return {g: (K if g == "content" else 1.0) / n for g, n in counts.items() if n}


def solve_bytes(metric: Mapping[str, Mapping[str, Mapping[int, float]]], groups: Mapping[str, str],
                params: Mapping[str, int], out_channels: Mapping[str, int], budget_mib: float, *, K: float = 1.0,
                bits: Mapping[str, Sequence[int]] | None = None, protected: Iterable[str] = (),
                tolerance_frac: float = 0.01, solver: str = "cp-sat", time_limit_s: float = 10.0,
                metric_cap: float = 100.0, objective_scale: float = 1e9) -> Solution:
    """One program over both weight groups with a budget in MiB of packed weights plus scales.

    Args:
        metric: ``{"content": {layer: {bits: v}}, "quality": {...}}`` (SSIM, SQNR dB).
        groups: ``{layer: "content" | "quality"}`` — the layers of the plan.
        params, out_channels: per layer, for :func:`layer_bytes`.
        budget_mib: the plan's packed size ``P`` (protected layers included at fp16) must satisfy
            ``(1 - tolerance_frac) * budget <= P <= budget`` (in bytes, budget = MiB * 2**20).
        K: content weight. Objective = sum over layers of ``w_g * n[l, b]`` with ``n`` from
            :func:`normalized_tables` and ``w_g`` from :func:`group_weights` (K/N_c, 1/N_q); its
            value lies in ``[0, K + 1]``.
        bits: allowed bits per group (default content {2,4,8}, quality {4,8}).

    ``Solution.mean_bits`` has ``content``, ``quality`` and ``overall`` (parameter-weighted),
    ``objective_by_group`` the raw metric sum per group, ``bytes`` the packed size.
    """
    for l in list(groups):
        if l not in params or l not in out_channels:
            raise AllocationError(f"layer {l!r} has no parameter count or out_channels; rerun the census")
    return solve_budget(metric, groups, lambda l, b: layer_bytes(params[l], b, out_channels[l]), params,
                        budget_mib * MIB, K=K, bits=bits, protected=protected, tolerance_frac=tolerance_frac,
                        solver=solver, time_limit_s=time_limit_s, metric_cap=metric_cap,
                        objective_scale=objective_scale, what="packed weights + scales")


def solve_budget(metric: Mapping[str, Mapping[str, Mapping[int, float]]], groups: Mapping[str, str],
                 cost: Callable[[str, int], int], sizes: Mapping[str, int], budget_bytes: float, *, K: float = 1.0,
                 bits: Mapping[str, Sequence[int]] | None = None, protected: Iterable[str] = (),
                 tolerance_frac: float = 0.01, solver: str = "cp-sat", time_limit_s: float = 10.0,
                 metric_cap: float = 100.0, objective_scale: float = 1e9, what: str = "bytes",
                 group_sizes: Sequence[int] = ()) -> Solution:
    """The joint byte program of :func:`solve_bytes` for any byte count: ``cost(layer, bits)`` is a
    layer's bytes at ``bits`` (:mod:`mixprec.search.budget`: weights, or activations per image),
    protected layers at 16 bits, and the plan's total lies in ``[(1 - tolerance_frac) * budget, budget]``.
    ``sizes`` (parameters or activation elements) weigh the reported mean bits.

    ``group_sizes`` (weights): each measured per-group option ``"4g64"`` of a layer is one more choice
    (``cost`` is then called with that key: its bytes count the group scales); the chosen group sizes
    come back in ``Solution.group_size``, their widths in ``Solution.bits``."""
    solver = _check_solver(solver)
    if not (K > 0 and math.isfinite(K)):
        raise AllocationError(f"K must be a positive finite number, got {K!r}")
    if not 0 <= tolerance_frac < 1:
        raise AllocationError(f"tolerance_frac must be in [0, 1), got {tolerance_frac}")
    bits = dict(bits or {"content": (2, 4, 8), "quality": (4, 8)})
    allowed = {g: _check_bits(bits[g], f"{g} bits") for g in GROUPS}
    prot = set(protected)
    bad_groups = sorted({g for g in groups.values() if g not in GROUPS})
    if bad_groups:
        raise AllocationError(f"unknown group(s) {bad_groups}; layers must be 'content' or 'quality'")
    by_group = {g: sorted((l for l, gg in groups.items() if gg == g and l not in prot), key=natural_key)
                for g in GROUPS}
    layers = by_group["content"] + by_group["quality"]
    raw = {g: with_grouped_options(_table(metric.get(g, {}), by_group[g], allowed[g], metric_cap, f"{g} {what}"),
                                   metric.get(g, {}), allowed[g], group_sizes, metric_cap) for g in GROUPS}
    norm = normalized_tables(metric, by_group, allowed, metric_cap, group_sizes)
    wg = group_weights(K, {g: len(by_group[g]) for g in GROUPS})
    value = {l: {b: wg[g] * v for b, v in norm[g][l].items()} for g in GROUPS for l in by_group[g]}
    weight = {l: {b: int(cost(l, b)) for b in norm[g][l]} for g in GROUPS for l in by_group[g]}
    fixed = sum(int(cost(l, PROTECTED_BITS)) for l in groups if l in prot)
    budget = float(budget_bytes)
    hi = math.floor(budget + 1e-6) - fixed  # a byte count given in MiB comes back a hair below itself
    lo = math.ceil((1.0 - tolerance_frac) * budget) - fixed
    reach_lo = fixed + sum(min(r.values()) for r in weight.values())
    reach_hi = fixed + sum(max(r.values()) for r in weight.values())
    if budget < reach_lo or (1.0 - tolerance_frac) * budget > reach_hi:
        raise InfeasibleBudgetError(
            f"byte budget {budget / MIB:.4f} MiB ({what}; window [{(1 - tolerance_frac) * budget / MIB:.4f}, "
            f"{budget / MIB:.4f}] MiB) is outside the reachable packed size "
            f"[{reach_lo / MIB:.4f}, {reach_hi / MIB:.4f}] MiB "
            f"for content bits {list(allowed['content'])}, quality bits {list(allowed['quality'])} "
            f"({fixed / MIB:.4f} MiB of protected 16-bit layers); choose a budget in that range (stage.budget_mib)")
    if not layers:
        return Solution(bits={l: PROTECTED_BITS for l in groups}, status="OPTIMAL", objective=0.0,
                        mean_bits={}, solve_time_s=0.0, solver=solver, bytes=fixed)
    prog = _Program(layers=layers, choices={l: tuple(weight[l]) for l in layers}, weight=weight,
                    lo=max(lo, 0), hi=hi, value=value, int_value=_int_values(value, objective_scale))
    plan, status, dt, det = _solve(prog, solver, time_limit_s)
    if plan is None:
        raise InfeasibleBudgetError(
            f"no combination of bit-widths lands in [{(1 - tolerance_frac) * budget / MIB:.4f}, {budget / MIB:.4f}] "
            f"MiB ({what}; reachable [{reach_lo / MIB:.4f}, {reach_hi / MIB:.4f}] MiB, but layer sizes are too "
            f"coarse for the window); widen the tolerance or move the budget")
    _verify(prog, plan, "byte budget")
    plan_bits, plan_groups = option_bits(plan)
    psz = {l: int(sizes[l]) for l in layers}
    mean = {g: _mean({l: plan_bits[l] for l in by_group[g]}, psz) for g in GROUPS if by_group[g]}
    mean["overall"] = _mean(plan_bits, psz)
    full = {**plan_bits, **{l: PROTECTED_BITS for l in groups if l in prot}}
    return Solution(bits=full, status=status, objective=sum(value[l][plan[l]] for l in layers), mean_bits=mean,
                    solve_time_s=dt, solver=solver, deterministic_time=det,
                    bytes=fixed + sum(weight[l][plan[l]] for l in layers),
                    objective_by_group={g: sum(raw[g][l][plan[l]] for l in by_group[g]) for g in GROUPS},
                    group_size=plan_groups)


# ---------------------------------------------------------------------------- both groups, mean bits

def plan_objective(plan: Mapping[str, int], metric: Mapping[str, Mapping[str, Mapping[int, float]]],
                   groups: Mapping[str, str], bits: Mapping[str, Sequence[int]], K: float = 1.0,
                   protected: Iterable[str] = (), metric_cap: float = 100.0,
                   group_size: Mapping[str, int] | None = None) -> float:
    """The byte program's objective (normalised metric, K/N_c and 1/N_q weights) of any plan.

    With K = 1 and one reference table (the seed-0 mean) this is the score that makes candidates
    of different K, targets and seeds comparable on one Pareto axis. ``group_size``: the plan's
    grouped layers, scored by their ``"4g64"`` entries.
    """
    prot, gs = set(protected), dict(group_size or {})
    by_group = {g: sorted((l for l, gg in groups.items() if gg == g and l not in prot), key=natural_key)
                for g in GROUPS}
    norm = normalized_tables(metric, by_group, bits, metric_cap, sorted(set(gs.values())))

    def key(l: str) -> int | str:
        return f"{int(plan[l])}g{gs[l]}" if l in gs else int(plan[l])

    wg = group_weights(K, {g: len(v) for g, v in by_group.items()})
    return sum(wg[g] * norm[g][l][key(l)] for g in GROUPS for l in by_group[g])


def solve_mean_bits(metric: Mapping[str, Mapping[str, Mapping[int, float]]], sizes: Mapping[str, int],
                    groups: Mapping[str, str], bits: Mapping[str, Sequence[int]], target: float, K: float = 1.0, *,
                    tolerance: float = 0.1, protected: Iterable[str] = (), solver: str = "cp-sat",
                    time_limit_s: float = 10.0, metric_cap: float = 100.0, objective_scale: float = 1e6,
                    kind: str = "weight") -> Solution:
    """Both groups of one kind: :func:`split_target` then :func:`solve_group` per group.

    ``sizes`` are parameter counts (weights) or input elements (activations); protected layers
    are excluded from both the split and the budgets. The returned ``objective`` is
    :func:`plan_objective` with this K (normalised, comparable to :func:`solve_bytes`);
    ``objective_by_group`` holds each group's raw metric sum, which is what each program maximized.
    ``status`` is FEASIBLE if either group stopped at its time limit, else OPTIMAL.
    """
    prot = set(protected)
    unknown = sorted({g for g in groups.values() if g not in GROUPS})
    if unknown:
        raise AllocationError(f"unknown group(s) {unknown}; layers must be 'content' or 'quality'")
    missing = [l for l in groups if l not in sizes]
    if missing:
        raise AllocationError(f"{len(missing)} layer(s) have no size, e.g. {missing[:5]}; rerun the census")
    members = {g: [l for l, gg in groups.items() if gg == g] for g in GROUPS}
    gsize = {g: sum(int(sizes[l]) for l in members[g] if l not in prot) for g in GROUPS}
    tc, tq = split_target(target, K, gsize["content"], gsize["quality"], bits["content"], bits["quality"])
    targets = {"content": tc, "quality": tq}
    plan: dict[str, int] = {}
    sols: dict[str, Solution] = {}
    for g in GROUPS:
        if not members[g]:
            continue
        if gsize[g] == 0:
            plan.update({l: PROTECTED_BITS for l in members[g]})
            continue
        sols[g] = solve_group(metric.get(g, {}), {l: sizes[l] for l in members[g]}, bits[g], targets[g],
                              tolerance=tolerance, protected=prot, solver=solver, time_limit_s=time_limit_s,
                              metric_cap=metric_cap, objective_scale=objective_scale, what=f"{g} {kind}s")
        plan.update(sols[g].bits)
    solved = {l: b for l, b in plan.items() if l not in prot}
    mean = {g: s.mean_bits["overall"] for g, s in sols.items()}
    mean["overall"] = _mean(solved, {l: int(sizes[l]) for l in solved})
    dets = [s.deterministic_time for s in sols.values()]
    return Solution(
        bits=plan, status="OPTIMAL" if all(s.status == "OPTIMAL" for s in sols.values()) else "FEASIBLE",
        objective=plan_objective(plan, metric, groups, bits, K, prot, metric_cap), mean_bits=mean,
        solve_time_s=sum(s.solve_time_s for s in sols.values()), solver=_check_solver(solver),
        deterministic_time=None if None in dets else sum(dets),
        objective_by_group={g: s.objective for g, s in sols.items()},
        targets={g: t for g, t in targets.items() if g in sols},
        status_by_group={g: s.status for g, s in sols.items()})
