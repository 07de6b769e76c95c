"""Regional compilation: ``torch.compile`` each repeated block of a denoiser, not the whole graph.

An SDXL UNet compiled whole took 105 s (bf16) and 238 s (fp8 Linear plan) on an H200: inductor
lowers every one of its ~70 transformer blocks although they are copies of two shapes. Compiling
each block in place (``nn.Module.compile``) lowers each distinct (class, input shape) once; the
other blocks of that shape reuse the compiled code (Dynamo guards on the module's class and
shapes, its parameters and buffers are graph inputs). What stays eager: the glue between blocks
(time embedding, conv_in/conv_out, up/downsamplers, skip concatenations), which a CUDA graph
around the call runs without launch gaps. This is diffusers' ``compile_repeated_blocks``, for models
that do not name their repeated blocks (``UNet2DConditionModel`` does not).

For a quantized model to share compiled blocks, a :class:`~mixprec.kernels.KernelLayer` must not
hand Dynamo per-layer Python constants (they would be baked into each block's graph): its
activation scales are buffers (``KernelLayer._quant_fp8`` / ``_quant_int``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

# The blocks that hold every Linear layer of a diffusers UNet (Transformer2DModel: proj_in, the
# transformer blocks, proj_out) and the resnets (GroupNorm, SiLU, convs, time projection); in a
# PixArt-style transformer (no Transformer2DModel inside) its BasicTransformerBlocks; in a VAE
# decoder its resnets. Only the outermost match is compiled, so one tuple serves all three.
UNET_REGIONS = ("Transformer2DModel", "ResnetBlock2D")
DEFAULT_REGIONS = ("Transformer2DModel", "BasicTransformerBlock", "ResnetBlock2D")


def region_names(model: nn.Module, classes: Iterable[str]) -> list[str]:
    """Names of the outermost submodules of ``model`` whose class name is in ``classes``."""
    wanted = set(classes)
    names: list[str] = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in wanted and not any(name.startswith(f"{n}.") for n in names):
            names.append(name)
    return names


def compile_regions(model: nn.Module, classes: Iterable[str] = DEFAULT_REGIONS, recompile_limit: int = 256,
                    **compile_kwargs) -> list[str]:
    """Compile, in place, every outermost submodule of ``model`` whose class is in ``classes``
    (``compile_kwargs`` go to ``torch.compile``); returns their names.

    The regions of one class share one Dynamo cache (their ``forward``'s), one entry per distinct
    input shape and layout (an SDXL UNet at one resolution: 12 resnet shapes, 2 transformer ones),
    so the recompile limit is raised to ``recompile_limit``: at the default (8) the later resnet
    shapes would silently run eager.
    """
    classes = tuple(classes)
    names = region_names(model, classes)
    if not names:
        found = sorted({type(m).__name__ for m in model.modules()})[:40]
        raise ValueError(f"compile_regions: no submodule of class {list(classes)} in {type(model).__name__}; "
                         f"its classes include {found}")
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), recompile_limit))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * recompile_limit)
    for name in names:
        model.get_submodule(name).compile(**compile_kwargs)
    return names
