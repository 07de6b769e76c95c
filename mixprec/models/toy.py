"""Toy-scale pipelines and denoisers with random weights: one place for every toy builder.

SD 2.1 / SD 1.5 / PixArt-alpha pipelines (``tiny_random`` tests), the SDXL-structured pipeline the
built-in tiny and compose models are trained from (:func:`build_tiny_sdxl_pipeline`: ``TINY_ARCH``,
and ``MICRO_ARCH`` for sub-second tests), and the SDXL-structured tiny UNet for the kernel checks.
Loading and sampling the trained tiny model stay in :mod:`mixprec.tiny.build`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
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

def merge_arch(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """Deep-merge override into a copy of base (nested dicts merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for k, v in (override or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_arch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# Smallest arch with the same structure: builds in a fraction of a second, for tests.
MICRO_ARCH: dict[str, Any] = merge_arch(TINY_ARCH, {
    "unet": {"block_out_channels": [8, 16], "attention_head_dim": [2, 2], "addition_time_embed_dim": 4},
    "vae": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4},
    "text_encoder": {"hidden_size": 8, "intermediate_size": 16},
    "text_encoder_2": {"hidden_size": 8, "intermediate_size": 16, "projection_dim": 8},
})

def _vae_scale_factor(arch: Mapping[str, Any]) -> int:
    return 2 ** (len(arch["vae"]["block_out_channels"]) - 1)


def _arch_latent_size(arch: Mapping[str, Any]) -> int:
    return arch["image_size"] // _vae_scale_factor(arch)


def _text_config(t: Mapping[str, Any], tok, max_length: int):
    from transformers import CLIPTextConfig

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


def _tiny_scheduler(sched: Mapping[str, Any]):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    sched = dict(sched)
    cls = {"DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
           "EulerDiscreteScheduler": EulerDiscreteScheduler}[sched.pop("class")]
    if cls is DPMSolverMultistepScheduler:
        sched.setdefault("algorithm_type", "dpmsolver++")
        sched.setdefault("solver_order", 2)
        sched.setdefault("final_sigmas_type", "zero")
    return cls(**sched)


def _tiny_sdxl_unet(arch: Mapping[str, Any], text_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    u, v = arch["unet"], arch["vae"]
    n_levels = len(u["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=_arch_latent_size(arch),
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
        cross_attention_dim=text_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=u["addition_time_embed_dim"],
        # 6 micro-conditioning numbers (original size, crop corner, target size) + pooled text.
        projection_class_embeddings_input_dim=6 * u["addition_time_embed_dim"] + pooled_dim,
    )


def _tiny_sdxl_vae(arch: Mapping[str, Any]):
    from diffusers import AutoencoderKL

    v = arch["vae"]
    n_vae = len(v["block_out_channels"])
    return AutoencoderKL(
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


def build_tiny_sdxl_pipeline(arch: Mapping[str, Any] | None = None, seed: int = 0,
                             base: Mapping[str, Any] = TINY_ARCH, make_tokenizer: Callable[[int], Any] | None = None):
    """A StableDiffusionXLPipeline with random weights (deterministic in seed), float32 on CPU.

    `arch` is deep-merged over `base` (TINY_ARCH), so {"unet": {"block_out_channels": [16, 32]}} is
    a valid override; pass MICRO_ARCH for the fastest model with the same structure. Another
    model's caption vocabulary comes in through `make_tokenizer(model_max_length)`.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from mixprec.tiny.tokenizer import build_tokenizer

    arch = merge_arch(base, arch)
    max_length = int(arch["max_length"])
    make_tokenizer = make_tokenizer or (lambda n: build_tokenizer(model_max_length=n))
    tok = make_tokenizer(max_length)
    tok2 = make_tokenizer(max_length)
    gen_state = torch.random.get_rng_state()
    try:
        # construction order fixes which random numbers each module's weights get
        torch.manual_seed(seed)
        te = CLIPTextModel(_text_config(arch["text_encoder"], tok, max_length))
        te2 = CLIPTextModelWithProjection(_text_config(arch["text_encoder_2"], tok2, max_length))
        unet = _tiny_sdxl_unet(arch, te.config.hidden_size + te2.config.hidden_size, te2.config.projection_dim)
        vae = _tiny_sdxl_vae(arch)
    finally:
        torch.random.set_rng_state(gen_state)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=_tiny_scheduler(arch["scheduler"]), force_zeros_for_empty_prompt=True, add_watermarker=False)


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
    return build_tiny_sdxl_pipeline(arch, seed=seed)
