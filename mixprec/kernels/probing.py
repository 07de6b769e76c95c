"""Probing a denoiser without a pipeline: random inputs of the right shapes, calibration on them,
uniform plans, casting, output SQNR. stage=benchmark drives and compares denoisers with these; the
kernel tests and device benchmarks use them too (toy UNets: :mod:`mixprec.models.toy`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from mixprec.quantizers import QuantLayer, quantize_

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


def pipeline_denoiser_inputs(pipe, captions: list[str], num_inference_steps: int, guidance_scale: float = 0.0,
                             seed: int = 0, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """The keyword inputs ``pipe`` gives its denoiser when it generates ``captions``: one dict per
    sampler call (batch ``len(captions)``, twice that under classifier-free guidance), captured by a
    forward pre-hook, floating tensors cast to ``dtype`` (default: unchanged).

    Why: a trained model fed random tensors runs its activations outside their calibrated ranges,
    where a quantized denoiser is far more chaotic than in use; agreement between two roundings of a
    plan measured on these inputs is what a quantized pipeline sees."""
    from mixprec.generation import clone_tensors

    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    captured: list[dict[str, Any]] = []

    def record(_module, args, kwargs):  # diffusers passes sample and timestep positionally
        captured.append(clone_tensors({**dict(zip(("sample", "timestep"), args)), **kwargs}, dtype))

    hook = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(captions, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 output_type="latent", generator=torch.Generator("cpu").manual_seed(seed))
    finally:
        hook.remove()
    for kwargs in captured:
        kwargs.pop("return_dict", None)  # the caller chooses
        sample = kwargs["sample"]
        kwargs["timestep"] = torch.as_tensor(kwargs["timestep"], device=sample.device).reshape(-1).expand(len(sample))
    return captured


def perturb_latent(inputs: dict[str, Any], relative: float, seed: int = 5) -> dict[str, Any]:
    """``inputs`` with the latent (the 4-d tensor) multiplied by ``1 + relative * noise``.

    The stability probe of a quantized reference: with quantized activations a denoiser is a step
    function, so rounding-level differences before a quantizer move codes by one step and the moves
    spread; the reference's output SQNR under this perturbation is about as close as any other
    rounding of the same plan (another GEMM order, kernels, inductor's fusion) can get to it."""
    key = "sample" if "sample" in inputs else next(k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() == 4)
    latent = inputs[key]
    noise = torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(latent.device)
    return {**inputs, key: (latent.float() * (1 + relative * noise)).to(latent.dtype)}


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
