"""What identifies a denoiser's architecture: its class, config and quantizable layer shapes.

Both the conversion to kernel modules (which stamps converted models with it) and checkpoints
(which refuse a file made for another architecture) use it; it lives apart from both so neither
imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from mixprec.quantizers import QUANTIZABLE_TYPES, QuantLayer
from mixprec.workspace import fingerprint

_CONFIG_NOISE = ("_name_or_path", "_diffusers_version", "_use_default_values", "_class_name")


def _config_dict(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    d = dict(cfg) if isinstance(cfg, Mapping) else dict(vars(cfg))
    return {k: v for k, v in d.items() if k not in _CONFIG_NOISE and not k.startswith("_")}


def quantizable_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Original weight shape of every quantizable layer, whether wrapped, converted or plain."""
    from .layers import KernelLayer

    out: dict[str, list[int]] = {}
    inner_ids: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            out[mod.name] = list(mod.inner.weight.shape)
            inner_ids.add(id(mod.inner))
        elif isinstance(mod, KernelLayer):
            s = mod.spec
            out[s.name] = ([s.out_features, s.in_features, *s.kernel_size] if s.kind == "conv"
                           else [s.out_features, s.in_features])
        elif isinstance(mod, QUANTIZABLE_TYPES) and id(mod) not in inner_ids:
            out[name] = list(mod.weight.shape)
    return dict(sorted(out.items()))


def architecture_fingerprint(model: nn.Module) -> str:
    """Hash of the model class, its config and the shapes of its quantizable layers."""
    stored = getattr(model, "_mixprec_arch", None)
    if stored:
        return stored
    return fingerprint({"class": type(model).__name__, "config": _config_dict(model),
                        "layers": quantizable_shapes(model)})
