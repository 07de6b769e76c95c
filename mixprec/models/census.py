"""The census of a denoiser's quantizable layers: one :class:`LayerInfo` per Linear/Conv2d (``layers.csv``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn


@dataclass
class LayerInfo:
    name: str
    type: str  # "Linear" | "Conv2d"
    group: str  # "content" | "quality"
    params: int
    out_channels: int
    in_features: int
    kernel: str  # "1x1", "3x3" or "" for Linear
    act_elems: int  # input-activation elements per image (0 when not measured)
    block: str  # coarse position: down_blocks.1, mid_block, up_blocks.0, conv_in, transformer_blocks.3, ...
    excluded: bool = False
    protected: bool = False

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


CENSUS_COLUMNS = list(LayerInfo.__dataclass_fields__)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a whole dotted component (``ff`` matches ``...ff.net.2`` but not ``buff``),
    or, when it contains a dot or regex characters, is searched as a regular expression."""
    parts = name.split(".")
    for pat in patterns:
        if re.fullmatch(r"[A-Za-z0-9_]+", pat):
            if pat in parts:
                return True
        elif re.search(pat, name):
            return True
    return False


def layer_group(name: str, content_patterns: Sequence[str]) -> str:
    return "content" if _matches(name, content_patterns) else "quality"


def block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks", "transformer_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def census(denoiser: nn.Module, content_patterns: Sequence[str], exclude_patterns: Sequence[str] = (),
           act_elems: dict[str, int] | None = None) -> list[LayerInfo]:
    """Every Linear/Conv2d of the denoiser (QuantLayer wrappers are looked through), in module order."""
    from mixprec.quantizers import QuantLayer

    rows: list[LayerInfo] = []
    for name, module in denoiser.named_modules():
        if isinstance(module, QuantLayer):
            name, module = module.name, module.inner
        elif not isinstance(module, (nn.Linear, nn.Conv2d)) or name.endswith(".inner"):
            continue
        is_conv = isinstance(module, nn.Conv2d)
        rows.append(LayerInfo(
            name=name,
            type="Conv2d" if is_conv else "Linear",
            group=layer_group(name, content_patterns),
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            out_channels=module.out_channels if is_conv else module.out_features,
            in_features=(module.in_channels * module.kernel_size[0] * module.kernel_size[1]) if is_conv else module.in_features,
            kernel=f"{module.kernel_size[0]}x{module.kernel_size[1]}" if is_conv else "",
            act_elems=int((act_elems or {}).get(name, 0)),
            block=block_of(name),
            excluded=_matches(name, exclude_patterns) if exclude_patterns else False,
        ))
    return rows
