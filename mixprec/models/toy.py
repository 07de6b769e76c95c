"""Toy-scale pipelines and denoisers with random weights, for tests and kernel checks: one place for
every toy builder (SD 2.1 / SD 1.5 / PixArt pipelines here, the SDXL-structured tiny UNet for the
kernels, and the built-in tiny model's structure through :func:`mixprec.tiny.build.build_pipeline`)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from typing import Any

import torch
import torch.nn as nn


# Tiny StableDiffusionPipeline structures: SD 2.1 / SD-Turbo (linear projections, 2 heads) and
# SD 1.5 (1x1-conv projections in the transformer blocks, as LCM-distilled SD 1.5 has).
TINY_SD_FAMILIES: dict[str, dict[str, Any]] = {
    "sd": {"use_linear_projection": True},
    "sd15": {"use_linear_projection": False},
}
TINY_SD_ARCH: dict[str, Any] = {
    "image_size": 32, "channels": [8, 16], "text_hidden": 16, "heads": 2,
    # A guidance-embedding input (LCM) of this width; null: none.
    "time_cond_proj_dim": None,
}


def build_tiny_sd_pipeline(arch: dict[str, Any] | None = None, seed: int = 0, family: str = "sd"):
    """A StableDiffusionPipeline of ``family``'s structure at toy scale with random weights (tests).

    Same block types as SD (cross-attention in every level but the last, one text encoder whose
    last hidden state conditions the UNet, no added conditioning). ``sd``: SD 2.1 / SD-Turbo
    (linear projections); ``sd15``: SD 1.5 (1x1-conv projections); ``arch.time_cond_proj_dim``
    adds LCM's guidance embedding. The scheduler is Euler (trailing); ``model.scheduler`` swaps it.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mixprec.tiny.tokenizer import build_tokenizer

    if family not in TINY_SD_FAMILIES:
        raise ValueError(f"no tiny StableDiffusionPipeline structure for family {family!r}; known: "
                         f"{sorted(TINY_SD_FAMILIES)}")
    unknown = set(arch or {}) - set(TINY_SD_ARCH) - set(TINY_SD_FAMILIES[family])
    if unknown:
        raise ValueError(f"unknown model.arch option(s) {sorted(unknown)} for a tiny {family} model; "
                         f"known: {sorted(set(TINY_SD_ARCH) | set(TINY_SD_FAMILIES[family]))}")
    a = {**TINY_SD_ARCH, **TINY_SD_FAMILIES[family], **(arch or {})}
    tok = build_tokenizer()
    levels = len(a["channels"])
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=a["text_hidden"], intermediate_size=2 * a["text_hidden"],
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=a["image_size"] // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=tuple(a["channels"]),
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=a["heads"], norm_num_groups=4, cross_attention_dim=a["text_hidden"],
            use_linear_projection=bool(a["use_linear_projection"]), time_cond_proj_dim=a["time_cond_proj_dim"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=a["image_size"])
    finally:
        torch.random.set_rng_state(state)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="trailing")
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_pixart_pipeline(arch: dict[str, Any] | None = None, seed: int = 0):
    """A PixArt-alpha-structured PixArtAlphaPipeline at toy scale with random weights (tests).

    Same module types and names as PixArt-alpha: patch-embedding conv, ``adaln_single`` timestep
    modulation, ``caption_projection`` of T5 states, transformer blocks with self-attention
    (``attn1``), cross-attention (``attn2``) and a GELU feed-forward (``ff``), learned-sigma output
    (twice the latent channels), a T5 encoder and DPM-Solver++.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from mixprec.tiny.tokenizer import build_tokenizer

    a = {"image_size": 64, "layers": 2, "heads": 2, "head_dim": 8, "text_hidden": 16, "text_layers": 2, **(arch or {})}
    if a["image_size"] % 16:
        raise ValueError(f"tiny PixArt image_size must be a multiple of 16 (VAE factor 8 x patch 2), got {a['image_size']}")
    tok = build_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tok), d_model=a["text_hidden"], d_ff=2 * a["text_hidden"], d_kv=a["text_hidden"] // 2,
            num_layers=a["text_layers"], num_heads=2, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        transformer = PixArtTransformer2DModel(
            num_attention_heads=a["heads"], attention_head_dim=a["head_dim"], in_channels=4, out_channels=8,
            num_layers=a["layers"], cross_attention_dim=a["heads"] * a["head_dim"],
            sample_size=a["image_size"] // 8, patch_size=2, caption_channels=a["text_hidden"],
            use_additional_conditions=False)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=a["image_size"])
    finally:
        torch.random.set_rng_state(state)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


# SDXL's block structure (text_time conditioning, cross-attn K/V from a 2048-wide context) at toy
# width: every layer kind SDXL has (Linear, 1x1/3x3/stride-2 convs, GEGLU, BOS-skipping K/V).
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=48, attention_head_dim=[4, 8],
    norm_num_groups=8, transformer_layers_per_block=1, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)


def build_unet(config: Mapping[str, Any] | str = "tiny", device="cpu", dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A UNet alone: ``tiny`` (:data:`TINY_UNET`), ``sdxl`` (the full-size shipped config) or a config mapping."""
    from diffusers import UNet2DConditionModel

    from .spec import REFERENCE_DIR

    if config == "tiny":
        config = TINY_UNET
    elif config == "sdxl":
        config = json.loads((REFERENCE_DIR / "sdxl_unet_config.json").read_text())
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(dict(config))
    return unet.to(dtype).eval().requires_grad_(False)


def build_toy_pipeline(family: str, arch: dict[str, Any] | None = None, seed: int = 0):
    """The ``tiny_random`` source: a pipeline of ``family``'s structure at toy scale (SD 2.1 / SD 1.5,
    PixArt-alpha, or SDXL: the built-in tiny model's structure with ``arch`` merged over it)."""
    if family in TINY_SD_FAMILIES:
        return build_tiny_sd_pipeline(arch, seed=seed, family=family)
    if family == "pixart":
        return build_tiny_pixart_pipeline(arch, seed=seed)
    from mixprec.tiny.build import build_pipeline

    return build_pipeline(arch, seed=seed)
