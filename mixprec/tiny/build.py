"""Load and sample the built-in tiny model (an SDXL-structured pipeline at toy scale).

Its architecture and random-weight builder live with the other toy builders in
:mod:`mixprec.models.toy` (``TINY_ARCH``, ``MICRO_ARCH``, :func:`~mixprec.models.toy.build_tiny_sdxl_pipeline`);
the names below keep ``mixprec.tiny.build.build_pipeline`` working for the training code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from mixprec.models.toy import build_tiny_sdxl_pipeline as build_pipeline  # noqa: F401

from .tokenizer import load_tokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"



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
