"""Byte accounting: the one definition of what a plan stores, used wherever plans are compared.

Allocation (the byte programs, plan headers), selection (the uniform guard, the refinement's byte
window) and evaluation (equal bytes within 1%) all count through these functions:

* weights of a quantized layer: ``ceil(params * bits / 8)`` codes packed at their nominal width,
  plus one fp16 scale per output channel, or per output channel and group of ``group_size``
  consecutive input columns for grouped layers (``ceil(in_features / group_size)`` groups per row);
  weights are symmetric, so no zero-points (``zero_point=True`` adds one byte per scale);
* a full-precision layer (16 bits, protected or unquantized): ``params * 2`` bytes, no scales;
* activations (per image): ``ceil(elements * bits / 8)`` for the layer's input, 16-bit for
  protected layers; the per-tensor scale and zero-point (6 bytes a layer) are counted too.

Codes are counted at their nominal width, what a bit-packed format stores; mixprec's GPU kernels
keep 3-bit codes in 4-bit containers and 5-7-bit codes in bytes (``mixprec.kernels``), which is a
property of a kernel, not of the plan.
"""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FULL_PRECISION_BITS = 16
SCALE_BYTES = 2  # fp16 scales
ACT_QPARAM_BYTES = 2 + 4  # one fp16 scale and one int32 zero-point per quantized activation tensor
DEFAULT_BYTES_RTOL = 0.01


def _full(bits: Any) -> int:
    return FULL_PRECISION_BITS if bits is None else int(bits)


def weight_layer_bytes(params: int, out_channels: int, bits: int | None, group_size: int = 0,
                       in_features: int | None = None, zero_point: bool = False) -> int:
    """Stored bytes of one layer's weights at ``bits`` (None or >= 16: full precision, no scales)."""
    b = _full(bits)
    params, out_channels = int(params), int(out_channels)
    if b >= FULL_PRECISION_BITS:
        return params * b // 8
    scales = out_channels
    if group_size:
        fan_in = int(in_features) if in_features else params // max(out_channels, 1)
        scales = out_channels * -(-fan_in // int(group_size))
    return -(-params * b // 8) + scales * (SCALE_BYTES + (1 if zero_point else 0))


def weight_plan_bytes(bits: Mapping[str, int | None], params: Mapping[str, int], out_channels: Mapping[str, int],
                      group_size: Mapping[str, int] | None = None,
                      in_features: Mapping[str, int] | None = None) -> int:
    """Stored bytes of a weight plan (``group_size``: layer -> 64/128 for grouped layers)."""
    groups, fan_in = group_size or {}, in_features or {}
    return sum(weight_layer_bytes(params[l], out_channels[l], b, int(groups.get(l) or 0), fan_in.get(l))
               for l, b in bits.items())


def act_layer_bytes(elements: int, bits: int | None) -> int:
    """Bytes of one layer's input activation per image at ``bits`` (full precision: 16 bits, no qparams)."""
    b = _full(bits)
    if b >= FULL_PRECISION_BITS:
        return int(elements) * b // 8
    return -(-int(elements) * b // 8) + ACT_QPARAM_BYTES


def act_plan_bytes(bits: Mapping[str, int | None], act_elems: Mapping[str, int]) -> int:
    return sum(act_layer_bytes(act_elems[l], b) for l, b in bits.items())


@dataclass(frozen=True)
class LayerSizes:
    """What byte accounting needs per layer (from ``layers.csv``): plain dicts, notebook-friendly."""

    params: Mapping[str, int]
    out_channels: Mapping[str, int]
    act_elems: Mapping[str, int]
    in_features: Mapping[str, int] | None = None

    @classmethod
    def of(cls, census: Sequence[Any]) -> "LayerSizes":
        """From census rows (:class:`mixprec.artifacts.CensusLayer` or anything with those attributes)."""
        fan_in = {c.name: int(c.in_features) for c in census if getattr(c, "in_features", None)}
        return cls({c.name: int(c.params) for c in census}, {c.name: int(c.out_channels) for c in census},
                   {c.name: int(c.act_elems) for c in census}, fan_in or None)

    def plan_bytes(self, kind: str, bits: Mapping[str, int | None], group_size: Mapping[str, int] | None = None) -> int:
        """Bytes of a ``weight`` plan (stored weights) or an ``act`` plan (input activations per image)."""
        if kind == "weight":
            return weight_plan_bytes(bits, self.params, self.out_channels, group_size, self.in_features)
        if kind == "act":
            return act_plan_bytes(bits, self.act_elems)
        raise ValueError(f"a plan's kind is weight or act, got {kind!r}")

    def layer_bytes(self, kind: str, layer: str, bits: int | None, group_size: int = 0) -> int:
        if kind == "weight":
            return weight_layer_bytes(self.params[layer], self.out_channels[layer], bits, group_size,
                                      (self.in_features or {}).get(layer))
        return act_layer_bytes(self.act_elems[layer], bits)

    def mean_bits(self, kind: str, bits: Mapping[str, int | None]) -> float | None:
        """Size-weighted mean bits over the quantized layers (full-precision layers left out)."""
        sizes = self.params if kind == "weight" else self.act_elems
        items = [(sizes.get(l, 0), _full(b)) for l, b in bits.items() if _full(b) < FULL_PRECISION_BITS]
        total = sum(s for s, _ in items)
        return sum(s * b for s, b in items) / total if total else None

    def target_bytes(self, kind: str, target_bits: float, layers: Sequence[str], protected: Sequence[str] = ()) -> int:
        """A mean-bit target in bytes: every non-protected layer at ``target_bits`` (between two integer
        widths: linear between their uniform plans), protected ones at 16 bits."""
        lo_b, hi_b = math.floor(target_bits), math.ceil(target_bits)
        lo = self.plan_bytes(kind, uniform_plan(layers, lo_b, protected))
        hi = self.plan_bytes(kind, uniform_plan(layers, hi_b, protected))
        return int(math.floor(lo + (hi - lo) * (target_bits - lo_b)))

    def describe(self, kind: str, bits: Mapping[str, int | None], group_size: Mapping[str, int] | None = None
                 ) -> dict[str, Any]:
        """``{"bytes", "mib", "mean_bits"}`` of a plan: what every comparison prints."""
        n = self.plan_bytes(kind, bits, group_size)
        return {"bytes": n, "mib": n / (1 << 20), "mean_bits": self.mean_bits(kind, bits)}


def uniform_plan(layers: Sequence[str], bits: int, protected: Sequence[str] = ()) -> dict[str, int]:
    """Every layer at ``bits``; ``protected`` ones at full precision (16)."""
    prot = set(protected)
    return {n: (FULL_PRECISION_BITS if n in prot else int(bits)) for n in layers}


def same_bytes(a: int, b: int, rtol: float = DEFAULT_BYTES_RTOL) -> bool:
    """Whether two byte counts are equal within ``rtol`` of the larger one."""
    return abs(int(a) - int(b)) <= rtol * max(int(a), int(b))


def byte_window(budget_bytes: int, rtol: float = DEFAULT_BYTES_RTOL) -> tuple[int, int]:
    """``[ceil((1 - rtol) * budget), budget]``: the plans that count as the same budget."""
    return math.ceil((1.0 - rtol) * int(budget_bytes)), int(budget_bytes)
