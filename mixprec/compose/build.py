"""The compose model's architecture: SDXL's pipeline and UNet layout at a small width.

Built by the tiny model's builder (`mixprec.tiny.build.build_pipeline`) with this model's caption
vocabulary and sizes: a UNet2DConditionModel with SDXL's three levels (DownBlock2D,
CrossAttnDownBlock2D, CrossAttnDownBlock2D and the mirrored up blocks), two resnets per level,
1 / 2 / 4 transformer layers at levels 2 / 3 / mid (SDXL: 2 / 10 / 10), "text_time" added
conditioning, two CLIP text encoders (penultimate states concatenated; pooled projection of the
second) and an AutoencoderKL (128x128 RGB <-> 32x32x4).

Sampling is few-step: DPM-Solver++ on the 4 "trailing" timesteps 999, 749, 499, 249 of a zero
terminal SNR schedule, the only timesteps the denoiser is trained at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import StableDiffusionXLPipeline

from mixprec.models import toy
from mixprec.tiny import build as tiny_build
from mixprec.tiny.tokenizer import build_tokenizer, load_tokenizer

from .scenes import IMAGE_SIZE, VOCABULARY, longest_caption
from .spec import NUM_INFERENCE_STEPS  # noqa: F401 (shared with training: mixprec.compose.spec)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "compose"
MODEL_MAX_LENGTH = 20  # the longest caption needs 15 words + BOS + EOS

COMPOSE_ARCH: dict[str, Any] = {
    "image_size": IMAGE_SIZE,
    "unet": {
        "block_out_channels": [64, 96, 128],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        # The first level has no attention (DownBlock2D); the mid block takes the last entry.
        "transformer_layers_per_block": [1, 2, 4],
        # Number of heads per level (diffusers' naming quirk, as in SDXL's config): head width 48 / 64.
        "attention_head_dim": [2, 2, 2],
        "norm_num_groups": 8,
        "addition_time_embed_dim": 32,
    },
    # The tiny model's VAE layout at more width; 8-16 channels per group: fewer would normalise a flat
    # colour away (see docs/tiny_model.md).
    "vae": toy.merge_arch(toy.TINY_ARCH["vae"], {"block_out_channels": [32, 48, 48], "norm_num_groups": 4}),
    "text_encoder": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 2},
    "text_encoder_2": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 3,
                       "num_attention_heads": 3, "projection_dim": 192},
    "max_length": MODEL_MAX_LENGTH,
    "scheduler": dict(toy.TINY_ARCH["scheduler"]),
}

# The same structure (three levels, 1/2/2 transformer layers) at the smallest width: for tests.
MICRO_ARCH: dict[str, Any] = toy.merge_arch(COMPOSE_ARCH, {
    "unet": {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2],
             "attention_head_dim": [2, 2, 2], "norm_num_groups": 4, "addition_time_embed_dim": 4},
    "vae": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4},
    "text_encoder": toy.MICRO_ARCH["text_encoder"],
    "text_encoder_2": toy.MICRO_ARCH["text_encoder_2"],
})


def make_tokenizer(model_max_length: int = MODEL_MAX_LENGTH):
    """A verified CLIPTokenizer (BPE learned by mixprec.tiny.tokenizer) for the scene vocabulary."""
    return build_tokenizer(model_max_length=model_max_length, words=VOCABULARY, longest_caption=longest_caption())


def check_tokenizer(folder: Path):
    return load_tokenizer(folder, words=VOCABULARY, longest_caption=longest_caption())


def build_pipeline(arch: Mapping[str, Any] | None = None, seed: int = 0) -> StableDiffusionXLPipeline:
    """A compose pipeline with random weights; `arch` is deep-merged over COMPOSE_ARCH."""
    return tiny_build.build_pipeline(arch, seed=seed, base=COMPOSE_ARCH, make_tokenizer=make_tokenizer)


def load_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """Load a saved compose pipeline offline (default: the packaged one), tokenizers verified."""
    return tiny_build.load_pipeline(path, device, dtype, default_folder=ASSET_DIR, check_tokenizer=check_tokenizer,
                                    train_stage="train_compose")


def parameter_counts(pipe: StableDiffusionXLPipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
