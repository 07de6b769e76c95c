"""Weight options of issue 17: bits 2-8, per-group scales, GPTQ rounding; their calibration file,
their errors, and the kernels' handling of them (exact w.r.t. the fake quantization, or a reported
fallback)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.calibration import calibrate_layers, check_weight_recipe, load_params, save_params
from mixprec.generation import Sampler
from mixprec.kernels import BackendConfig, KernelLayer, choose_backend, convert_
from mixprec.kernels.probing import sqnr_db
from mixprec.models import ModelSpec, denoiser_of, load_pipeline
from mixprec.quant import (HessianAccumulator, WeightOption, dequantize_codes, gptq_codes, group_weight_scales,
                           nearest_codes, option_order, parse_weight_option, weight_options)
from mixprec.quant.gptq import output_error
from mixprec.quantizers import (LayerQuantParams, QuantLayer, act_qparams, fake_quant_weight, quant_layers,
                                quantize_, quantize_weight, set_plan, weight_scales)

PROMPT = "a red circle on a blue background"


# --------------------------------------------------------------------------- grids and groups
@pytest.mark.parametrize("bits", [3, 5, 6])
def test_odd_bit_grids_are_symmetric_integer_grids(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    qmax = 2 ** (bits - 1) - 1
    scale = weight_scales(w, bits)
    codes = quantize_weight(w, scale, bits)
    assert int(codes.abs().max()) == qmax
    # each row's largest magnitude lands on the grid's end, and every value is at most half a step off
    assert torch.equal(codes.abs().amax(dim=1), torch.full((16,), qmax, dtype=torch.int8))
    fq = fake_quant_weight(w, scale, bits)
    assert ((fq - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    assert torch.allclose(fq / scale[:, None], codes.float(), atol=1e-4)


def test_group_scales_are_exact_for_weights_made_of_groups():
    torch.manual_seed(0)
    rows, cols, g = 6, 160, 64  # 3 groups, the last one 32 columns wide
    codes = torch.randint(-7, 8, (rows, cols), dtype=torch.int8)
    codes[:, ::g] = 7  # every group reaches the grid's end
    scales = torch.rand(rows, 3) * torch.tensor([0.01, 1.0, 100.0])  # magnitudes 10^4 apart
    w = codes.float() * scales.repeat_interleave(g, dim=1)[:, :cols]
    got = group_weight_scales(w, 4, g)
    assert got.shape == (rows, 3) and torch.allclose(got, scales, rtol=1e-6)
    assert torch.equal(nearest_codes(w, got, 4, g), codes)
    assert torch.allclose(dequantize_codes(codes, got, g, torch.float32), w, rtol=1e-6)
    # one scale per row cannot represent the small groups
    per_channel = fake_quant_weight(w, weight_scales(w, 4), 4)
    assert (per_channel[:, :g] == 0).float().mean() > 0.9


def test_weight_option_names():
    assert parse_weight_option("4g64") == WeightOption(4, 64) and parse_weight_option(3) == WeightOption(3)
    assert parse_weight_option("w6") == WeightOption(6) and WeightOption(3, 64).key == "3g64"
    assert WeightOption(5).table_key == 5 and WeightOption(3, 64).label("gptq") == "w3 g64 gptq"
    assert [o.key for o in weight_options(100, [4, 3], [128, 64])] == ["3", "4", "3g64", "4g64"]
    with pytest.raises(ValueError, match="not a weight option: '4x64'"):
        parse_weight_option("4x64")
    with pytest.raises(ValueError, match="between 2 and 8, got 9"):
        parse_weight_option("9")


# --------------------------------------------------------------------------- GPTQ
def test_conv_hessian_columns_follow_the_weight_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 9, 9)
    acc = HessianAccumulator(conv)
    cols = acc.columns(x)
    out = (cols @ conv.weight.reshape(5, -1).T).reshape(2, -1, 5)
    assert torch.allclose(out, conv(x).flatten(2).transpose(1, 2), atol=1e-5)
    acc.update(x)
    acc.update(x)
    assert torch.allclose(acc.hessian(), cols.T @ cols / cols.shape[0], rtol=1e-5)


def test_gptq_codes_are_deterministic_in_range_and_beat_nearest():
    torch.manual_seed(0)
    lin = nn.Linear(96, 32)
    x = torch.randn(512, 96) @ torch.randn(96, 96) / 8  # correlated inputs, where GPTQ helps
    acc = HessianAccumulator(lin)
    acc.update(x)
    h = acc.hessian()
    for bits, g in ((3, 0), (3, 32), (6, 0)):
        scale = weight_scales(lin.weight, bits) if not g else group_weight_scales(lin.weight, bits, g)
        codes = gptq_codes(lin.weight, h, scale, bits, g, block_size=40)
        assert torch.equal(codes, gptq_codes(lin.weight, h, scale, bits, g, block_size=40))
        assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
        gptq_w = dequantize_codes(codes, scale, g, torch.float32)
        near_w = dequantize_codes(nearest_codes(lin.weight, scale, bits, g), scale, g, torch.float32)
        assert output_error(lin.weight, gptq_w, h) < 0.8 * output_error(lin.weight, near_w, h)


@pytest.fixture(scope="module")
def tiny_gptq():
    """The tiny model calibrated on one prompt with GPTQ Hessians and group sizes 64/128."""
    pipe = load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"}))
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, resolution=64, num_inference_steps=8)
    params = calibrate_layers(layers, lambda: sampler.generate([PROMPT], [0], decode=False), weight_bits=[3, 4, 8],
                              act_bits=[8], group_sizes=[64, 128], rounding="gptq")
    return pipe, layers, sampler, params


def test_gptq_lowers_every_kind_of_tiny_layers_output_error(tiny_gptq):
    _, layers, _, params = tiny_gptq
    better = total_gptq = total_near = 0.0
    for name, layer in layers.items():
        p = params[name]
        options = [(3, 0)] + [(3, g) for g in (64,) if (3, g) in p.group_scales]
        for bits, g in options:
            layer.set_bits(bits, None, g)
            gptq_w = layer.quantized_weight()
            near_w = dequantize_codes(nearest_codes(layer.inner.weight, p.weight_scale(bits, g), bits, g),
                                      p.weight_scale(bits, g), g, torch.float32)
            e_gptq, e_near = output_error(layer.inner.weight, gptq_w, p.hessian), \
                output_error(layer.inner.weight, near_w, p.hessian)
            better += e_gptq < e_near
            total_gptq, total_near = total_gptq + e_gptq, total_near + e_near
        layer.set_bits(None, None)
    assert total_gptq < 0.7 * total_near, (total_gptq, total_near)
    assert better >= 0.9 * sum(1 + any(k[1] == 64 for k in params[n].group_scales) for n in layers)


def test_gptq_improves_the_tiny_models_w3_output_on_another_prompt(tiny_gptq):
    _, layers, sampler, params = tiny_gptq
    prompt, seed = ["a green square on a yellow background"], [7]
    ref = sampler.denoiser_outputs(prompt, seed)
    sqnr = {}
    for rounding in ("nearest", "gptq"):
        for p in params.values():
            p.rounding = rounding
        set_plan(layers, {n: 3 for n in layers})
        for layer in layers.values():
            layer.drop_cache()
        sqnr[rounding] = sqnr_db(ref, sampler.denoiser_outputs(prompt, seed))
    for p in params.values():
        p.rounding = "gptq"
    set_plan(layers, {})
    assert sqnr["gptq"] > sqnr["nearest"] + 1.0, sqnr


def test_group_options_exist_only_below_the_input_width(tiny_gptq):
    _, layers, _, params = tiny_gptq
    for name, layer in layers.items():
        cols = layer.input_columns()
        assert {g for _, g in params[name].group_scales} == {g for g in (64, 128) if g < cols}
    narrow = next(n for n, layer in layers.items() if layer.input_columns() <= 64)
    with pytest.raises(KeyError, match=r"no calibrated 3-bit weight scales with group size 64 .*rerun stage=calibrate"):
        layers[narrow].set_bits(3, None, 64)


def test_calibration_file_keeps_groups_and_hessians_and_refuses_other_settings(tiny_gptq, tmp_path):
    _, _, _, params = tiny_gptq
    meta = {"weight_bits": [3, 4, 8], "act_bits": [8], "weight_group_sizes": [64, 128], "rounding": "gptq",
            "quant": {"rounding": "gptq", "gptq": {"damp": 0.01, "block_size": 128}}}
    path = tmp_path / "quant_params.safetensors"
    save_params(path, params, meta)
    back, back_meta = load_params(path)
    for name, p in params.items():
        assert back[name].group_scales.keys() == p.group_scales.keys()
        assert all(torch.equal(back[name].group_scales[k], v) for k, v in p.group_scales.items())
        assert torch.equal(back[name].hessian, p.hessian) and back[name].uses_gptq
    check_weight_recipe(back_meta, "gptq", [64], {"damp": 0.01, "block_size": 128}, path)
    with pytest.raises(ValueError, match=r"calibrated with quant.rounding=gptq but this run asks for "
                                         r"quant.rounding=nearest.*stage=calibrate quant.rounding=nearest"):
        check_weight_recipe(back_meta, "nearest", [], None, path)
    with pytest.raises(ValueError, match=r"quant.gptq=.*'damp': 0.01.*this run asks for quant.gptq="):
        check_weight_recipe(back_meta, "gptq", [], {"damp": 0.1, "block_size": 128}, path)
    with pytest.raises(ValueError, match=r"group sizes \[64, 128\].*including \[32\]"):
        check_weight_recipe(back_meta, "gptq", [32], None, path)


# --------------------------------------------------------------------------- kernels
def _calibrated(module: nn.Module, x: torch.Tensor, rounding: str) -> QuantLayer:
    layer = QuantLayer("layer", module)
    lo, hi = float(x.min()), float(x.max())
    bits = (2, 3, 4, 5, 6, 7, 8)
    acc = HessianAccumulator(module)
    acc.update(x)
    layer.params = LayerQuantParams({b: weight_scales(module.weight, b) for b in bits}, (lo, hi),
                                    {b: act_qparams(lo, hi, b) for b in (4, 5, 6, 8)},
                                    group_scales={(b, 64): group_weight_scales(module.weight, b, 64) for b in bits},
                                    rounding=rounding, hessian=acc.hessian())
    return layer


LAYERS = [(lambda: nn.Linear(100, 24), (3, 10, 100)), (lambda: nn.Conv2d(16, 8, 3, padding=1), (2, 16, 6, 6))]


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("w_bits,a_bits", [(3, 8), (5, None), (6, 6), (7, 5), (3, 4)])
def test_kernels_run_gptq_codes_of_every_width_exactly(make, shape, w_bits, a_bits):
    torch.manual_seed(0)
    mod = make()
    x = torch.randn(*shape) + 0.2
    layer = _calibrated(mod, x, "gptq")
    layer.set_bits(w_bits, a_bits)
    ref = layer(x)
    backend, reason = choose_backend(mod, w_bits, a_bits, BackendConfig())
    assert backend in ("int8", "wonly") and not reason
    kl = KernelLayer.from_quant_layer(layer, backend, cpu_path="emulate")
    assert kl.spec.rounding == "gptq" and kl.spec.storage_bits == (4 if w_bits <= 4 else 8)
    codes, _ = layer.weight_codes()
    assert torch.equal(kl.dequantized_weight(torch.float32), layer.quantized_weight())
    assert not torch.equal(codes, quantize_weight(mod.weight, layer.params.weight_scales[w_bits], w_bits))
    assert torch.equal(KernelLayer.from_quant_layer(layer, backend)(x), ref)  # CPU: the reference path
    assert sqnr_db(ref, kl(x)) > 100  # the kernel arithmetic, emulated


@pytest.mark.parametrize("make,shape", LAYERS)
def test_grouped_layers_fall_back_to_the_reference_path_with_a_reason(make, shape):
    torch.manual_seed(0)
    mod = make()
    x = torch.randn(*shape)
    layer = _calibrated(mod, x, "nearest")
    layer.set_bits(4, 8, 64)
    ref = layer(x)
    backend, reason = choose_backend(mod, 4, 8, BackendConfig(), w_group=64)
    assert backend == "reference" and "per-group weight scales (group size 64)" in reason
    kl = KernelLayer.from_quant_layer(layer, backend)
    assert kl.wscale.shape == (mod.weight.shape[0], -(-mod.weight[0].numel() // 64)) and kl.spec.group_size == 64
    assert torch.equal(kl(x), ref)
    with pytest.raises(ValueError, match="per-group weight scales run on the reference backend only"):
        KernelLayer.from_quant_layer(layer, "int8")
    model = nn.Sequential(copy.deepcopy(mod))
    qlayers = quantize_(model)
    for q in qlayers.values():
        q.params = layer.params
    set_plan(qlayers, {"0": 4}, {"0": 8}, weight_groups={"0": 64})
    report = convert_(model, BackendConfig())
    assert report.summary()["fallback_reasons"] == {reason: 1} and report.layers[0].w_group == 64
    assert torch.equal(model(x), ref) and not quant_layers(model)
    assert F.mse_loss(ref, mod(x)) > 0


def test_a_checkpoint_keeps_grouped_and_gptq_layers(tmp_path):
    from mixprec.checkpoint import load_quantized, save_quantized
    from mixprec.kernels.probing import denoiser_inputs
    from mixprec.models.toy import build_unet

    unet = build_unet("tiny")
    layers = quantize_(unet)
    calib = [denoiser_inputs(unet, 2, seed=s) for s in range(2)]
    params = calibrate_layers(layers, lambda: [unet(**c) for c in calib], [3, 5], [8], group_sizes=[64],
                              rounding="gptq")
    names = list(layers)
    grouped = {n: 64 for n in names[::2] if (3, 64) in params[n].group_scales}
    assert grouped
    set_plan(layers, {n: (3 if i % 3 else 5) for i, n in enumerate(names)}, {n: 8 for n in names[::2]},
             weight_groups=grouped)
    x = denoiser_inputs(unet, 2, seed=9)
    with torch.no_grad():
        ref = unet(**x).sample
    # bos="exact": the BOS row of cross-attention K/V in full precision, as the QuantLayer computes it
    report = convert_(unet, BackendConfig(bos="exact"))
    assert {d.name for d in report.fallbacks() if "per-group" in d.reason} == set(grouped)
    with torch.no_grad():
        out = unet(**x).sample
    assert torch.equal(ref, out)  # CPU: every layer on the reference path, from the stored codes
    save_quantized(unet, tmp_path / "q.safetensors")
    fresh = build_unet("tiny", device="meta", seed=123)
    back = load_quantized(fresh, tmp_path / "q.safetensors", device="cpu")
    assert {d.name for d in back.layers if d.w_group == 64 and d.backend == "reference"} == set(grouped)
    with torch.no_grad():
        assert torch.equal(fresh(**x).sample, out)


def test_the_stages_measure_grouped_options_and_refuse_another_rounding(make_cfg):
    from mixprec import artifacts
    from mixprec.context import workspace
    from mixprec.runner import run_stage

    wide = ["model=tiny_random", "quant=wide", "quant.weight_bits=[3,4]", "quant.act_bits=[8]",
            "quant.weight_bits_by_group.content=[3,4]", "quant.weight_bits_by_group.quality=[3,4]",
            "quant.act_bits_by_group.content=[8]", "quant.act_bits_by_group.quality=[8]"]
    run_stage(make_cfg(*wide, "stage=calibrate"))
    layer = "up_blocks.0.resnets.0.conv1"  # 288 input columns: both group sizes apply
    sweep = [*wide, "stage=sensitivity", "stage.kinds=[w]", f"stage.layers=[{layer}]", "prompts.sensitivity.n=2",
             "stage.batch_size=2", "stage.progress=false"]
    run_stage(make_cfg(*sweep))
    ws = workspace(make_cfg(*wide))
    grouped = artifacts.read_per_prompt(ws, grouped=True)["weight"]["quality"][layer]
    assert sorted(grouped, key=option_order) == [3, 4, "3g64", "4g64", "3g128", "4g128"]
    assert all(len(v) == 2 for v in grouped.values())
    assert list(artifacts.read_per_prompt(ws)["weight"]["quality"][layer]) == [3, 4]
    tables, _ = artifacts.read_sensitivity_tables(ws.root, grouped=True)
    assert set(tables[("w", "quality")][layer]) == set(grouped)
    with pytest.raises(ValueError, match=r"calibrated with quant.rounding=gptq but this run asks for "
                                         r"quant.rounding=nearest"):
        run_stage(make_cfg(*sweep, "quant.rounding=nearest"))


def test_gptq_max_columns_keeps_wide_layers_at_nearest(tmp_path):
    from mixprec.calibration import gptq_nearest_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 100), nn.ReLU(), nn.Linear(100, 8))
    layers = quantize_(model)
    x = torch.randn(64, 20)
    params = calibrate_layers(layers, lambda: model(x), [4], [8], rounding="gptq", gptq_max_columns=50)
    assert params["0"].uses_gptq and not params["2"].uses_gptq and params["2"].hessian is None
    assert gptq_nearest_layers(params) == ["2"]
    path = tmp_path / "q.safetensors"
    save_params(path, params, {"weight_bits": [4], "act_bits": [8], "rounding": "gptq",
                               "gptq_nearest_layers": gptq_nearest_layers(params)})
    back, _ = load_params(path)
    assert back["0"].uses_gptq and back["2"].rounding == "nearest"
    layers["2"].set_bits(4)
    codes, scale = layers["2"].weight_codes()
    assert torch.equal(codes, quantize_weight(model[2].inner.weight, scale, 4))


def test_kernel_coverage_of_every_option_the_wide_recipe_offers():
    from mixprec.kernels import option_coverage

    options = [o.key for o in weight_options(288, range(2, 9), [64, 128])]
    rows = option_coverage(options, [None, 4, 5, 6, 7, 8])
    assert len(rows) == 2 * len(options) * 6
    per_channel = [r for r in rows if "g" not in r["weight"]]
    assert all(r["kernel"] and r["backend"] in ("wonly", "int8") and not r["reason"] for r in per_channel)
    assert {r["storage_bits"] for r in per_channel if r["weight"] in ("3", "4")} == {4}
    assert {r["storage_bits"] for r in per_channel if r["weight"] in ("5", "6", "7", "8")} == {8}
    grouped = [r for r in rows if "g" in r["weight"]]
    assert all(r["backend"] == "reference" and r["reason"].startswith("per-group weight scales") for r in grouped)
