"""Byte accounting and the refinement's local search (pure Python: no model)."""

from __future__ import annotations

import itertools
import logging

import pytest

from mixprec.artifacts import Budget, CensusLayer
from mixprec.finalize import RefineOptions, budget_bytes, uniform_candidate
from mixprec.search import LayerSizes, byte_window, same_bytes, uniform_plan, weight_layer_bytes
from mixprec.search.refine import SELECTION_SCORES, candidate_moves, no_worse_than, prior_value, refine


# ----------------------------------------------------------------------------- byte accounting

def test_weight_bytes_count_codes_scales_groups_and_full_precision():
    # 128 x 300 Linear at 4 bits: 19200 code bytes + 128 fp16 scales
    assert weight_layer_bytes(128 * 300, 128, 4) == 19200 + 256
    # grouped by 128 columns: ceil(300 / 128) = 3 scales per row
    assert weight_layer_bytes(128 * 300, 128, 4, group_size=128) == 19200 + 128 * 3 * 2
    assert weight_layer_bytes(128 * 300, 128, 4, group_size=64, in_features=300) == 19200 + 128 * 5 * 2
    # 3 bits: nominal packing, rounded up to a whole byte
    assert weight_layer_bytes(7, 1, 3) == 3 + 2
    # protected / unquantized: 2 bytes a weight, no scales
    assert weight_layer_bytes(128 * 300, 128, 16) == weight_layer_bytes(128 * 300, 128, None) == 2 * 128 * 300


def _census():
    rows = [("a.attn2.to_q", "content", 4096, 64, 1000), ("a.ff.net.0", "content", 8192, 128, 2000),
            ("b.conv1", "quality", 36864, 64, 4000), ("b.conv2", "quality", 36864, 64, 4000),
            ("conv_out", "quality", 2304, 4, 500)]
    return [CensusLayer(n, "Linear", g, p, a, o, n.split(".")[0], False, False) for n, g, p, o, a in rows]


def test_target_bytes_are_the_uniform_plans_bytes_and_interpolate_between_widths():
    census = _census()
    sizes, names = LayerSizes.of(census), [c.name for c in census]
    for kind in ("weight", "act"):
        for b in (2, 4, 8):
            assert sizes.target_bytes(kind, b, names) == sizes.plan_bytes(kind, uniform_plan(names, b))
        mid = sizes.target_bytes(kind, 4.5, names)
        assert sizes.plan_bytes(kind, uniform_plan(names, 4)) < mid < sizes.plan_bytes(kind, uniform_plan(names, 5))
    # protected activations stay at 16 bits in both the budget and the uniform plan
    prot = ["conv_out"]
    assert sizes.target_bytes("act", 6, names, prot) == sizes.plan_bytes("act", uniform_plan(names, 6, prot))
    assert budget_bytes("weight", Budget(sizes.plan_bytes("weight", uniform_plan(names, 4)) / (1 << 20), "MiB"),
                        sizes, names) == sizes.plan_bytes("weight", uniform_plan(names, 4))


def test_same_bytes_and_window():
    assert same_bytes(990, 1000) and not same_bytes(989, 1000)
    assert byte_window(1000) == (990, 1000)


def test_guard_candidate_is_the_widest_calibrated_uniform_plan_that_fits():
    census = _census()
    plan = uniform_candidate("weight", Budget(4.0), census, widths=(2, 4, 8))
    assert set(plan.bits.values()) == {4} and plan.header["status"] == "UNIFORM"
    assert plan.header["bytes"] == LayerSizes.of(census).plan_bytes("weight", plan.bits)
    # 7 bits not calibrated: the widest calibrated width below the budget
    act = uniform_candidate("act", Budget(7.0), census, protected=["conv_out"], widths=(4, 8))
    assert act.bits["conv_out"] == 16 and act.bits["b.conv1"] == 4
    assert uniform_candidate("weight", Budget(1.5), census, widths=(2, 4, 8)) is None


# ----------------------------------------------------------------------------- local search

CHOICES = {f"l{i}": (2, 4, 8) for i in range(6)}
SIZE = {f"l{i}": 100 * (i + 1) for i in range(6)}


def _cost(layer, bits):
    return SIZE[layer] * bits


def _interacting_score(calls):
    """Joint damage with an interaction the additive prior cannot see: l0 and l1 hurt a lot only together."""
    def score(bits):
        calls.append(dict(bits))
        loss = sum((8 - b) ** 2 * (i + 1) for i, b in enumerate(bits.values())) / 100.0
        if bits["l0"] <= 2 and bits["l1"] <= 2:
            loss += 50.0
        return (loss,), {"mse": loss}
    return score


def test_refinement_improves_a_joint_score_within_the_byte_window_and_the_evaluation_budget():
    start = {"l0": 2, "l1": 2, "l2": 8, "l3": 4, "l4": 4, "l5": 4}
    total = sum(_cost(l, b) for l, b in start.items())
    window = (int(0.9 * total), total)
    # a prior that (wrongly) says l0/l1 are fine at 2 bits: the additive view of the program
    prior = {l: {2: 0.0, 4: 0.0, 8: 0.0} for l in CHOICES}
    calls = []
    result = refine(start, _interacting_score(calls), CHOICES, _cost, window, evaluations=12, prior=prior, seed=3)
    assert result.evaluations == len(calls) <= 12
    assert result.improved and result.key < result.start_key
    assert not (result.bits["l0"] <= 2 and result.bits["l1"] <= 2)  # it found the interaction
    for plan in calls:
        assert window[0] <= sum(_cost(l, b) for l, b in plan.items()) <= window[1]
        assert all(b in CHOICES[l] for l, b in plan.items())
    # every accepted move strictly improved the score it was compared with
    keys = [result.start_key[0]] + [m["key"][0] for m in result.accepted]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
    again = refine(start, _interacting_score([]), CHOICES, _cost, window, evaluations=12, prior=prior, seed=3)
    assert again.bits == result.bits and again.tried == result.tried  # deterministic for a seed


def test_refinement_never_returns_a_worse_plan_and_stops_when_no_move_fits():
    start = {"l0": 8, "l1": 8, "l2": 8, "l3": 8, "l4": 8, "l5": 8}
    total = sum(_cost(l, b) for l, b in start.items())
    result = refine(start, _interacting_score([]), CHOICES, _cost, (total, total), evaluations=20)
    # at the top widths with a zero-width window nothing can move: only the start is scored
    assert result.bits == start and result.evaluations == 1 and not result.improved


def test_operating_point_sensitivities_rank_moves_and_count_against_the_budget():
    start = {"l0": 4, "l1": 4, "l2": 4, "l3": 4, "l4": 4, "l5": 4}
    total = sum(_cost(l, b) for l, b in start.items())
    calls = []
    result = refine(start, _interacting_score(calls), CHOICES, _cost, (int(0.97 * total), total), evaluations=30,
                    operating_point=True)
    assert 0 < result.operating_point_evaluations <= 14 and result.evaluations == len(calls) <= 30
    # the first calls after the start are one-step changes of a single layer, at the plan
    assert all(sum(c[l] != start[l] for l in start) == 1 for c in calls[1:1 + result.operating_point_evaluations])
    assert result.key <= result.start_key  # no improving move exists here: it keeps the start


def test_moves_are_ranked_by_the_prior_and_stay_in_the_window():
    import random
    start = {"l0": 4, "l1": 4, "l2": 4}
    choices = {l: (2, 4, 8) for l in start}
    prior = {"l0": {2: -1.0, 4: 0.0, 8: 0.5}, "l1": {2: -0.1, 4: 0.0, 8: 0.1}, "l2": {2: -0.05, 4: 0.0, 8: 0.0}}
    total = sum(_cost(l, b) for l, b in start.items())
    moves = candidate_moves(start, choices, _cost, (total - 1000, total), prior, random.Random(0))
    assert all(total - 1000 <= m.bytes_after <= total for m in moves)
    assert [m.predicted for m in moves] == sorted((m.predicted for m in moves), reverse=True)
    assert prior_value(prior, "l0", 6) == pytest.approx(0.25) and prior_value(None, "l0", 6) == 0.0


def test_no_worse_keeps_only_moves_that_leave_every_recorded_score_at_least_as_good():
    # the key (a mean SSIM) improves with every extra bit on l0; each bit on l0 also raises the MSE
    # (an object moved): "key" follows the ranking, "no_worse" refuses those moves
    start = {"l0": 2, "l1": 8, "l2": 4}
    choices = {"l0": (2, 4, 8), "l1": (2, 4, 8), "l2": (2, 4, 8)}
    total = sum(_cost(l, b) for l, b in start.items())

    def score(bits):
        ssim = 0.9 + 0.01 * bits["l0"] / 8 + 0.001 * bits["l2"] / 8
        mse = 0.01 + 0.001 * bits["l0"] - 0.0001 * bits["l2"]
        return (-ssim, mse), {"ssim": ssim, "mse": mse}

    window = (int(0.8 * total), total)
    by_key = refine(start, score, choices, _cost, window, evaluations=20)
    guarded = refine(start, score, choices, _cost, window, evaluations=20, no_worse=SELECTION_SCORES)
    assert by_key.bits["l0"] > 2 and by_key.scores["mse"] > score(start)[1]["mse"]
    assert guarded.bits["l0"] == 2
    for move in guarded.accepted:
        assert move["up"] != "l0"
    assert guarded.scores["mse"] <= score(start)[1]["mse"] and guarded.scores["ssim"] >= score(start)[1]["ssim"]
    assert no_worse_than({"ssim": 0.9, "adherence": 0.5}, {"ssim": 0.8, "adherence": 0.6}, SELECTION_SCORES) is False
    assert no_worse_than({"ssim": 0.9, "mse": 1.0}, {"ssim": 0.8, "mse": 1.0, "adherence": 0.6}, SELECTION_SCORES)


def test_refine_options_are_checked():
    assert RefineOptions.of({"evaluations": 4}) == RefineOptions(4, 0, False, "no_worse")
    assert RefineOptions.of({"evaluations": 4, "accept": "key"}).accept == "key"
    with pytest.raises(ValueError, match="accept must be no_worse"):
        RefineOptions.of({"evaluations": 4, "accept": "ssim"})
    with pytest.raises(ValueError, match="stage.refine has no setting"):
        RefineOptions.of({"evals": 4})
    with pytest.raises(ValueError, match=">= 0"):
        RefineOptions.of({"evaluations": -1})
