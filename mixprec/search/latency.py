"""Bit allocation under a measured latency budget.

One multiple-choice knapsack over every layer: each layer takes one (weight bits, activation bits)
choice that the latency table measured and the recipe allows (16 = unquantized is always allowed:
on a GPU a 16-bit layer can be the fastest choice), subject to

    rest_ms + sum_l t_l(choice_l)  <=  budget_ms

(the table's prediction of the whole denoiser's latency, :class:`mixprec.kernels.latency_table.LatencyTable`),
maximizing the sensitivity of the chosen bits: per group, the weight and the activation tables
normalised to 0..1 as in :func:`mixprec.search.normalized_tables` (16 bits counts as 1, lossless),
their sum weighted K / N_content and 1 / N_quality. Layer times are rounded *up* to nanoseconds,
so a plan the solver accepts is within the budget in exact arithmetic too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .plan import natural_key
from .program import (GROUPS, PROTECTED_BITS, AllocationError, InfeasibleBudgetError, _check_solver, _int_values,
                      _Program, _solve, _verify, group_weights, normalized_tables)

NS_PER_MS = 1_000_000


def encode_choice(w_bits: int | None, a_bits: int | None) -> int:
    """One integer per (w, a) choice for the program's variables: 100 * w + a, 16 for unquantized."""
    return 100 * (w_bits or PROTECTED_BITS) + (a_bits or PROTECTED_BITS)


def decode_choice(code: int) -> tuple[int, int]:
    return code // 100, code % 100


def _parse_key(key: str) -> tuple[int, int]:
    w, a = key.lower().lstrip("w").split("a", 1)
    return int(w), int(a)


@dataclass(frozen=True)
class LatencySolution:
    weight_bits: dict[str, int]
    act_bits: dict[str, int]
    predicted_ms: float
    objective: float
    status: str
    solver: str
    solve_time_s: float
    deterministic_time: float | None = None
    reachable_ms: tuple[float, float] = (math.nan, math.nan)
    choices: dict[str, int] = field(default_factory=dict)
    weight_bytes: int | None = None  # the plan's weight bytes, when a byte cap was given


def allowed_choices(layer: str, group: str, table_row: Mapping[str, float], weight_bits: Mapping[str, Sequence[int]],
                    act_bits: Mapping[str, Sequence[int]] | None, act_protected: bool) -> list[tuple[int, int]]:
    """The (w, a) pairs of ``table_row`` that the recipe allows for this layer (16 = unquantized)."""
    ws = set(weight_bits[group]) | {PROTECTED_BITS}
    acts = {PROTECTED_BITS} if act_bits is None or act_protected else set(act_bits[group]) | {PROTECTED_BITS}
    out = [_parse_key(k) for k in table_row]
    return sorted((w, a) for w, a in out if w in ws and a in acts)


def _values(layer: str, group: str, pairs: list[tuple[int, int]], nw: Mapping, na: Mapping | None,
            weight: float) -> dict[int, float]:
    def part(table, bits):
        return 1.0 if bits >= PROTECTED_BITS or table is None else table[group][layer][bits]
    return {encode_choice(w, a): weight * (part(nw, w) + part(na, a)) for w, a in pairs}


def _byte_row(choices: Mapping[str, Sequence[int]], layers: Sequence[str],
              layer_bytes: Mapping[str, Mapping[int, int]] | None, max_bytes: int) -> tuple:
    """The program row that caps the plan's weight bytes at ``max_bytes`` (``layer_bytes``: stored
    bytes per layer and weight bits, 16 included)."""
    if layer_bytes is None:
        raise AllocationError("solve_latency: max_bytes needs layer_bytes (stored bytes per layer and weight bits)")
    sizes = {l: {c: int(layer_bytes[l][decode_choice(c)[0]]) for c in choices[l]} for l in layers}
    least = sum(min(r.values()) for r in sizes.values())
    if least > max_bytes:
        raise InfeasibleBudgetError(
            f"weight budget {max_bytes / 2 ** 20:.2f} MiB is below the smallest plan the allowed bit-widths "
            f"give ({least / 2 ** 20:.2f} MiB); raise stage.budget_mib or allow narrower bit-widths")
    return sizes, 0, max_bytes, "weight bytes"


def solve_latency(weight_metric: Mapping[str, Mapping[str, Mapping[int, float]]],
                  act_metric: Mapping[str, Mapping[str, Mapping[int, float]]] | None, groups: Mapping[str, str],
                  layer_ms: Mapping[str, Mapping[str, float]], rest_ms: float, budget_ms: float, *, K: float = 1.0,
                  weight_bits: Mapping[str, Sequence[int]], act_bits: Mapping[str, Sequence[int]] | None = None,
                  act_protected: Iterable[str] = (), solver: str = "cp-sat", time_limit_s: float = 10.0,
                  metric_cap: float = 100.0, objective_scale: float = 1e9, headroom: float = 0.0,
                  layer_bytes: Mapping[str, Mapping[int, int]] | None = None,
                  max_bytes: int | None = None) -> LatencySolution:
    """Choose (weight bits, activation bits) per layer within ``budget_ms`` (see the module doc).

    ``headroom``: the fraction of the budget kept free, the plan's prediction stays within
    ``budget_ms * (1 - headroom)``. Why: the table times each layer alone behind a producer; in the
    whole compiled denoiser plans ran 0.7-2.4% slower than predicted (H200, session 30; more quantized
    layers, more error), so a plan predicted exactly at the budget measured just over it.

    ``weight_metric``/``act_metric``: ``{group: {layer: {bits: value}}}`` (higher is better);
    without ``act_metric`` activations stay 16-bit. ``layer_ms``: ``{layer: {"w8a8": ms, ...}}``
    from the latency table (every layer of ``groups`` needs a row, with ``w16a16``). Layers in
    ``act_protected`` keep 16-bit activations.

    ``max_bytes`` with ``layer_bytes`` (``{layer: {weight bits: stored bytes}}``, 16 included): the
    plan's weights must also fit in ``max_bytes`` (e.g. half the 16-bit size and not slower than 16 bit).
    """
    solver = _check_solver(solver)
    if not (0.0 <= headroom < 1.0):
        raise AllocationError(f"latency headroom must be a fraction in [0, 1), got {headroom!r}")
    target_ms = budget_ms * (1.0 - headroom)
    if not (K > 0 and math.isfinite(K)):
        raise AllocationError(f"K must be a positive finite number, got {K!r}")
    missing = [l for l in groups if l not in layer_ms]
    if missing:
        raise AllocationError(f"{len(missing)} layer(s) have no latency, e.g. {missing[:5]}: the latency table was "
                              f"made for another model or plan scope; rerun stage=latency_table")
    prot = set(act_protected)
    by_group = {g: sorted((l for l, gg in groups.items() if gg == g), key=natural_key) for g in GROUPS}
    layers = by_group["content"] + by_group["quality"]
    nw = normalized_tables(weight_metric, by_group, weight_bits, metric_cap)
    na = None
    if act_metric is not None:
        act_layers = {g: [l for l in ls if l not in prot] for g, ls in by_group.items()}
        na = normalized_tables(act_metric, act_layers, act_bits, metric_cap)
    wg = group_weights(K, {g: len(v) for g, v in by_group.items()})
    choices, value, weight = {}, {}, {}
    for g in GROUPS:
        for l in by_group[g]:
            pairs = allowed_choices(l, g, layer_ms[l], weight_bits, None if na is None else act_bits, l in prot)
            choices[l] = tuple(encode_choice(w, a) for w, a in pairs)
            value[l] = _values(l, g, pairs, nw, na, wg[g])
            weight[l] = {encode_choice(w, a): math.ceil(layer_ms[l][f"w{w}a{a}"] * NS_PER_MS) for w, a in pairs}
    lo_ms = rest_ms + sum(min(r.values()) for r in weight.values()) / NS_PER_MS
    hi_ms = rest_ms + sum(max(r.values()) for r in weight.values()) / NS_PER_MS
    cap = math.floor((target_ms - rest_ms) * NS_PER_MS)
    if target_ms < lo_ms:
        kept = f" minus the {100 * headroom:g}% headroom ({target_ms:.3f} ms)" if headroom else ""
        raise InfeasibleBudgetError(
            f"latency budget {budget_ms:.3f} ms{kept} is below the fastest plan the table allows ({lo_ms:.3f} ms; the "
            f"slowest is {hi_ms:.3f} ms, {rest_ms:.3f} ms of it outside the quantizable layers); raise stage.budget_ms, "
            f"lower stage.latency_headroom or allow more bit-widths")
    extra = () if max_bytes is None else (_byte_row(choices, layers, layer_bytes, int(max_bytes)),)
    prog = _Program(layers=layers, choices=choices, weight=weight, lo=0, hi=cap, value=value,
                    int_value=_int_values(value, objective_scale), extra=extra)
    plan, status, dt, det = _solve(prog, solver, time_limit_s)
    if plan is None:  # without a byte cap this cannot happen above lo_ms, kept as a guard
        both = f" and {max_bytes / 2 ** 20:.2f} MiB of weights" if extra else ""
        raise InfeasibleBudgetError(f"no plan within {target_ms:.3f} ms{both} (latency reachable [{lo_ms:.3f}, "
                                    f"{hi_ms:.3f}] ms): raise stage.budget_ms or stage.budget_mib")
    _verify(prog, plan, "latency budget")
    pairs = {l: decode_choice(c) for l, c in plan.items()}
    predicted = rest_ms + sum(layer_ms[l][f"w{w}a{a}"] for l, (w, a) in pairs.items())
    return LatencySolution(weight_bits={l: w for l, (w, a) in pairs.items()},
                           act_bits={l: a for l, (w, a) in pairs.items()}, predicted_ms=predicted,
                           objective=sum(value[l][plan[l]] for l in layers), status=status, solver=solver,
                           solve_time_s=dt, deterministic_time=det, reachable_ms=(lo_ms, hi_ms), choices=plan,
                           weight_bytes=sum(extra[0][0][l][plan[l]] for l in layers) if extra else None)


def joint_score(weight_bits: Mapping[str, int], act_bits: Mapping[str, int],
                weight_metric: Mapping, act_metric: Mapping | None, groups: Mapping[str, str],
                bits: Mapping[str, Mapping[str, Sequence[int]]], act_protected: Iterable[str] = (), K: float = 1.0,
                metric_cap: float = 100.0) -> float:
    """The latency program's objective of any (weight, act) plan: normalised weight + activation
    metric (16 bits = 1), K / N_content and 1 / N_quality weights; in [0, 2 (K + 1)]."""
    prot = set(act_protected)
    by_group = {g: sorted((l for l, gg in groups.items() if gg == g), key=natural_key) for g in GROUPS}
    nw = normalized_tables(weight_metric, by_group, bits["weight"], metric_cap)
    na = None if act_metric is None else normalized_tables(
        act_metric, {g: [l for l in ls if l not in prot] for g, ls in by_group.items()}, bits["act"], metric_cap)
    wg = group_weights(K, {g: len(v) for g, v in by_group.items()})
    total = 0.0
    for g in GROUPS:
        for l in by_group[g]:
            w, a = weight_bits[l], act_bits.get(l, PROTECTED_BITS)
            total += _values(l, g, [(w, a)], nw, na, wg[g])[encode_choice(w, a)]
    return total


def latency_plans(*, groups: Mapping[str, str], per_prompt: Mapping[str, Mapping], bits: Mapping[str, Mapping],
                  act_protected: Sequence[str], layer_ms: Mapping[str, Mapping[str, float]], rest_ms: float,
                  budget_ms: float, K: float, seed: int, solver: str, time_limit_s: float, metric_cap: float,
                  table_meta: Mapping | None = None, fingerprints: Mapping[str, str] | None = None,
                  headroom: float = 0.0, layer_bytes: Mapping[str, Mapping[int, int]] | None = None,
                  max_bytes: int | None = None):
    """(weight plan, activation plan, solution) for one latency budget; plain arguments, no Hydra.
    ``groups``: layer -> ``content`` | ``quality`` (the census).

    ``per_prompt``: ``{"weight": {group: {layer: {bits: [per prompt]}}}, "act": ...}`` (``act`` may be
    empty: activations then stay 16-bit); ``bits``: ``{"weight": {group: bits}, "act": {group: bits}}``.
    Both plans' headers carry kind ``latency``; ``score`` is :func:`joint_score` with K = 1 on the
    seed-0 tables (one yardstick for every latency candidate).
    """
    from .bootstrap import bootstrap_metric
    from .plan import Plan

    prot = [l for l in act_protected if l in groups]
    kinds = ["weight"] + (["act"] if any(per_prompt.get("act", {}).get(g) for g in GROUPS) else [])

    def tables(s: int) -> dict:
        return {k: {g: bootstrap_metric(per_prompt[k][g], s, cap=metric_cap) for g in GROUPS} for k in kinds}

    metric = tables(seed)
    ref = metric if seed == 0 else tables(0)
    sol = solve_latency(metric["weight"], metric.get("act"), groups, layer_ms, rest_ms, float(budget_ms), K=float(K),
                        weight_bits=bits["weight"], act_bits=bits["act"] if "act" in kinds else None,
                        act_protected=prot, solver=solver, time_limit_s=time_limit_s, metric_cap=metric_cap,
                        headroom=headroom, layer_bytes=layer_bytes, max_bytes=max_bytes)
    score = joint_score(sol.weight_bits, sol.act_bits, ref["weight"], ref.get("act"), groups, bits, prot, 1.0,
                        metric_cap)
    fp = dict(fingerprints or {})
    header = {"kind": "latency", "budget": "latency", "target": float(budget_ms), "budget_ms": float(budget_ms),
              "K": float(K), "seed": int(seed), "headroom": float(headroom), "predicted_ms": sol.predicted_ms, "reachable_ms": list(sol.reachable_ms),
              "objective": sol.objective, "score": score, "solver": sol.solver, "status": sol.status,
              "deterministic_time": sol.deterministic_time, "time_limit_s": float(time_limit_s),
              "layers_by_choice": _count_choices(sol), "act_sensitivities": "act" in kinds,
              "latency_table": dict(table_meta or {}), "model_fingerprint": fp.get("model"),
              "quant_fingerprint": fp.get("quant")}
    if max_bytes is not None:  # the byte cap beside the latency budget, and what the plan's weights take
        header.update(budget_mib=max_bytes / 2 ** 20, mib=sol.weight_bytes / 2 ** 20)
    return Plan(header=dict(header, part="weight", act_plan=None), bits=dict(sol.weight_bits)), \
        Plan(header=dict(header, part="act"), bits=dict(sol.act_bits)), sol


def _count_choices(sol: LatencySolution) -> dict[str, int]:
    out: dict[str, int] = {}
    for l in sol.weight_bits:
        key = f"w{sol.weight_bits[l]}a{sol.act_bits[l]}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
