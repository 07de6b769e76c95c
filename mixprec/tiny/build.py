"""Build and load SDXL-structured pipelines at toy scale.

`build_pipeline(arch, seed)` makes a `StableDiffusionXLPipeline` with random weights whose module
tree has SDXL's shape: a UNet2DConditionModel with DownBlock2D then CrossAttnDownBlock2D levels,
linear-projection transformer blocks (so layer names contain attn1 / attn2 / ff), a cross-attention
mid block and "text_time" added conditioning; two CLIP text encoders whose penultimate hidden
states are concatenated; an AutoencoderKL. The sizes come from a plain dict, so the same function
builds the shipped `tiny` model (TINY_ARCH) and the sub-second `tiny_random` test model
(MICRO_ARCH).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_tokenizer, load_tokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"

_SCHEDULERS = {
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
}

# The shipped model. Two UNet levels at 16x16 and 8x8 latents: enough receptive field for shapes up
# to 9 latent pixels wide, and small enough that 8 images x 8 steps run in well under 2 s on CPU.
TINY_ARCH: dict[str, Any] = {
    "image_size": 64,
    "unet": {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        # Like SDXL's config this value acts as the number of heads (a diffusers naming quirk).
        "attention_head_dim": [2, 4],
        # Few channels per group would normalise away a flat image's colour (GroupNorm with one
        # channel per group is InstanceNorm); 8-16 channels per group keep it, as SD's 10 do.
        "norm_num_groups": 4,
        "addition_time_embed_dim": 16,
    },
    "vae": {
        # Same reason, more so: the VAE sees flat colours directly, and with 2 groups it learns
        # several times faster than with 8.
        "block_out_channels": [16, 16, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 2,
        "mid_block_add_attention": False,
    },
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "text_encoder_2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "projection_dim": 32},
    "max_length": 16,
    # The diffusion objective and the noise schedule are fixed here; the sampler's step count
    # lives in the model config (num_inference_steps).
    "scheduler": {
        "class": "DPMSolverMultistepScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        # Zero terminal SNR: at the first sampling step the latent is pure noise, exactly as in
        # training, so the background colour must come from the prompt (not leak from the data).
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
}

# Smallest arch with the same structure: builds in a fraction of a second, for tests.
MICRO_ARCH: dict[str, Any] = {
    "image_size": 64,
    "unet": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        "attention_head_dim": [2, 2],
        "norm_num_groups": 4,
        "addition_time_embed_dim": 4,
    },
    "vae": {
        "block_out_channels": [8, 8, 8],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
    },
    "text_encoder": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2},
    "text_encoder_2": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "projection_dim": 8},
    "max_length": 16,
    "scheduler": dict(TINY_ARCH["scheduler"]),
}


def merge_arch(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep-merge override into a copy of base (nested dicts merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_arch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def vae_scale_factor(arch: Mapping[str, Any]) -> int:
    return 2 ** (len(arch["vae"]["block_out_channels"]) - 1)


def latent_size(arch: Mapping[str, Any]) -> int:
    return arch["image_size"] // vae_scale_factor(arch)


def _text_config(t: Mapping[str, Any], tok, max_length: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        projection_dim=t.get("projection_dim", t["hidden_size"]),
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        # Pool at the first EOS: with these ids set, CLIP does not fall back to its legacy argmax.
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def make_scheduler(sched: Mapping[str, Any]):
    sched = dict(sched)
    cls = _SCHEDULERS[sched.pop("class")]
    if cls is DPMSolverMultistepScheduler:
        sched.setdefault("algorithm_type", "dpmsolver++")
        sched.setdefault("solver_order", 2)
        sched.setdefault("final_sigmas_type", "zero")
    return cls(**sched)


def build_pipeline(arch: Mapping[str, Any] | None = None, seed: int = 0, base: Mapping[str, Any] = TINY_ARCH,
                   make_tokenizer: Callable[[int], Any] | None = None) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline with random weights (deterministic in seed), float32 on CPU.

    `arch` is deep-merged over `base` (TINY_ARCH), so {"unet": {"block_out_channels": [16, 32]}} is
    a valid override; pass MICRO_ARCH for the fastest model with the same structure. Another
    model's caption vocabulary comes in through `make_tokenizer(model_max_length)`.
    """
    arch = merge_arch(base, arch)
    u, v = arch["unet"], arch["vae"]
    max_length = int(arch["max_length"])
    make_tokenizer = make_tokenizer or (lambda n: build_tokenizer(model_max_length=n))
    tok = make_tokenizer(max_length)
    tok2 = make_tokenizer(max_length)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        te = CLIPTextModel(_text_config(arch["text_encoder"], tok, max_length))
        te2 = CLIPTextModelWithProjection(_text_config(arch["text_encoder_2"], tok2, max_length))
        pooled_dim = te2.config.projection_dim
        n_levels = len(u["block_out_channels"])
        unet = UNet2DConditionModel(
            sample_size=latent_size(arch),
            in_channels=v["latent_channels"],
            out_channels=v["latent_channels"],
            down_block_types=tuple(u["down_block_types"]),
            up_block_types=tuple(u["up_block_types"]),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(u["block_out_channels"]),
            layers_per_block=u["layers_per_block"],
            transformer_layers_per_block=tuple(u["transformer_layers_per_block"])[:n_levels],
            attention_head_dim=tuple(u["attention_head_dim"])[:n_levels],
            norm_num_groups=u["norm_num_groups"],
            cross_attention_dim=te.config.hidden_size + te2.config.hidden_size,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=u["addition_time_embed_dim"],
            # 6 micro-conditioning numbers (original size, crop corner, target size) + pooled text.
            projection_class_embeddings_input_dim=6 * u["addition_time_embed_dim"] + pooled_dim,
        )
        n_vae = len(v["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae,
            block_out_channels=tuple(v["block_out_channels"]),
            layers_per_block=v["layers_per_block"],
            latent_channels=v["latent_channels"],
            norm_num_groups=v["norm_num_groups"],
            sample_size=arch["image_size"],
            mid_block_add_attention=v.get("mid_block_add_attention", True),
            scaling_factor=float(v.get("scaling_factor", 1.0)),
            force_upcast=False,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=make_scheduler(arch["scheduler"]),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return pipe


def asset_path() -> Path:
    """The packaged trained tiny model (a diffusers folder)."""
    return ASSET_DIR


def load_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, default_folder: Path = ASSET_DIR,
                  check_tokenizer: Callable[[Path], Any] = load_tokenizer,
                  train_stage: str = "train_tiny") -> StableDiffusionXLPipeline:
    """Load a saved tiny pipeline offline (default: the packaged one) and verify its tokenizers."""
    folder = Path(path) if path is not None else default_folder
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no diffusers pipeline (model_index.json missing); "
            f"train one with `python run.py stage={train_stage}`"
        )
    # Checked before the pipeline loads them: an empty tokenizer folder would load silently.
    check_tokenizer(folder / "tokenizer")
    check_tokenizer(folder / "tokenizer_2")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except TypeError:  # diffusers before `dtype` replaced `torch_dtype`
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    if pipe.unet.dtype != dtype:  # an older diffusers may ignore the keyword it does not know
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe: StableDiffusionXLPipeline, prompts: list[str], seeds: list[int], num_inference_steps: int = 8,
             guidance_scale: float = 0.0, output_type: str = "pil", batch_size: int | None = None):
    """Images for prompts, each from its own seeded generator: an image depends only on its
    (prompt, seed), not on what else is in the batch."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    size = pipe.default_sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    bs = batch_size or len(prompts) or 1
    out: list = []
    for i in range(0, len(prompts), bs):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + bs]]
        # Noise is drawn on the CPU so an image is the same on every device.
        latents = torch.stack([
            torch.randn((pipe.unet.config.in_channels, pipe.default_sample_size, pipe.default_sample_size),
                        generator=g) for g in gens
        ]).to(device=device, dtype=pipe.unet.dtype)
        res = pipe(prompt=list(prompts[i:i + bs]), height=size, width=size, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, latents=latents, output_type=output_type)
        imgs = res.images
        out.extend(list(imgs) if output_type == "pil" else [im for im in imgs])
    return out
