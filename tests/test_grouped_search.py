"""Issue 17: the search chooses per-group weight scales ("4g64") where they pay, end to end."""

from __future__ import annotations

import torch

from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget, CensusLayer
from mixprec.search import MIB, LayerSizes, Plan, read_plan, solve_budget, write_plan
from mixprec.search.budget import weight_layer_bytes
from mixprec.search.plan import plan_to_yaml

OUT, IN = 128, 256
PARAMS = OUT * IN
BYTES = {4: weight_layer_bytes(PARAMS, OUT, 4), "4g64": weight_layer_bytes(PARAMS, OUT, 4, 64, IN),
         8: weight_layer_bytes(PARAMS, OUT, 8)}


def _metric(grouped_value: float) -> dict:
    row = {4: 10.0, 8: 30.0, "4g64": grouped_value}
    return {"content": {"c0": dict(row)}, "quality": {"q0": dict(row)}}


def _solve(grouped_value: float, group_sizes=(64,)):
    def cost(layer, key):
        return BYTES[key] if key in BYTES else weight_layer_bytes(PARAMS, OUT, int(key))

    # room for both layers at 4g64 but not for one at 8 bits
    budget = 2 * BYTES["4g64"]
    return solve_budget(_metric(grouped_value), {"c0": "content", "q0": "quality"}, cost, {"c0": PARAMS, "q0": PARAMS},
                        budget, bits={"content": (4, 8), "quality": (4, 8)}, tolerance_frac=0.05, solver="highs",
                        group_sizes=group_sizes)


def test_a_grouped_option_better_per_byte_is_chosen():
    assert BYTES[4] < BYTES["4g64"] < BYTES[8]
    sol = _solve(20.0)
    assert sol.bits == {"c0": 4, "q0": 4}
    assert sol.group_size == {"c0": 64, "q0": 64}
    assert sol.bytes == 2 * BYTES["4g64"]


def test_a_grouped_option_that_does_not_pay_or_is_not_offered_is_left():
    worse = _solve(9.0)  # costs more bytes and scores lower than per channel: never worth it
    assert worse.group_size == {} and worse.bits == {"c0": 4, "q0": 4}
    ignored = _solve(20.0, group_sizes=())  # the default recipe: string keys are not choices
    assert ignored.group_size == {} and ignored.bits == {"c0": 4, "q0": 4}


def test_allocate_writes_the_chosen_group_sizes_into_the_plan_file(tmp_path):
    census = [CensusLayer(n, "Linear", g, PARAMS, 1024, OUT, "blk", False, False) for n, g in
              (("c0", "content"), ("q0", "quality"))]
    per_prompt = {g: {l: {4: [10.0, 10.0], 8: [30.0, 30.0], "4g64": [20.0, 20.0]} for l in ls}
                  for g, ls in (("content", ["c0"]), ("quality", ["q0"]))}
    request = AllocationRequest(kind="weight", budget=Budget.of("bytes", 2 * BYTES["4g64"] / MIB), K=1.0,
                                bits={"content": (4, 8), "quality": (4, 8)}, solver="highs", bytes_tolerance=0.05,
                                group_sizes=(64, 128))
    plan, sol = allocate(request, census, per_prompt)
    assert plan.group_size == {"c0": 64, "q0": 64} and plan.bits == {"c0": 4, "q0": 4}
    assert plan.header["bytes"] == LayerSizes.of(census).plan_bytes("weight", plan.bits, plan.group_size)
    assert plan.header["group_sizes_allowed"] == [64, 128]
    back = read_plan(write_plan(tmp_path / "p.yaml", plan))
    assert back.group_size == plan.group_size and back.bits == plan.bits
    # without group sizes in the request the same table gives a per-channel plan and no mapping
    plain, _ = allocate(AllocationRequest(**{**request.__dict__, "group_sizes": ()}), census, per_prompt)
    assert plain.group_size == {} and "group_size" not in plan_to_yaml(plain)
    assert "group_size:" in plan_to_yaml(plan)


def test_refinement_may_move_a_layer_to_a_grouped_option_within_the_byte_window():
    from mixprec.search.refine import refine

    choices = {"c0": (4, 8, "4g64"), "q0": (4, 8, "4g64")}

    def cost(layer, key):
        return BYTES[key]

    def score(plan):  # the joint score prefers c0 grouped; smaller key is better
        return (0.0 if plan["c0"] == "4g64" else 1.0,), {}

    lo, hi = BYTES[4] + BYTES["4g64"] - 10, BYTES[4] + BYTES["4g64"]  # one grouped layer fits, not two
    result = refine({"c0": 4, "q0": 4}, score, choices, cost, (lo, hi), evaluations=6)
    assert result.improved and result.bits == {"c0": "4g64", "q0": 4}
    assert sum(cost(l, k) for l, k in result.bits.items()) <= hi


def test_a_plan_files_group_sizes_are_applied_during_generation(tmp_path):
    from mixprec.calibration import calibrate_layers
    from mixprec.generation import Sampler
    from mixprec.models import ModelSpec, denoiser_of, load_pipeline
    from mixprec.quantizers import quantize_, set_plan
    from mixprec.selection import generate_and_score

    pipe = load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"}))
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, resolution=32, num_inference_steps=2)
    params = calibrate_layers(layers, lambda: sampler.generate(["a red circle"], [0], decode=False), weight_bits=[4],
                              act_bits=[8], group_sizes=[64])
    grouped = {n: 64 for n in layers if (4, 64) in params[n].group_scales}
    assert grouped and len(grouped) < len(layers)
    plan = read_plan(write_plan(tmp_path / "final_weight_mp.yaml",
                                Plan({"kind": "weight"}, {n: 4 for n in layers}, grouped)))
    assert plan.group_size == grouped

    seen: list[dict[str, int]] = []
    generate = sampler.generate

    def spy(*args, **kwargs):  # the layers' group sizes while the images are made
        seen.append({n: layer.w_group for n, layer in layers.items()})
        return generate(*args, **kwargs)

    sampler.generate = spy
    try:
        grouped_run = generate_and_score(sampler, layers, ["a blue square"], [1], weight_bits=plan.bits,
                                         weight_groups=plan.group_size)
        channel_run = generate_and_score(sampler, layers, ["a blue square"], [1], weight_bits=plan.bits)
    finally:
        set_plan(layers)
    assert seen[0] == {n: grouped.get(n, 0) for n in layers}
    assert set(seen[1].values()) == {0}
    assert not torch.equal(grouped_run.images, channel_run.images)


def test_evaluate_variants_opt_in_to_grouped_options():
    import pytest

    from mixprec.stages.evaluate import Variant

    assert Variant.of({"name": "joint+groups", "program": "joint", "groups": True}).groups
    assert not Variant.of({"name": "joint", "program": "joint"}).groups
    with pytest.raises(ValueError, match="groups"):
        Variant.of({"name": "x", "group": True})


def test_the_torchao_export_keeps_a_plans_group_sizes():
    import pytest

    pytest.importorskip("torchao")
    from torchao.quantization.granularity import PerAxis, PerGroup

    from mixprec.export import torchao_export

    kinds = {"lin": "linear", "lin2": "linear", "conv": "conv"}
    export = torchao_export({"lin": 4, "lin2": 4, "conv": 4}, None, kinds, weight_groups={"lin": 64, "conv": 64})
    assert export.configs["lin"].granularity == PerGroup(64) and export.plan["lin"] == {"w": 4, "a": None, "g": 64}
    assert export.configs["lin2"].granularity == PerAxis(0) and export.plan["lin2"] == {"w": 4, "a": None}
    assert "per-group weight scales" in export.unsupported["conv"]
