"""Session 27 (issue 17): the content metric in dB, and ablation rows restricted to a subset of the widths."""

from __future__ import annotations

import math

import pytest

from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget, CensusLayer
from mixprec.search import ssim_db
from mixprec.stages.evaluate import Variant


def test_ssim_db_is_monotone_and_does_not_saturate():
    out = ssim_db({"l": {2: [0.99999, 0.9], 4: [1.0, 0.9999999]}}, cap=100.0)["l"]
    assert out[2][0] == pytest.approx(50.0) and out[2][1] == pytest.approx(10.0)
    assert out[4][0] == 100.0 and out[4][1] == pytest.approx(70.0)
    assert ssim_db({"l": {2: [-1.0]}}, cap=100.0)["l"][2][0] == pytest.approx(-10 * math.log10(2.0))


def _census():
    # two content layers (same size), one quality layer
    return [CensusLayer(name=n, type="Linear", group=g, params=1024, act_elems=32, out_channels=32, block=n,
                        excluded=False, protected=False) for n, g in (("c0", "content"), ("c1", "content"), ("q0", "quality"))]


def test_ssim_db_changes_which_content_layer_a_program_protects():
    # c0 loses 0.00009 at 2 bits (1 - SSIM: 1e-4 against 1e-5 at 4 bits), c1 loses 0.09 (0.2 against 0.11):
    # raw SSIM differences favour keeping c1 at 4; in dB c0's 2-bit error is 10x its 4-bit one (10 dB), c1's
    # only 0.46 dB, so the dB program keeps c0 at 4 instead
    per_prompt = {"content": {"c0": {2: [0.9999], 4: [0.99999], 8: [1.0]}, "c1": {2: [0.8], 4: [0.89], 8: [1.0]}},
                  "quality": {"q0": {4: [30.0], 8: [60.0]}}}
    bits = {"content": [2, 4, 8], "quality": [4, 8]}
    plans = {}
    for metric in ("ssim", "ssim_db"):
        # content at a mean of 3 bits (one layer at 2, one at 4), quality at 4
        request = AllocationRequest(kind="weight", budget=Budget(10 / 3), K=0.75, bits=bits, solver="highs",
                                    program="split", tolerance=0.05, content_metric=metric)
        plan, _ = allocate(request, _census(), per_prompt)
        plans[metric] = plan
    assert plans["ssim"].bits["c1"] > plans["ssim"].bits["c0"]
    assert plans["ssim_db"].bits["c0"] > plans["ssim_db"].bits["c1"]
    assert plans["ssim_db"].header["content_metric"] == "ssim_db" and "content_metric" not in plans["ssim"].header
    with pytest.raises(ValueError, match="content_metric"):
        AllocationRequest(kind="weight", budget=Budget(4.0), bits=bits, content_metric="psnr")


def test_an_evaluate_row_can_be_restricted_to_a_subset_of_the_recipe_widths():
    recipe = {"content": [2, 3, 4, 8], "quality": [3, 4, 8]}
    row = Variant.of({"name": "default widths", "program": "both", "bits": {"content": [8, 2, 4], "quality": [4, 8]}})
    assert row.widths("weight", recipe) == {"content": [2, 4, 8], "quality": [4, 8]}
    assert row.widths("act", {"content": [4, 8], "quality": [4, 8]}) == {"content": [4, 8], "quality": [4, 8]}
    assert Variant.of({"name": "all"}).widths("weight", recipe) == recipe
    with pytest.raises(ValueError, match="not widths of the recipe"):
        Variant.of({"name": "x", "bits": {"content": [5], "quality": [4]}}).widths("weight", recipe)
    with pytest.raises(ValueError, match="bits maps each of"):
        Variant.of({"name": "x", "bits": {"content": [4]}})
    with pytest.raises(ValueError, match="content_metric"):
        Variant.of({"name": "x", "metric": "sqnr_only", "content_metric": "ssim_db"})
    assert Variant.of({"name": "db", "content_metric": "ssim_db"}).content_metric == "ssim_db"


def test_noise_power_buys_bits_for_the_layer_that_dominates_the_noise():
    from mixprec.search import noise_power

    out = noise_power({"l": {4: [10.0, 200.0]}}, cap=100.0)["l"][4]
    assert out[0] == pytest.approx(-0.1) and out[1] == pytest.approx(-1e-10)
    # room for one quality layer at 8 bits: in dB q1 gains more (60 -> 95 dB against 10 -> 40), in noise
    # power q0 does (its 4-bit noise is 10^5 times q1's)
    census = [CensusLayer(name=n, type="Linear", group=g, params=1024, act_elems=32, out_channels=32, block=n,
                          excluded=False, protected=False) for n, g in (("c0", "content"), ("q0", "quality"),
                                                                       ("q1", "quality"))]
    per_prompt = {"content": {"c0": {4: [1.0], 8: [1.0]}},
                  "quality": {"q0": {4: [10.0], 8: [40.0]}, "q1": {4: [60.0], 8: [95.0]}}}
    chosen = {}
    for metric in ("sqnr_db", "noise_power"):
        request = AllocationRequest(kind="weight", budget=Budget(16 / 3), bits={"content": [4, 8], "quality": [4, 8]},
                                    solver="highs", program="joint", quality_metric=metric)
        plan, _ = allocate(request, census, per_prompt)
        chosen[metric] = sorted(l for l in ("q0", "q1") if plan.bits[l] == 8)
    assert chosen == {"sqnr_db": ["q1"], "noise_power": ["q0"]}
    with pytest.raises(ValueError, match="quality_metric"):
        Variant.of({"name": "x", "quality_metric": "db"})
