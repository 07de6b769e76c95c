"""Helpers shared by the kernel tests and the device benchmarks: small UNets, random denoiser
inputs, calibration on random data, plans, SQNR."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mixprec.quantizers import QuantLayer, quantize_

SDXL_CONFIG = Path(__file__).resolve().parents[1] / "reference" / "sdxl_unet_config.json"

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
    from diffusers import UNet2DConditionModel

    if config == "tiny":
        config = TINY_UNET
    elif config == "sdxl":
        config = json.loads(SDXL_CONFIG.read_text())
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(dict(config))
    return unet.to(dtype).eval().requires_grad_(False)


def denoiser_inputs(denoiser: nn.Module, batch: int = 1, latent: int | None = None, text_len: int | None = None,
                    seed: int = 0, device=None, dtype=None) -> dict[str, Any]:
    """Random (not zero) inputs of the right shapes for a UNet or a PixArt transformer; timestep 999.

    ``text_len`` defaults to what the model's pipeline passes: 77 CLIP tokens, or PixArt-alpha's 120.
    """
    from mixprec.models import PIXART_MAX_SEQUENCE_LENGTH, denoiser_example_inputs, is_transformer

    p = next(denoiser.parameters())
    if text_len is None:
        text_len = PIXART_MAX_SEQUENCE_LENGTH["PixArtAlphaPipeline"] if is_transformer(denoiser) else 77
    return denoiser_example_inputs(denoiser, batch, latent or denoiser.config.sample_size, text_len,
                                   device=device or p.device, dtype=dtype or p.dtype,
                                   generator=torch.Generator("cpu").manual_seed(seed))


def calibrate_random(model: nn.Module, run: Callable[[], None], weight_bits=(2, 4, 8), act_bits=(4, 8),
                     skip_bos: bool = True) -> dict[str, QuantLayer]:
    """Wrap ``model`` with QuantLayers and calibrate them while ``run()`` drives it."""
    from mixprec.calibration import calibrate_layers

    layers = quantize_(model, skip_bos=skip_bos)
    calibrate_layers(layers, run, weight_bits, act_bits)
    return layers


def uniform_plan(layers: Mapping[str, QuantLayer], w_bits: int | None, a_bits: int | None,
                 keep_fp: Callable[[str], bool] | None = None) -> tuple[dict, dict]:
    wp, ap = {}, {}
    for name in layers:
        if keep_fp is not None and keep_fp(name):
            continue
        wp[name], ap[name] = w_bits, a_bits
    return wp, ap


@torch.no_grad()
def cast_floating_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters/buffers in place, the non-persistent ones too, without the
    warnings diffusers prints for ``ModelMixin.to(dtype)``."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point():
                mod._buffers[name] = b.to(dtype)
    return model


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(sig / noise)
