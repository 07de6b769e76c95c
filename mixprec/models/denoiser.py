"""The denoiser inside a pipeline (UNet or transformer): finding it, its inputs, its text and latent sizes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


DENOISER_ATTRIBUTES = ("unet", "transformer")


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` (SD, SDXL) or ``pipe.transformer`` (PixArt)."""
    attr = _denoiser_attribute(pipe)
    return getattr(pipe, attr)


def replace_denoiser(pipe, module: nn.Module) -> nn.Module:
    """Put ``module`` in the denoiser's place (``pipe.unet`` or ``pipe.transformer``); returns the one it replaced."""
    attr = _denoiser_attribute(pipe)
    previous = getattr(pipe, attr)
    setattr(pipe, attr, module)
    return previous


def _denoiser_attribute(pipe) -> str:
    for attr in DENOISER_ATTRIBUTES:
        if getattr(pipe, attr, None) is not None:
            return attr
    raise TypeError(f"{type(pipe).__name__} has no denoiser (neither 'unet' nor 'transformer'); mixprec needs a "
                    f"text-to-image diffusion pipeline with a UNet or a diffusion transformer")


def is_transformer(denoiser: nn.Module) -> bool:
    """A patch-based diffusion transformer (PixArt): latents go in as ``hidden_states``, not ``sample``."""
    return "hidden_states" in _forward_parameters(denoiser) and "sample" not in _forward_parameters(denoiser)


def latent_input_name(denoiser: nn.Module) -> str:
    return "hidden_states" if is_transformer(denoiser) else "sample"


def _forward_parameters(denoiser: nn.Module) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(type(denoiser).forward).parameters)


def text_starts_with_bos(pipe) -> bool:
    """Whether prompts are encoded with a leading BOS token (CLIP: yes; T5: no).

    Cross-attention K/V keep that token in full precision (``quant.skip_bos``) because CLIP's BOS
    state is a huge, prompt-independent outlier; without a BOS the first token is an ordinary word.
    """
    tok = getattr(pipe, "tokenizer", None)
    if tok is None or tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tok.bos_token_id



def denoiser_example_inputs(denoiser: nn.Module, batch: int, latent_size: int, text_len: int = 77,
                            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            generator: torch.Generator | None = None) -> dict[str, Any]:
    """Keyword inputs of the right shapes for one denoiser call, as its pipeline passes them.

    UNets get SD or SDXL conditioning; PixArt transformers get a per-sample timestep, the
    resolution / aspect-ratio micro-conditions when the model uses them (1024 px models), and an
    all-ones text mask (the pipeline always passes one, and a mask can change which attention
    kernel runs). Zeros, or standard normal values drawn from ``generator`` (timestep 999 either way).
    """
    cfg = denoiser.config

    def values(*shape):
        if generator is None:
            return torch.zeros(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator).to(device, dtype)

    pixels = latent_size * 8
    text_dim = cfg.caption_channels if is_transformer(denoiser) else cfg.cross_attention_dim
    kwargs: dict[str, Any] = {
        latent_input_name(denoiser): values(batch, cfg.in_channels, latent_size, latent_size),
        "encoder_hidden_states": values(batch, text_len, text_dim),
    }
    if is_transformer(denoiser):
        kwargs["timestep"] = torch.full((batch,), 999, device=device, dtype=torch.long)
        kwargs["encoder_attention_mask"] = torch.ones(batch, text_len, device=device, dtype=torch.long)
        if getattr(denoiser, "use_additional_conditions", False):
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.tensor([[pixels, pixels]] * batch, device=device, dtype=dtype),
                "aspect_ratio": torch.ones(batch, 1, device=device, dtype=dtype),
            }
        else:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kwargs
    kwargs["timestep"] = torch.tensor(999, device=device)
    if cfg.addition_embed_type == "text_time":
        n_time = 6
        pooled_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": values(batch, pooled_dim),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=dtype),
        }
    if getattr(cfg, "time_cond_proj_dim", None):
        # LCM's guidance embedding: without it the denoiser skips its cond_proj layer.
        kwargs["timestep_cond"] = values(batch, cfg.time_cond_proj_dim)
    return kwargs


def measure_act_elems(denoiser: nn.Module, latent_size: int, text_len: int = 77) -> dict[str, int]:
    """Input-activation elements per image of every Linear/Conv2d, from one forward of batch 1.

    Works on the meta device (shapes only), so full-size models cost no memory or time.
    """
    from mixprec.quantizers import QuantLayer

    device = next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    sizes: dict[str, int] = {}
    hooks = []
    for name, module in denoiser.named_modules():
        if isinstance(module, QuantLayer):
            key, target = module.name, module
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not name.endswith(".inner"):
            key, target = name, module
        else:
            continue

        def hook(_m, args, _key=key):
            sizes[_key] = sizes.get(_key, 0) + int(args[0].numel())
        hooks.append(target.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            denoiser(**denoiser_example_inputs(denoiser, 1, latent_size, text_len, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def latent_size(pipe, resolution: int) -> int:
    return resolution // pipe.vae_scale_factor


# PixArt pipelines pad prompts to a fixed length that is a pipeline argument, not a tokenizer property.
PIXART_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def text_length(pipe) -> int:
    """Text tokens the denoiser's cross-attention sees per prompt."""
    if type(pipe).__name__ in PIXART_MAX_SEQUENCE_LENGTH:
        return PIXART_MAX_SEQUENCE_LENGTH[type(pipe).__name__]
    tok = getattr(pipe, "tokenizer", None)
    return int(tok.model_max_length) if tok is not None else 77
