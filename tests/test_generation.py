"""Sampler shortcuts used by long sweeps give exactly what the plain pipeline call gives."""

import pytest
import torch

from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.models import ModelSpec, load_pipeline
from mixprec.quantizers import quantize_
from tests.conftest import compose

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a blue star"]
SEEDS = [3, 4, 5]


def _sampler(model: str, *overrides: str, batch_size: int = 2) -> tuple[Sampler, dict]:
    from omegaconf import OmegaConf

    spec = ModelSpec.from_dict(OmegaConf.to_container(compose([f"model={model}", *overrides]).model, resolve=True))
    pipe = load_pipeline(spec, "cpu")
    layers = quantize_(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
    return Sampler(pipe, spec.resolution, spec.num_inference_steps, spec.guidance_scale, batch_size), layers


@pytest.mark.parametrize("model", [
    ["tiny_random", "model.num_inference_steps=1"],  # SDXL structure, as SDXL-Turbo samples
    ["tiny_random", "model.num_inference_steps=1", "model.guidance_scale=3.0"],  # guided: [uncond; cond]
    ["tiny_sd_random"],
])
def test_one_step_replay_equals_the_pipeline_for_every_quantization_state(model):
    sampler, layers = _sampler(*model)
    calibrate_layers(layers, lambda: sampler.generate(PROMPTS, SEEDS, decode=False), [2, 4], [4, 8])
    first = sampler.denoiser_outputs(PROMPTS, SEEDS)  # captures the inputs
    assert first.shape[:2] == (3, 1)
    name = next(n for n in layers if "attn2" in n)
    for w_bits, a_bits in ((None, None), (4, None), (None, 8), (2, 4)):
        layers[name].set_bits(w_bits=w_bits, a_bits=a_bits)
        replayed = sampler.denoiser_outputs(PROMPTS, SEEDS)
        through_pipeline = sampler.generate(PROMPTS, SEEDS, decode=False, capture_denoiser=True,
                                            keep_on_device=True).denoiser
        assert torch.equal(replayed, through_pipeline)
        if w_bits == 2:
            assert not torch.equal(replayed, first)  # the replay does run the quantized denoiser
    layers[name].set_bits(None, None)
    assert torch.equal(sampler.denoiser_outputs(PROMPTS, SEEDS), first)


def test_multi_step_and_noise_adding_samplers_are_unchanged_by_the_latent_cache():
    # LCM adds noise between steps from the per-seed generators: the cached generator state must
    # continue exactly where drawing the initial latents left it.
    for model in ("tiny_lcm_random", "tiny_sdxl_multistep_random"):
        sampler, _ = _sampler(model)
        warm = sampler.generate(PROMPTS, SEEDS, decode=False, capture_denoiser=True)
        again = sampler.generate(PROMPTS, SEEDS, decode=False, capture_denoiser=True)
        fresh, _ = _sampler(model)
        cold = fresh.generate(PROMPTS, SEEDS, decode=False, capture_denoiser=True)
        assert warm.denoiser.shape[1] == 4
        assert torch.equal(warm.latents, again.latents) and torch.equal(warm.latents, cold.latents)
        assert torch.equal(sampler.denoiser_outputs(PROMPTS, SEEDS), warm.denoiser)
