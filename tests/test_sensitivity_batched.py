"""Batched sensitivity (several single-layer perturbations per generation) equals the one-at-a-time sweep."""

import pytest

from mixprec import sensitivity as sens
from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.models import ModelSpec, denoiser_of, layer_group, load_pipeline
from mixprec.quantizers import quantize_

# Batched GEMMs round differently from smaller batches. SSIM: measured differences up to ~2e-8.
# SQNR: float32 rounding noise is a fixed fraction of the signal, so it moves a high SQNR (a nearly
# lossless 8-bit layer, 60+ dB) by more dB than a low one; relative tolerance (measured: <= 4e-4).
SSIM_TOL = 1e-6
SQNR_RTOL = 2e-3


def _tiny_sdxl(guidance_scale: float):
    spec = ModelSpec.from_dict({"name": "t", "source": "tiny_random", "resolution": 32, "num_inference_steps": 2,
                                "arch": {"image_size": 32, "unet": {"block_out_channels": [8, 16],
                                                                    "attention_head_dim": [2, 2],
                                                                    "norm_num_groups": 4,
                                                                    "addition_time_embed_dim": 4}}})
    pipe = load_pipeline(spec)
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, resolution=32, num_inference_steps=2, guidance_scale=guidance_scale, batch_size=8)
    return layers, sampler


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_batched_perturbations_match_one_at_a_time(tmp_path, guidance_scale):
    layers, sampler = _tiny_sdxl(guidance_scale)
    prompts, seeds = ["a red circle on a blue background", "a small green square"], [0, 1]
    calibrate_layers(layers, lambda: sampler.generate(prompts, seeds, decode=False), weight_bits=[2, 4, 8],
                     act_bits=[4, 8])
    groups = {name: layer_group(name, ["attn2", "ff"]) for name in layers}
    assert {"content", "quality"} <= set(groups.values())
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
