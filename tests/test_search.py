"""The allocation library against brute force, its budgets, K, bootstrap, errors and plan files."""

from __future__ import annotations

import itertools
import math
import sys
import time

import numpy as np
import pytest

from mixprec.search import (
    MIB,
    PROTECTED_BITS,
    InfeasibleBudgetError,
    Plan,
    SensitivityError,
    bootstrap_metric,
    layer_bytes,
    pareto_front,
    plan_bytes,
    plan_objective,
    plot_pareto,
    read_plan,
    solve_bytes,
    solve_group,
    solve_mean_bits,
    split_target,
    write_pareto_csv,
    write_plan,
)
from mixprec.search import synthetic

SOLVERS = ["cp-sat", "highs", "scip"]


# ----------------------------------------------------------------------------- brute force

def _combos(n_layers: int, n_choices: list[int]) -> np.ndarray:
    """Every assignment as an (n_combos, n_layers) array of choice indices."""
    return np.array(list(itertools.product(*[range(c) for c in n_choices])), dtype=np.int64).reshape(-1, n_layers)


def brute_group(metric, sizes, bits, target, tol, eps=1e-9):
    layers = list(sizes)
    bits = sorted(bits)
    idx = _combos(len(layers), [len(bits)] * len(layers))
    b = np.array(bits)[idx]
    s = np.array([sizes[l] for l in layers], dtype=np.float64)
    mean = (b * s).sum(1) / s.sum()
    ok = (mean <= target + eps) & (mean >= target - tol - eps)
    if not ok.any():
        return None
    val = np.array([[metric[l][bb] for bb in bits] for l in layers])
    obj = val[np.arange(len(layers)), idx].sum(1)
    return float(obj[ok].max())


def random_group(rng, n, bits, grid=True):
    sizes = {f"l{i}": int(rng.choice([rng.integers(1, 50), rng.integers(100, 5000)])) for i in range(n)}
    metric = {}
    for l in sizes:
        base = rng.uniform(0.5, 1.0)
        # multiples of 1e-3: CP-SAT's integer objective (x 1e6) is then exact and must match exactly
        vals = sorted(rng.uniform(0, 1, len(bits)))
        metric[l] = {b: (round(base * v, 3) if grid else float(base * v)) for b, v in zip(sorted(bits), vals)}
        if rng.random() < 0.2:  # non-monotone layers exist in real tables too
            b0, b1 = rng.choice(sorted(bits), 2, replace=False)
            metric[l][b0], metric[l][b1] = metric[l][b1], metric[l][b0]
    return metric, sizes


@pytest.mark.parametrize("solver", SOLVERS + ["cbc"])
def test_group_optimum_equals_brute_force(solver):
    rng = np.random.default_rng(1)
    checked = infeasible = 0
    for trial in range(40):
        n = int(rng.integers(1, 9)) if trial < 36 else 12
        bits = [(2, 4, 8), (4, 8)][trial % 2] if n < 12 else (4, 8)
        metric, sizes = random_group(rng, n, bits, grid=trial % 3 != 0)
        target = float(rng.uniform(min(bits), max(bits)))
        tol = float(rng.choice([0.05, 0.25, 1.0]))
        best = brute_group(metric, sizes, bits, target, tol)
        if best is None:
            with pytest.raises(InfeasibleBudgetError, match="widen stage.tolerance"):
                solve_group(metric, sizes, bits, target, tolerance=tol, solver=solver)
            infeasible += 1
            continue
        sol = solve_group(metric, sizes, bits, target, tolerance=tol, solver=solver)
        assert sol.status == "OPTIMAL"
        # rounding the objective to 1e-6 can only pick a plan within n * 0.5e-6 of the best
        assert sol.objective == pytest.approx(best, abs=n * 1e-6 if trial % 3 == 0 else 1e-9)
        m = sol.mean_bits["overall"]
        assert target - tol - 1e-9 <= m <= target + 1e-9
        assert set(sol.bits) == set(sizes) and all(sol.bits[l] in bits for l in sizes)
        checked += 1
    assert checked >= 25 and infeasible >= 1


def brute_bytes(metric, groups, params, oc, budget_mib, K, bits, tol_frac=0.01):
    layers = list(groups)
    choices = [sorted(bits[groups[l]]) for l in layers]
    idx = _combos(len(layers), [len(c) for c in choices])
    by = np.array([[layer_bytes(params[l], b, oc[l]) for b in c] + [0] * (3 - len(c)) for l, c in zip(layers, choices)])
    tot = by[np.arange(len(layers)), idx].sum(1)
    B = budget_mib * MIB
    ok = (tot <= B) & (tot >= (1 - tol_frac) * B)
    if not ok.any():
        return None
    # the documented objective, written out independently: per group min-max over its table,
    # K / N_content and 1 / N_quality per layer
    val = np.zeros_like(by, dtype=np.float64)
    for g, w in (("content", K), ("quality", 1.0)):
        ls = [l for l in layers if groups[l] == g]
        if not ls:
            continue
        allv = [metric[g][l][b] for l in ls for b in bits[g]]
        mn, mx = min(allv), max(allv)
        for i, l in enumerate(layers):
            if groups[l] == g:
                for j, b in enumerate(sorted(bits[g])):
                    val[i, j] = w / len(ls) * ((metric[g][l][b] - mn) / (mx - mn) if mx > mn else 0.0)
    obj = val[np.arange(len(layers)), idx].sum(1)
    return float(obj[ok].max())


@pytest.mark.parametrize("solver", SOLVERS)
def test_bytes_optimum_equals_brute_force(solver):
    rng = np.random.default_rng(2)
    bits = {"content": (2, 4, 8), "quality": (4, 8)}
    checked = infeasible = 0
    for trial in range(24):
        n = int(rng.integers(2, 9)) if trial < 21 else 12
        groups = {f"l{i}": ("content" if rng.random() < 0.5 else "quality") for i in range(n)}
        params = {l: int(rng.integers(2_000, 400_000)) for l in groups}
        oc = {l: int(rng.integers(8, 512)) for l in groups}
        metric = {"content": {}, "quality": {}}
        for l, g in groups.items():
            vals = np.sort(rng.uniform(0.7, 1.0, 3)) if g == "content" else np.sort(rng.uniform(5, 60, 2))
            metric[g][l] = {b: float(v) for b, v in zip(bits[g], vals)}
        lo = sum(min(layer_bytes(params[l], b, oc[l]) for b in bits[g]) for l, g in groups.items())
        hi = sum(max(layer_bytes(params[l], b, oc[l]) for b in bits[g]) for l, g in groups.items())
        budget = float(rng.uniform(lo, hi)) / MIB
        if trial % 3:  # the 1 % window is narrow: aim most budgets at a random plan's size so they are feasible
            some = sum(layer_bytes(params[l], int(rng.choice(bits[g])), oc[l]) for l, g in groups.items())
            budget = some * float(rng.uniform(1.0, 1.009)) / MIB
        K = float(rng.choice([1.0, 2.0, 5.0]))
        best = brute_bytes(metric, groups, params, oc, budget, K, bits)
        if best is None:
            with pytest.raises(InfeasibleBudgetError):
                solve_bytes(metric, groups, params, oc, budget, K=K, bits=bits, solver=solver)
            infeasible += 1
            continue
        sol = solve_bytes(metric, groups, params, oc, budget, K=K, bits=bits, solver=solver)
        assert sol.status == "OPTIMAL"
        assert sol.objective == pytest.approx(best, abs=n * 1e-8)
        assert sol.bytes == plan_bytes(sol.bits, params, oc)
        assert 0.99 * budget * MIB <= sol.bytes <= budget * MIB
        checked += 1
    assert checked >= 15 and infeasible >= 1


def test_protected_layers_are_fp16_and_outside_the_budget():
    metric = {"a": {4: 1.0, 8: 2.0}, "b": {4: 1.0, 8: 3.0}}
    sizes = {"a": 10, "b": 10, "p": 1000}
    sol = solve_group(metric, sizes, (4, 8), 6.0, tolerance=0.0, protected=["p"])
    assert sol.bits["p"] == PROTECTED_BITS == 16
    assert sol.mean_bits["overall"] == 6.0  # p's 1000 elements would drag any mean far away
    assert sol.bits == {"a": 4, "b": 8, "p": 16}


# ----------------------------------------------------------------------------- K and the split

def test_split_keeps_the_overall_mean_and_k_only_adds_content_bits():
    rng = np.random.default_rng(3)
    for _ in range(400):
        sc, sq = (int(x) for x in rng.integers(1, 10**9, 2))
        cb = [(2, 4, 8), (4, 8), (2, 8)][int(rng.integers(3))]
        qb = [(4, 8), (2, 4, 8)][int(rng.integers(2))]
        lo = (sc * min(cb) + sq * min(qb)) / (sc + sq)
        hi = (sc * max(cb) + sq * max(qb)) / (sc + sq)
        target = float(rng.uniform(lo, hi))
        prev = -math.inf
        for K in sorted(rng.uniform(0.2, 8.0, 6)) + [1.0]:
            tc, tq = split_target(target, K, sc, sq, cb, qb)
            assert (sc * tc + sq * tq) / (sc + sq) == pytest.approx(target, rel=1e-9)
            assert min(cb) - 1e-9 <= tc <= max(cb) + 1e-9 and min(qb) - 1e-9 <= tq <= max(qb) + 1e-9
            if K != 1.0:
                assert tc >= prev - 1e-9
                prev = tc
        tc, tq = split_target(target, 1.0, sc, sq, cb, qb)
        if min(cb) <= target <= max(cb) and min(qb) <= target <= max(qb):
            assert tc == pytest.approx(target) and tq == pytest.approx(target)
    # K = 2 without clipping: content gets exactly twice the quality mean
    tc, tq = split_target(4.0, 2.0, 100, 100, (2, 4, 8), (2, 4, 8))
    assert tc == pytest.approx(2 * tq) and (tc + tq) / 2 == pytest.approx(4.0)
    # clipped share moves to the other group: content capped at 8, quality takes the rest
    tc, tq = split_target(7.0, 4.0, 100, 100, (2, 4, 8), (4, 8))
    assert tc == 8 and tq == pytest.approx(6.0)


def test_raising_k_never_lowers_content_mean_bits():
    rng = np.random.default_rng(4)
    bits = {"content": (2, 4, 8), "quality": (4, 8)}
    for trial in range(8):
        n = 12
        groups = {f"l{i}": ("content" if i % 2 == 0 else "quality") for i in range(n)}
        sizes = {l: int(rng.integers(10, 100)) for l in groups}
        metric = {"content": {}, "quality": {}}
        for l, g in groups.items():
            vals = np.sort(rng.uniform(0.5, 1.0, 3)) if g == "content" else np.sort(rng.uniform(10, 50, 2))
            metric[g][l] = {b: float(v) for b, v in zip(bits[g], vals)}
        for target in (4.0, 5.0, 6.0):
            means = [solve_mean_bits(metric, sizes, groups, bits, target, K, tolerance=0.5).mean_bits["content"]
                     for K in (1.0, 1.5, 2.0, 3.0, 5.0)]
            assert all(b >= a - 1e-12 for a, b in zip(means, means[1:])), (trial, target, means)


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_seed0_is_mean_and_seeds_differ_consistently():
    rng = np.random.default_rng(5)
    per_prompt = {f"l{i}": {b: list(rng.normal(b, 1.0, 8)) for b in (4, 8)} for i in range(5)}
    # a layer that is another plus a constant: any common resample keeps the constant difference
    per_prompt["shifted"] = {b: [v + 3.0 for v in per_prompt["l0"][b]] for b in (4, 8)}
    m0 = bootstrap_metric(per_prompt, 0)
    for l, row in per_prompt.items():
        for b, vals in row.items():
            assert m0[l][b] == pytest.approx(float(np.mean(vals)))
    tables = [bootstrap_metric(per_prompt, s) for s in range(1, 6)]
    for s, t in enumerate(tables, start=1):
        assert t == bootstrap_metric(per_prompt, s)  # reproducible
        assert t != m0
        for b in (4, 8):
            assert t["shifted"][b] - t["l0"][b] == pytest.approx(3.0)
    assert len({repr(t) for t in tables}) == 5
    capped = bootstrap_metric({"x": {8: [math.inf, 40.0]}}, 0, cap=100.0)
    assert capped["x"][8] == 70.0
    with pytest.raises(SensitivityError, match="prompt counts"):
        bootstrap_metric({"a": {4: [1.0, 2.0]}, "b": {4: [1.0]}}, 0)


def test_bootstrap_seeds_give_distinct_plans_on_sdxl_sizes():
    census = synthetic.sdxl_census()
    pp = synthetic.synthetic_per_prompt(census, "weight", {"content": [2, 4, 8], "quality": [4, 8]}, 8, 0)
    sizes = {r.name: r.params for r in census if r.group == "content"}
    plans = [solve_group(bootstrap_metric(pp["content"], s, cap=100.0), sizes, (2, 4, 8), 4.0).bits
             for s in range(3)]
    assert plans[0] != plans[1] and plans[1] != plans[2] and plans[0] != plans[2]


# ----------------------------------------------------------------------------- errors

def test_infeasible_and_missing_inputs_fail_before_solving_with_the_reachable_range():
    metric = {"a": {2: 0.5, 4: 0.7, 8: 0.9}, "b": {2: 0.5, 4: 0.8, 8: 0.95}}
    sizes = {"a": 10, "b": 30}
    with pytest.raises(InfeasibleBudgetError, match=r"reachable range \[2, 8\]"):
        solve_group(metric, sizes, (2, 4, 8), 1.5)
    with pytest.raises(InfeasibleBudgetError, match=r"reachable range \[2, 8\]"):
        solve_group(metric, sizes, (2, 4, 8), 9.0)
    with pytest.raises(ValueError):  # every allocation error is a ValueError
        solve_group(metric, sizes, (2, 4, 8), 9.0)
    with pytest.raises(SensitivityError, match="'c'|c"):
        solve_group(metric, {**sizes, "c": 5}, (2, 4, 8), 4.0)
    with pytest.raises(SensitivityError, match="3-bit"):
        solve_group(metric, sizes, (3, 4, 8), 4.0)
    with pytest.raises(InfeasibleBudgetError, match=r"reachable range \[3.0000, 8.0000\]"):
        split_target(2.5, 1.0, 100, 100, (2, 4, 8), (4, 8))
    groups = {"a": "content", "b": "quality"}
    with pytest.raises(InfeasibleBudgetError, match=r"reachable packed size \[.*\] MiB"):
        solve_bytes({"content": {"a": metric["a"]}, "quality": {"b": {4: 1.0, 8: 2.0}}}, groups,
                    {"a": 1000, "b": 1000}, {"a": 4, "b": 4}, 100.0)


# ----------------------------------------------------------------------------- plan files

@pytest.mark.parametrize("solver", SOLVERS)
def test_same_inputs_give_identical_plan_files(tmp_path, solver):
    census = synthetic.sdxl_census()[:120]
    bits = {"content": (2, 4, 8), "quality": (4, 8)}
    pp = synthetic.synthetic_per_prompt(census, "weight", {g: list(b) for g, b in bits.items()}, 4, 1)
    metric = {g: bootstrap_metric(t, 2, cap=100.0) for g, t in pp.items()}
    sizes = {r.name: r.params for r in census}
    groups = {r.name: r.group for r in census}
    blobs = []
    for rep in range(2):
        order = list(groups)[::-1] if rep else list(groups)  # input order must not matter
        sol = solve_mean_bits(metric, {l: sizes[l] for l in order}, {l: groups[l] for l in order}, bits, 4.5, 2.0,
                              solver=solver)
        header = {"kind": "weight", "target": 4.5, "K": 2.0, "seed": 2, "objective": sol.objective,
                  "achieved_mean_bits": sol.mean_bits, "solver": sol.solver, "status": sol.status,
                  "deterministic_time": sol.deterministic_time}
        p = write_plan(tmp_path / f"r{rep}" / "seed2.yaml", Plan(header, sol.bits))
        blobs.append(p.read_bytes())
        back = read_plan(p)
        assert back.bits == sol.bits and back.header["K"] == 2.0
    assert blobs[0] == blobs[1]
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- SDXL-sized instance

def _sdxl_tables():
    census = synthetic.sdxl_census()
    bits = {"content": [2, 4, 8], "quality": [4, 8]}
    pp = synthetic.synthetic_per_prompt(census, "weight", bits, 8, 0)
    metric = {g: bootstrap_metric(t, 0, cap=100.0) for g, t in pp.items()}
    return census, bits, metric


def test_sdxl_sized_instance_solves_fast():
    census, bits, metric = _sdxl_tables()
    assert len(census) == 794 and sum(r.type == "Linear" for r in census) == 743
    assert sum(r.group == "content" for r in census) == 420
    assert sum(r.params for r in census) == 2_566_875_524  # the UNet's 2,567,463,684 minus norms/embeddings
    sizes = {r.name: r.params for r in census}
    groups = {r.name: r.group for r in census}
    s = {g: sum(sizes[l] for l in sizes if groups[l] == g) for g in bits}
    worst = 0.0
    for solver, cases in (("cp-sat", [(3.0, 2.0), (4.0, 1.0), (5.0, 3.0), (6.0, 1.5)]), ("scip", [(4.5, 2.0)]),
                          ("highs", [(4.0, 2.0)])):
        for target, K in cases:
            tc, tq = split_target(target, K, s["content"], s["quality"], bits["content"], bits["quality"])
            for g, t in (("content", tc), ("quality", tq)):
                t0 = time.perf_counter()
                sol = solve_group(metric[g], {l: sizes[l] for l in sizes if groups[l] == g}, bits[g], t,
                                  solver=solver)
                dt = time.perf_counter() - t0
                worst = max(worst, dt)
                print(f"SDXL {solver} target={target} K={K} {g}: {dt:.3f}s {sol.status} mean={sol.mean_bits['overall']:.4f}")
                assert sol.status == "OPTIMAL"
                assert t - 0.1 - 1e-9 <= sol.mean_bits["overall"] <= t + 1e-9
    print(f"SDXL slowest group solve: {worst:.3f}s")
    assert worst < 4.0  # the requirement is < 2 s; headroom for a loaded shared CPU


def test_sdxl_byte_budget_within_one_percent():
    census, bits, metric = _sdxl_tables()
    params = {r.name: r.params for r in census}
    oc = {r.name: r.out_channels for r in census}
    groups = {r.name: r.group for r in census}
    for mib, K in ((1000.0, 1.0), (1400.0, 3.0), (1900.0, 1.0)):
        t0 = time.perf_counter()
        sol = solve_bytes(metric, groups, params, oc, mib, K=K, bits=bits)
        dt = time.perf_counter() - t0
        size = plan_bytes(sol.bits, params, oc)
        print(f"SDXL bytes {mib} MiB K={K}: {size / MIB:.3f} MiB in {dt:.3f}s {sol.status}")
        assert size == sol.bytes and 0.99 * mib * MIB <= size <= mib * MIB
        # the joint objective is the documented one, recomputed from the plan
        assert sol.objective == pytest.approx(plan_objective(sol.bits, metric, groups, bits, K), abs=1e-9)


def test_highs_needs_no_ortools_and_finds_the_cp_sat_optimum(monkeypatch):
    """stage.solver=highs is for machines without the OR-Tools wheel: it must not import it."""
    census, bits, metric = _sdxl_tables()
    params = {r.name: r.params for r in census}
    oc = {r.name: r.out_channels for r in census}
    groups = {r.name: r.group for r in census}
    reference = solve_bytes(metric, groups, params, oc, 1400.0, K=2.0, bits=bits, solver="cp-sat")
    monkeypatch.setitem(sys.modules, "ortools", None)  # any import of ortools now raises ImportError
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    monkeypatch.setitem(sys.modules, "ortools.linear_solver", None)
    sol = solve_bytes(metric, groups, params, oc, 1400.0, K=2.0, bits=bits, solver="highs")
    again = solve_bytes(metric, groups, params, oc, 1400.0, K=2.0, bits=bits, solver="highs")
    assert sol.bits == again.bits  # deterministic
    assert sol.status == "OPTIMAL" and 0.99 * 1400 * MIB <= sol.bytes <= 1400 * MIB
    assert sol.objective == pytest.approx(reference.objective, rel=1e-6)


# ----------------------------------------------------------------------------- Pareto

def test_pareto_front_matches_definition(tmp_path):
    rng = np.random.default_rng(6)
    pts = [{"size": int(rng.integers(0, 15)), "objective": int(rng.integers(0, 15)), "K": float(rng.choice([1, 2])),
            "seed": int(rng.integers(0, 3))} for _ in range(200)]
    pts.append(dict(pts[0]))  # a duplicate
    marked = pareto_front(pts)
    for p in marked:
        dominated = any(q["size"] <= p["size"] and q["objective"] >= p["objective"]
                        and (q["size"] < p["size"] or q["objective"] > p["objective"]) for q in pts)
        assert p["pareto"] == (not dominated)
    tol = pareto_front(pts, size_rtol=0.1)
    for p in tol:
        dominated = any(q["size"] <= p["size"] * 1.1 and q["objective"] >= p["objective"]
                        and (q["size"] < p["size"] or q["objective"] > p["objective"]) for q in pts)
        assert p["pareto"] == (not dominated)
    assert sum(p["pareto"] for p in tol) >= 1
    csv_path = write_pareto_csv(tmp_path / "pareto.csv", marked, ["size", "objective", "K", "seed", "pareto"])
    assert csv_path.read_text().splitlines()[0] == "size,objective,K,seed,pareto"
    png = plot_pareto(tmp_path / "pareto.png", marked)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
