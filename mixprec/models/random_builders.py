"""Full-size architectures with random weights, from the configs shipped in ``mixprec/reference``
(speed, memory and census work where no checkpoint can be downloaded)."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from .schedulers import make_scheduler
from .spec import REFERENCE_DIR


def build_random_pipeline(family: str, seed: int = 0, device: str | torch.device = "cpu"):
    """The full-size architecture of ``family`` with random weights, from configs shipped in the package.

    Random weights are meaningless for image quality but exact for layer census, speed and memory.
    The tokenizer is the tiny model's (real CLIP and T5 vocabularies cannot be shipped); prompts of
    its vocabulary work, and the text encoders keep the full-size architecture.
    """
    cfg = _family_configs(family)
    if "transformer" in cfg:
        return _build_random_pixart_pipeline(cfg, seed, device)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mixprec.tiny.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])) if "text_encoder_2" in cfg else None
    tok = build_tokenizer(model_max_length=77)
    scheduler = make_scheduler(cfg["scheduler"])
    if te2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _build_random_pixart_pipeline(cfg: dict[str, Any], seed: int, device: str | torch.device):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from mixprec.tiny.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = PixArtTransformer2DModel.from_config(cfg["transformer"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = T5EncoderModel(T5Config(**cfg["text_encoder"]))
    tok = build_tokenizer(model_max_length=cfg.get("max_sequence_length", 120))
    scheduler = DPMSolverMultistepScheduler.from_config(cfg["scheduler"])
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


def _family_configs(family: str) -> dict[str, dict[str, Any]]:
    path = REFERENCE_DIR / f"{family}_configs.json"
    if not path.exists():
        known = sorted(p.name[: -len("_configs.json")] for p in REFERENCE_DIR.glob("*_configs.json"))
        raise ValueError(f"no shipped configs for model family {family!r}; known: {known}")
    configs = json.loads(path.read_text())
    if "unet_file" in configs:
        configs["unet"] = json.loads((REFERENCE_DIR / configs.pop("unet_file")).read_text())
    return configs


def build_random_denoiser(family: str, device: str | torch.device = "meta") -> nn.Module:
    """Only the denoiser of ``family`` (UNet or transformer); on the meta device it costs no memory (census)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    cfg = _family_configs(family)
    with torch.device(device):
        if "transformer" in cfg:
            return PixArtTransformer2DModel.from_config(cfg["transformer"])
        return UNet2DConditionModel.from_config(cfg["unet"])


def family_text_length(family: str) -> int:
    """Tokens of the text encoder's output the denoiser attends to (CLIP: 77; PixArt-alpha's T5: 120)."""
    return int(_family_configs(family).get("max_sequence_length", 77))
