"""Activation freedom at a 4-bit mean (quant=act_wide): with widths {4, 8} the only activation plan at
the bytes of uniform A4 is uniform A4; with 3-bit activations a plan trades bits between layers."""

from __future__ import annotations

from collections import Counter

import pytest

from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget
from mixprec.runner import run_stage
from mixprec.search import LayerSizes, uniform_plan
from mixprec.search.synthetic import sdxl_census, synthetic_per_prompt

WIDE = [3, 4, 5, 6, 8]


@pytest.fixture(scope="module")
def sdxl():
    rows = sdxl_census()[:120]  # census rows with what allocation reads; a slice keeps the programs small
    return rows, [rows[0].name]


@pytest.mark.parametrize("program", ["split", "joint"])
def test_a4_budget_has_freedom_only_with_3_bit_activations(sdxl, program):
    census, protected = sdxl
    sizes, names = LayerSizes.of(census), [c.name for c in census]
    budget = sizes.plan_bytes("act", uniform_plan(names, 4, protected))
    plans = {}
    for widths in ([4, 8], WIDE):
        bits = {"content": widths, "quality": widths}
        per_prompt = synthetic_per_prompt(census, "act", bits, n_prompts=2, seed=1)
        request = AllocationRequest(kind="act", budget=Budget(4.0), K=1.0, bits=bits, solver="highs",
                                    tolerance=0.04, program=program)
        plan, _ = allocate(request, census, per_prompt, protected)
        assert 0.99 * budget <= sizes.plan_bytes("act", plan.bits) <= budget
        plans[tuple(widths)] = Counter(b for n, b in plan.bits.items() if n not in protected)
    assert set(plans[(4, 8)]) == {4}  # no freedom: every layer at 4
    wide = plans[tuple(WIDE)]
    assert wide[3] > 0 and sum(wide[b] for b in (5, 6, 8)) > 0  # insensitive layers at 3 pay for others above 4


def test_evaluate_w8a4_mixes_activation_widths_with_act_wide(make_cfg, tmp_path):
    base = ["model=tiny_random", "quant=act_wide", "prompts.calibration.n=2", "prompts.sensitivity.n=2",
            "prompts.selection.n=2"]
    run_stage(make_cfg(*base, "stage=calibrate"))
    run_stage(make_cfg(*base, "stage=sensitivity", "stage.kinds=[a]", "stage.progress=false"))
    head = run_stage(make_cfg(*base, "stage=evaluate", "prompts.evaluation.n=2", "stage.seed_offsets=[0]",
                              "stage.K=[1]", "stage.solver=highs", "stage.progress=false",
                              "stage.methods=[uniform,decoupled]",
                              "stage.variants=[{name: both, program: both, guard: true}]",
                              "stage.points=[{name: W8A4, weight: 8, act_target: 4}]"))
    rows = {r["method"]: r for r in head["rows"]}
    assert set(rows) == {"uniform", "decoupled", "both"}
    budget = rows["uniform"]["act_bytes"]
    for r in rows.values():
        assert r["equal_bytes"] and 0.99 * budget <= r["act_bytes"] <= budget and r["weight_mean_bits"] == 8.0
    assert set(rows["uniform"]["widths"]) == {"4", "16"}  # protected layers at 16
    widths = rows["decoupled"]["widths"]  # a mixed plan at the same bytes: some layers at 3, others above 4
    assert widths.get("3", 0) > 0 and sum(widths.get(b, 0) for b in ("5", "6", "8")) > 0
    # only the points' kind was measured (stage.kinds=[a]): a weight point says what to rerun
    with pytest.raises(ValueError, match=r"has no weight sensitivities; rerun stage=sensitivity"):
        run_stage(make_cfg(*base, "stage=evaluate", "stage.points=[{name: W4A8, weight_target: 4, act: 8}]"))
    with pytest.raises(ValueError, match=r"stage.methods takes a non-empty list"):
        run_stage(make_cfg(*base, "stage=evaluate", "stage.methods=[]",
                           "stage.points=[{name: W8A4, weight: 8, act_target: 4}]"))
