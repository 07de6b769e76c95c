"""A mixprec plan as torchao per-layer configs, for use without mixprec.

:func:`torchao_export` maps every layer of a plan to the torchao config that quantizes it to the
same bit-widths, where torchao has one:

- Linear, ``w`` in 2..8 bits, 16-bit activations -> ``IntxWeightOnlyConfig(int<w>, PerAxis(0), symmetric)``;
- Linear, ``w`` in 2..8 bits, 8-bit activations  -> ``Int8DynamicActivationIntxWeightConfig(int<w>,
  PerAxis(0))`` (torchao quantizes activations dynamically per token; mixprec's calibrated scale is
  static per tensor), or weight-only with ``activations="weight_only"``;
- full-precision layers are left out (they stay 16 bit);
- Conv2d, 16-bit activations -> ``IntxWeightOnlyConfig`` as well (torchao then keeps one scale per
  output channel and kernel tap, finer than mixprec's per output channel);
- everything else is listed in ``unsupported`` with the reason: quantized activations on a
  convolution (torchao's dynamic-activation configs take 2-d weights only), activation bits other
  than 8, and activation-only quantization.

Weights use per-output-channel symmetric scales in both, but torchao picks its own scale
(``max|w| / ((qmax - qmin) / 2)`` over the full signed range) where mixprec uses
``max|w| / (2^(b-1) - 1)`` and its calibrated clipping: the bit-widths are the plan's exactly, the
values are torchao's rounding of the same weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mixprec.workspace import atomic_write_text

FORMAT = "mixprec-torchao-export"
ACTIVATION_MODES = ("dynamic_int8", "weight_only")
TORCHAO_WEIGHT_BITS = tuple(range(2, 9))


def _require_torchao():
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ImportError("exporting to torchao needs the torchao package: pip install 'mixprec[export]' "
                          "(or pip install torchao)") from exc
    return torchao


@dataclass
class TorchaoExport:
    """A plan as torchao configs: module name (relative to the denoiser) -> config, plus what is not exported."""

    configs: dict[str, Any]
    unsupported: dict[str, str] = field(default_factory=dict)
    full_precision: list[str] = field(default_factory=list)
    plan: dict[str, dict[str, int | None]] = field(default_factory=dict)

    def fqn_config(self):
        """One ``torchao.quantization.FqnToConfig`` for ``torchao.quantization.quantize_``."""
        from torchao.quantization import FqnToConfig

        return FqnToConfig(dict(self.configs))

    def to_dict(self) -> dict[str, Any]:
        from torchao.core.config import config_to_dict

        torchao = _require_torchao()
        return {"format": FORMAT, "torchao_version": torchao.__version__,
                "config": config_to_dict(self.fqn_config()), "unsupported": self.unsupported,
                "full_precision": self.full_precision, "plan": self.plan,
                "usage": "from torchao.core.config import config_from_dict; from torchao.quantization import quantize_; "
                         "quantize_(pipe.unet, config_from_dict(data['config']), filter_fn=None)"}


def torchao_config_for(kind: str, w_bits: int | None, a_bits: int | None,
                       activations: str = "dynamic_int8", group_size: int = 0) -> tuple[Any | None, str]:
    """(config, reason): the torchao config for one layer, or None and why there is none.
    ``group_size``: per-group weight scales (the plan's ``group_size``), torchao's ``PerGroup``."""
    _require_torchao()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    if w_bits is None and a_bits is None:
        return None, "full precision"
    if w_bits is None:
        return None, f"activation-only quantization (A{a_bits}, 16-bit weights) has no torchao config"
    if w_bits not in TORCHAO_WEIGHT_BITS:
        return None, f"{w_bits}-bit weights: torchao's integer configs take 2..8 bits"
    if group_size and kind != "linear":
        return None, (f"per-group weight scales (group size {group_size}) on a convolution: torchao's per-group "
                      f"granularity takes Linear (2-d) weights only")
    dtype = getattr(torch, f"int{w_bits}")
    granularity = PerGroup(int(group_size)) if group_size else PerAxis(0)
    if a_bits is None or activations == "weight_only":
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity, mapping_type=MappingType.SYMMETRIC), ""
    if kind != "linear":
        return None, (f"A{a_bits} on a convolution: torchao's dynamic-activation configs take Linear (2-d) weights "
                      f"only (activations='weight_only' exports its weights)")
    if a_bits != 8:
        return None, f"{a_bits}-bit activations: torchao quantizes activations to 8 bits only"
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity,
                                                 weight_mapping_type=MappingType.SYMMETRIC), ""


def _norm(bits: Any) -> int | None:
    return None if bits is None or int(bits) >= 16 else int(bits)


def torchao_export(weight_bits: Mapping[str, int | None], act_bits: Mapping[str, int | None] | None,
                   layer_kinds: Mapping[str, str], activations: str = "dynamic_int8",
                   weight_groups: Mapping[str, int] | None = None) -> TorchaoExport:
    """Map a plan (layer -> weight bits, layer -> activation bits; None/16 = full precision) to torchao.

    ``layer_kinds`` gives each layer's kind, ``"linear"`` or ``"conv"`` (:func:`layer_kinds`);
    ``weight_groups`` the weight plan's per-group layers (``Plan.group_size``).
    """
    act_bits, groups = dict(act_bits or {}), dict(weight_groups or {})
    unknown = sorted((set(weight_bits) | set(act_bits)) - set(layer_kinds))
    if unknown:
        raise KeyError(f"the plan names {len(unknown)} layers the model does not have (e.g. {unknown[:3]}); "
                       f"was it made for another model?")
    out = TorchaoExport(configs={})
    for name, kind in layer_kinds.items():
        w, a = _norm(weight_bits.get(name)), _norm(act_bits.get(name))
        g = int(groups.get(name) or 0) if w is not None else 0
        out.plan[name] = {"w": w, "a": a} | ({"g": g} if g else {})
        config, reason = torchao_config_for(kind, w, a, activations, g)
        if config is not None:
            out.configs[name] = config
        elif w is None and a is None:
            out.full_precision.append(name)
        else:
            out.unsupported[name] = reason
    return out


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """``linear``/``conv`` of every quantizable layer by its original name (plain, wrapped or converted)."""
    from mixprec.kernels.architecture import quantizable_shapes

    return {name: "conv" if len(shape) == 4 else "linear" for name, shape in quantizable_shapes(model).items()}


def write_torchao_export(path: str | os.PathLike, export: TorchaoExport) -> Path:
    return atomic_write_text(path, json.dumps(export.to_dict(), indent=2) + "\n")


def read_torchao_config(path: str | os.PathLike):
    """The ``FqnToConfig`` of an export file (only torchao is needed to use it)."""
    _require_torchao()
    from torchao.core.config import config_from_dict

    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mixprec torchao export (format={data.get('format')!r})")
    return config_from_dict(data["config"])


def apply_torchao(model: nn.Module, export: TorchaoExport | str | os.PathLike) -> nn.Module:
    """Quantize a plain model in place with torchao's ``quantize_`` and the exported configs."""
    from torchao.quantization import quantize_

    config = export.fqn_config() if isinstance(export, TorchaoExport) else read_torchao_config(export)
    quantize_(model, config, filter_fn=None)
    return model


def torchao_bits(model: nn.Module) -> dict[str, dict[str, int | None]]:
    """What torchao actually did to each Linear/Conv2d: weight bits read from the quantized tensor
    (its target dtype, with its integer codes checked to lie in that range) and activation bits."""
    out: dict[str, dict[str, int | None]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weight = module.weight
        target = getattr(weight, "target_dtype", None)
        if target is None:
            out[name] = {"w": None, "a": None}
            continue
        bits = int(str(target).replace("torch.int", ""))
        codes = weight.qdata
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if int(codes.min()) < lo or int(codes.max()) > hi:
            raise ValueError(f"{name}: torchao codes span [{int(codes.min())}, {int(codes.max())}], outside int{bits}")
        act = getattr(weight, "activation_quantization", None)
        out[name] = {"w": bits, "a": 8 if act and "int8" in str(act) else None}
    return out
