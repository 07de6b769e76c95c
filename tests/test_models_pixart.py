"""PixArt-alpha (a diffusion transformer) through the same stages as the UNets: census, calibration,
sensitivity, allocation, selection, inference and the benchmark's reference path."""

import csv
import json

import pytest
import torch
import yaml

from mixprec.models import ModelSpec, build_random_denoiser, census, denoiser_example_inputs, denoiser_of, \
    load_pipeline, measure_act_elems, replace_denoiser
from mixprec.runner import run_stage

TINY = ["model=tiny_pixart_random", "prompts.calibration.n=2", "prompts.sensitivity.n=2", "prompts.selection.n=2",
        "prompts.inference.n=2"]
CONTENT = ["attn2", "ff", "caption_projection"]
# The integer program needs a sensitivity for every quantizable layer: the layers the sweep skips
# stay in full precision.
EXCLUDE = "model.exclude_patterns=[transformer_blocks.0,adaln_single]"
SLICE = "stage.layers=[transformer_blocks.1,caption_projection,pos_embed,proj_out]"


def test_pixart_alpha_census_of_the_full_size_transformer():
    transformer = build_random_denoiser("pixart", device="meta")
    rows = census(transformer, CONTENT, act_elems=measure_act_elems(transformer, 64, 120))
    by_name = {r.name: r for r in rows}
    assert len(rows) == 287 and sum(r.type == "Conv2d" for r in rows) == 1  # pos_embed.proj
    # per block: attn2 (4) + ff (2) content, attn1 (4) quality; caption_projection (2) is content
    assert sum(r.group == "content" for r in rows) == 28 * 6 + 2
    assert {r.name for r in rows if r.group == "quality" and not r.name.startswith("transformer_blocks")} == {
        "pos_embed.proj", "proj_out", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2"}
    assert by_name["transformer_blocks.27.ff.net.0.proj"].group == "content"
    assert by_name["transformer_blocks.27.attn1.to_q"].group == "quality"
    assert by_name["pos_embed.proj"].kernel == "2x2"
    # 32x32 tokens of 1152 features into self-attention; 120 T5 tokens of 4096 into the caption projection
    assert by_name["transformer_blocks.0.attn1.to_q"].act_elems == 1024 * 1152
    assert by_name["caption_projection.linear_1"].act_elems == 120 * 4096
    assert by_name["transformer_blocks.0.attn2.to_k"].act_elems == 120 * 1152
    assert sum(p.numel() for p in transformer.parameters()) == 610_856_096


def test_tiny_pixart_denoiser_accessor_and_inputs():
    pipe = load_pipeline(ModelSpec.from_dict({"name": "t", "source": "tiny_random", "family": "pixart"}))
    transformer = denoiser_of(pipe)
    assert transformer is pipe.transformer and getattr(pipe, "unet", None) is None
    out = transformer(**denoiser_example_inputs(transformer, 2, 8, 120, generator=torch.Generator().manual_seed(0)))
    assert out.sample.shape == (2, 8, 8, 8)  # learned sigma: noise and variance channels
    other = torch.nn.Identity()
    assert replace_denoiser(pipe, other) is transformer and pipe.transformer is other
    replace_denoiser(pipe, transformer)


def test_a_pipeline_without_a_denoiser_is_refused(monkeypatch):
    import mixprec.models.toy as models

    class NoDenoiser:
        pass

    monkeypatch.setattr(models, "build_tiny_pixart_pipeline", lambda arch, seed: NoDenoiser())
    with pytest.raises(TypeError, match=r"NoDenoiser has no denoiser \(neither 'unet' nor 'transformer'\)"):
        load_pipeline(ModelSpec.from_dict({"name": "t", "source": "tiny_random", "family": "pixart"}))


def test_tiny_pixart_calibrate_sensitivity_allocate_infer(make_cfg, tmp_path):
    def stage(*overrides):
        return run_stage(make_cfg(*TINY, EXCLUDE, *overrides))

    stage("stage=calibrate")
    ws = tmp_path / "tiny_pixart_random"
    rows = list(csv.DictReader((ws / "layers.csv").open()))
    groups = {r["name"]: r["group"] for r in rows}
    assert len(rows) == 27 and sum(g == "content" for g in groups.values()) == 2 * 6 + 2
    assert groups["caption_projection.linear_2"] == "content" and groups["adaln_single.linear"] == "quality"
    quantized = {r["name"] for r in rows if r["excluded"] == "False"}
    assert len(quantized) == 27 - 10 - 3

    stage("stage=sensitivity", SLICE, "stage.progress=false")
    measured = {}
    for kind in ("w", "a"):
        for group in ("content", "quality"):
            measured.update({(kind, name): bits for name, bits in
                             (yaml.safe_load((ws / f"sensitivity_{kind}_{group}.yaml").read_text()) or {}).items()})
    weight = {name: bits for (kind, name), bits in measured.items() if kind == "w"}
    assert set(weight) == quantized
    # the widths a plan may give the layer's group: quality layers never take 2-bit weights
    assert {n: sorted(m) for n, m in weight.items()} == {n: [2, 4, 8] if groups[n] == "content" else [4, 8]
                                                         for n in weight}
    ordered = [name for name, m in weight.items() if m[8] >= m[4] >= m.get(2, m[4])]
    assert len(ordered) >= 0.8 * len(weight), {n: m for n, m in weight.items() if n not in ordered}

    # a coarse window: a few tiny layers cannot hit a narrow one
    stage("stage=allocate", "stage.target=5", "stage.seed=0", "stage.tolerance=0.5")
    plan = yaml.safe_load((ws / "plans" / "weight_5_1" / "seed0.yaml").read_text())
    assert plan["header"]["achieved_mean_bits"]["overall"] <= 5.0 + 1e-9
    assert plan["header"]["achieved_mean_bits"]["overall"] >= 5.0 - 0.5
    assert set(plan["bits"]) == quantized
    assert {plan["bits"][n] for n in quantized if groups[n] == "quality"} <= {4, 8}

    stage("stage=select", "stage.kinds=[weight]", "stage.weight_target=5", "stage.progress=false")
    stage("stage=infer", "stage.use_act_plan=false")
    infer = json.loads((ws / "infer.json").read_text())["headline"]
    assert infer["images"] == 2 and 15 < infer["psnr_db"] and 0 < infer["ssim"] <= 1
    from PIL import Image
    images = sorted((ws / "generated_images").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 64)


def test_tiny_pixart_benchmark_reference_path(make_cfg, tmp_path):
    head = run_stage(make_cfg(*TINY, "stage=benchmark", "stage.calibration=random", "stage.resolutions=[64]",
                              "stage.batch_sizes=[1]", "stage.dtype=float32", "stage.compile=none", "stage.iters=1",
                              "stage.warmup=0", "stage.end_to_end_repeats=1", "stage.plans=[uniform:w8a8,ff:w4a16]",
                              "stage.kernels.w8a8=int8"))
    plans = head["plans"]
    assert plans["uniform:w8a8"]["quantized_layers"] == 27 and plans["ff:w4a16"]["quantized_layers"] == 2 * 2
    assert plans["uniform:w8a8"]["dispatch"]["layers"] == 27
    assert 10 < plans["uniform:w8a8"]["sqnr_vs_16bit_db"] < 80
    assert plans["uniform:w8a8"]["end_to_end"]["resolution"] == 64


def test_quantized_pixart_transformer_roundtrips_through_a_checkpoint(tmp_path):
    from mixprec.checkpoint import load_quantized, save_quantized
    from mixprec.kernels import BackendConfig, convert_
    from mixprec.kernels.probing import calibrate_random, denoiser_inputs
    from mixprec.models import build_tiny_pixart_pipeline
    from mixprec.quantizers import set_plan

    transformer = build_tiny_pixart_pipeline(seed=0).transformer
    calib = [denoiser_inputs(transformer, 2, 8, seed=s) for s in range(2)]
    layers = calibrate_random(transformer, lambda: [transformer(**c) for c in calib])
    names = list(layers)
    set_plan(layers, {n: [8, 4, 2][i % 3] for i, n in enumerate(names)}, {n: [8, None][i % 2] for i, n in enumerate(names)})
    convert_(transformer, BackendConfig(cpu="emulate", w8a8="int8"))
    x = denoiser_inputs(transformer, 2, 8, seed=9)
    with torch.no_grad():
        before = transformer(**x).sample
    save_quantized(transformer, tmp_path / "q.safetensors")
    fresh = build_tiny_pixart_pipeline(seed=1).transformer
    load_quantized(fresh, tmp_path / "q.safetensors", device="cpu")
    with torch.no_grad():
        assert torch.equal(before, fresh(**x).sample)
