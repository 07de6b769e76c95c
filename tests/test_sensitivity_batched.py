"""Batched sensitivity (several single-layer perturbations per generation) equals the one-at-a-time sweep."""

import pytest

from mixprec import sensitivity as sens
from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.models import ModelSpec, denoiser_of, layer_group, load_pipeline
from mixprec.quantizers import quantize_

# Batched GEMMs round differently from smaller batches. SSIM: measured differences up to 1.3e-8.
# SQNR: float32 rounding noise is a fixed fraction of the signal, so it moves a high SQNR (a nearly
# lossless 8-bit layer) by more dB than a low one: a relative tolerance (measured up to 4.5e-5 on
# this slice; 0.019 dB on every layer of this model).
SSIM_TOL = 1e-6
SQNR_RTOL = 2e-3


def _tiny_sdxl(guidance_scale: float):
    """A random-weight SDXL-layout pipeline at 32x32, two sampler steps, every layer wrapped."""
    unet = dict(block_out_channels=[8, 16], attention_head_dim=[2, 2], norm_num_groups=4, addition_time_embed_dim=4)
    spec = ModelSpec.from_dict(dict(name="t", source="tiny_random", resolution=32, num_inference_steps=2,
                                    arch=dict(image_size=32, unet=unet)))
    pipe = load_pipeline(spec)
    sampler = Sampler(pipe, resolution=32, num_inference_steps=2, guidance_scale=guidance_scale, batch_size=8)
    return quantize_(denoiser_of(pipe)), sampler


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_batched_perturbations_match_one_at_a_time(tmp_path, guidance_scale):
    layers, sampler = _tiny_sdxl(guidance_scale)
    prompts, seeds = ["a red circle on a blue background", "a small green square"], [0, 1]
    calibrate_layers(layers, lambda: sampler.generate(prompts, seeds, decode=False), weight_bits=[2, 4, 8],
                     act_bits=[4, 8])
    all_groups = {name: layer_group(name, ["attn2", "ff"]) for name in layers}
    # A slice keeps the test short: convolutions, linears, a cross-attention key (its BOS token skips
    # quantization) and content layers deep in the model.
    content = [n for n, g in all_groups.items() if g == "content"]
    quality = [n for n, g in all_groups.items() if g == "quality"]
    chosen = quality[:4] + [n for n in content if n.endswith("attn2.to_k")][:1] + content[-3:]
    groups = {n: all_groups[n] for n in layers if n in chosen}
    assert layers[next(n for n in groups if n.endswith("attn2.to_k"))].skip_first_token
    tasks = sens.make_tasks(groups, weight_bits=[2, 4, 8], act_bits=[4, 8])
    ref = sens.compute_reference(sampler, prompts, seeds, need_images=True, need_denoiser=True)
    one = sens.run_tasks(tasks, layers, sampler, ref, prompts, seeds, sens.RecordFile(tmp_path / "one.jsonl"),
                         progress=False)
    # 5 perturbations per batch: batches mix layers and kinds, tasks span two batches, the last is partial.
    batched = sens.run_tasks(tasks, layers, sampler, ref, prompts, seeds, sens.RecordFile(tmp_path / "b.jsonl"),
                             progress=False, perturbations_per_batch=5)
    assert sampler.batch_size == 8 and not any(layer.row_options for layer in layers.values())
    assert list(batched) == list(one) == [t.key for t in tasks]
    worst = {"content": 0.0, "quality": 0.0}
    for key, rec in one.items():
        other = batched[key]
        assert other["values"].keys() == rec["values"].keys()
        for bits, values in rec["values"].items():
            assert len(other["values"][bits]) == len(prompts)
            for a, b in zip(values, other["values"][bits]):
                scale = 1.0 if rec["group"] == "content" else abs(a)
                worst[rec["group"]] = max(worst[rec["group"]], abs(a - b) / scale)
    assert worst["content"] <= SSIM_TOL and worst["quality"] <= SQNR_RTOL, worst
    # The perturbations are not all alike: the comparison above is not between constants.
    assert len({round(v, 4) for rec in one.values() for vals in rec["values"].values() for v in vals}) > 10


def test_perturbations_per_batch_setting():
    from mixprec.settings import SensitivitySettings
    from mixprec.stages.sensitivity import perturbations_per_batch

    assert perturbations_per_batch(SensitivitySettings(name="sensitivity", batch_size=8), prompts=1) == 8
    assert perturbations_per_batch(SensitivitySettings(name="sensitivity", batch_size=8), prompts=3) == 2
    assert perturbations_per_batch(SensitivitySettings(name="sensitivity", batch_size=8), prompts=8) == 1  # the one-at-a-time path
    assert perturbations_per_batch(SensitivitySettings(name="sensitivity", batch_size=4), prompts=16) == 1
    assert perturbations_per_batch(SensitivitySettings(name="sensitivity", perturbations_per_batch=3), prompts=8) == 3
    with pytest.raises(ValueError, match="stage.perturbations_per_batch"):
        perturbations_per_batch(SensitivitySettings(name="sensitivity", perturbations_per_batch=0), prompts=1)


def test_evaluate_content_sqnr_batched_matches_one_at_a_time(tmp_path):
    """stage=evaluate's single-metric table (content layers scored by SQNR) batches its perturbations too."""
    from types import SimpleNamespace

    from mixprec.stages.evaluate import content_sqnr
    from mixprec.workspace import Workspace

    layers, sampler = _tiny_sdxl(0.0)
    prompts, seeds = ["a small green square"], [0]
    calibrate_layers(layers, lambda: sampler.generate(prompts, seeds, decode=False), weight_bits=[4], act_bits=[4])
    content = [n for n in layers if layer_group(n, ["attn2", "ff"]) == "content"][-3:]
    # only three content layers: the rest are quality layers, which content_sqnr leaves out
    small = {n: layers[n] for n in layers if n in content or layer_group(n, ["attn2", "ff"]) == "quality"}
    bundle = SimpleNamespace(layers=small, sampler=sampler, spec=SimpleNamespace(content_patterns=["attn2", "ff"]))
    one = content_sqnr(bundle, Workspace(tmp_path / "one"), prompts, seeds, [4], [4], 100.0, False)
    batched = content_sqnr(bundle, Workspace(tmp_path / "b"), prompts, seeds, [4], [4], 100.0, False,
                           perturbations_per_batch=4)
    assert sorted(one["weight"]) == sorted(batched["weight"]) == sorted(content)
    for kind in ("weight", "act"):
        for name in content:
            a, b = one[kind][name][4][0], batched[kind][name][4][0]
            assert abs(a - b) <= SQNR_RTOL * abs(a), (kind, name, a, b)
