"""Quantizers and the switchable quantized layer.

Weights: symmetric, per output channel, integer range [-(2^(b-1)-1), 2^(b-1)-1]; the scale is
computed separately for every bit-width (never reusing the 8-bit scale at low bits), optionally
with a clipping search that minimises the weight MSE.
Activations: asymmetric, per tensor, static, from a running min/max (momentum) over calibration.

:class:`QuantLayer` wraps one ``nn.Linear``/``nn.Conv2d``. Its weight bits and activation bits are
plain attributes that can be changed at any time (sensitivity flips one layer, a plan sets all);
the dequantized weight for the active bit-width is cached, so toggling costs nothing after the
first use. This is the reference ("fake quantization") path; real kernels live in
:mod:`mixprec.kernels` and take the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.quant.gptq import HessianAccumulator, gptq_codes
from mixprec.quant.groups import dequantize_codes, nearest_codes, row_scales, weight_qmax

__all__ = ["QUANTIZABLE_TYPES", "weight_qmax", "weight_scales", "quantize_weight", "dequantize_weight",
           "fake_quant_weight", "act_qparams", "fake_quant_act", "RangeObserver", "StepRangeObserver",
           "LayerQuantParams", "QuantLayer", "quantize_", "quant_layers", "set_plan", "reset_full_precision",
           "HessianAccumulator"]

QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)


# --------------------------------------------------------------------------- weights
def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


def weight_scales(weight: torch.Tensor, bits: int, clip: str = "minmax",
                  clip_grid: int = 20, clip_min_ratio: float = 0.5) -> torch.Tensor:
    """Per-output-channel scales (float32, shape [out_channels]) for ``bits``.

    ``clip="mse"`` searches a clipping ratio per channel in [clip_min_ratio, 1] that minimises the
    squared error of the fake-quantized weights (helps most at 2 and 4 bits). Per-group scales:
    :func:`mixprec.quant.groups.group_weight_scales`.
    """
    return row_scales(_per_channel(weight), bits, clip=clip, clip_grid=clip_grid, clip_min_ratio=clip_min_ratio)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights (int8 storage) in [-qmax, qmax], same shape as ``weight``."""
    qmax = weight_qmax(bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.detach().float() / scale.reshape(shape).to(weight.device)), -qmax, qmax)
    return q.to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() * scale.reshape(shape).to(q.device)).to(dtype)


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_weight(quantize_weight(weight, scale, bits), scale, weight.dtype)


# --------------------------------------------------------------------------- activations
def act_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric per-tensor (scale, zero_point); the range always contains 0 so 0 is exact."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2 ** bits - 1
    scale = max((hi - lo) / levels, 1e-8)
    zero = int(round(-lo / scale))
    return scale, min(max(zero, 0), levels)


def fake_quant_act(x: torch.Tensor, scale: float | torch.Tensor, zero: int | torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    # x / scale in float32, as the kernels quantize (mixprec.kernels.triton_gemm.quant_act_int): in
    # 16 bit the quotient is rounded before round() (bf16 keeps 1 fraction bit at |x/scale| 64..127),
    # which put 0.7% (fp16) / 6.1% (bf16) of 8-bit codes of Gaussian activations one step off the
    # kernel's; float32 inputs compute exactly as before
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, levels)
    return ((q - zero) * scale).to(x.dtype)


class RangeObserver:
    """Running min/max with momentum: the first batch sets the range, later ones move it."""

    def __init__(self, momentum: float = 0.95):
        self.momentum = momentum
        self.lo: float | None = None
        self.hi: float | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach().float())
        lo, hi = float(lo), float(hi)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        self.batches += 1


class StepRangeObserver:
    """A range over all steps (exactly :class:`RangeObserver`) plus one per step group.

    Each call updates the overall range and the range of the group the shared
    :class:`~mixprec.timestep_groups.StepGroups` says the denoiser is in.
    """

    def __init__(self, step_groups, momentum: float = 0.95):
        self.step_groups = step_groups
        self.overall = RangeObserver(momentum)
        self.groups = [RangeObserver(momentum) for _ in range(step_groups.num_groups)]

    @property
    def lo(self) -> float | None:
        return self.overall.lo

    @property
    def hi(self) -> float | None:
        return self.overall.hi

    def update(self, x: torch.Tensor) -> None:
        self.overall.update(x)
        self.groups[self.step_groups.current].update(x)


# --------------------------------------------------------------------------- the layer
@dataclass
class LayerQuantParams:
    """Calibrated parameters of one layer: weight scales per bit (and per bit and group size),
    activation range and qparams per bit, and what GPTQ rounding needs."""

    weight_scales: dict[int, torch.Tensor]
    act_range: tuple[float, float] | None
    act_params: dict[int, tuple[float, int]]
    # Timestep-aware ranges (quant.act_timestep_groups > 1): range and per-bit qparams of each step
    # group; act_range/act_params above stay the range over all steps.
    step_ranges: list[tuple[float, float]] | None = None
    step_params: dict[int, list[tuple[float, int]]] | None = None
    # Per-group weight scales [out, groups] by (bits, group size) (quant.weight_group_sizes).
    group_scales: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # quant.rounding: "nearest", or "gptq" with E[x x^T] of the layer's calibration inputs.
    rounding: str = "nearest"
    hessian: torch.Tensor | None = None
    gptq_damp: float = 0.01
    gptq_block: int = 128

    @property
    def num_step_groups(self) -> int:
        return len(self.step_ranges) if self.step_ranges else 1

    def has_weight_option(self, bits: int, group_size: int = 0) -> bool:
        return bits in self.weight_scales if not group_size else (bits, group_size) in self.group_scales

    def weight_scale(self, bits: int, group_size: int = 0) -> torch.Tensor:
        """Scales [out] (per channel) or [out, groups] (per group) of one weight option."""
        return self.weight_scales[bits] if not group_size else self.group_scales[(bits, group_size)]

    def weight_options(self) -> list[tuple[int, int]]:
        """Every calibrated (bits, group size); group size 0 = per channel."""
        return sorted([(b, 0) for b in self.weight_scales] + list(self.group_scales))

    @property
    def uses_gptq(self) -> bool:
        return self.rounding == "gptq" and self.hessian is not None


_FORWARDED_ATTRS = frozenset({"in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                               "padding", "dilation", "groups", "padding_mode"})


class QuantLayer(nn.Module):
    """A Linear/Conv2d whose weight and input-activation bits are switchable at run time.

    ``w_bits``/``a_bits`` of ``None`` mean full precision. ``skip_first_token`` is set for
    cross-attention key/value projections: the first (BOS) text token is excluded from the
    activation range and its keys/values are computed in full precision.
    """

    def __init__(self, name: str, inner: nn.Module, skip_first_token: bool = False):
        super().__init__()
        if not isinstance(inner, QUANTIZABLE_TYPES):
            raise TypeError(f"{name}: only nn.Linear and nn.Conv2d can be quantized, got {type(inner).__name__}")
        self.name = name
        self.inner = inner
        self.skip_first_token = skip_first_token
        self.w_bits: int | None = None
        self.a_bits: int | None = None
        self.w_group = 0  # weight group size of the active option; 0 = one scale per output channel
        self.params: LayerQuantParams | None = None
        self.observer: RangeObserver | StepRangeObserver | None = None
        # Set during calibration with quant.rounding=gptq: sums x x^T of this layer's inputs.
        self.hessian_acc: HessianAccumulator | None = None
        # Shared with the denoiser's timestep hook when the calibration has timestep groups.
        self.step_groups = None
        self._cached_bits: tuple[int, int] | None = None
        self._cached_weight: torch.Tensor | None = None
        self._cached_codes: tuple[tuple[int, int], torch.Tensor] | None = None
        # Batched sensitivity (mixprec.sensitivity): options applied to some batch rows only.
        self.row_options: list[RowOption] = []

    # Let code that inspects `.weight` (dtype/device lookups in diffusers) keep working.
    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def __getattr__(self, item: str):
        # Shape attributes (in_features, kernel_size, ...) that callers read from the wrapped layer.
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item in _FORWARDED_ATTRS:
                return getattr(super().__getattr__("inner"), item)
            raise

    @property
    def is_conv(self) -> bool:
        return isinstance(self.inner, nn.Conv2d)

    def extra_repr(self) -> str:
        group = f", w_group={self.w_group}" if self.w_group else ""
        return (f"name={self.name}, w_bits={self.w_bits}{group}, a_bits={self.a_bits}, "
                f"skip_first_token={self.skip_first_token}")

    def set_bits(self, w_bits: int | None = None, a_bits: int | None = None, w_group: int = 0) -> None:
        """Switch the active option: weight bits (and weight group size, 0 = per channel) and
        activation bits; None = full precision."""
        if w_bits is not None or a_bits is not None:
            self._require_params()
        w_group = int(w_group or 0)
        if w_bits is not None and not self.params.has_weight_option(w_bits, w_group):
            if w_group:
                have = sorted({g for _, g in self.params.group_scales}) or "none"
                raise KeyError(f"{self.name}: no calibrated {w_bits}-bit weight scales with group size {w_group} "
                               f"(calibrated group sizes: {have}); rerun stage=calibrate with "
                               f"quant.weight_group_sizes including {w_group} (a group size must be smaller "
                               f"than the layer's {self.input_columns()} input columns)")
            raise KeyError(f"{self.name}: no calibrated weight parameters for {w_bits} bits "
                           f"(calibrated: {sorted(self.params.weight_scales)}); rerun stage=calibrate "
                           f"with quant.weight_bits including {w_bits}")
        if a_bits is not None and self.params.step_params is not None and self.step_groups is None:
            raise RuntimeError(f"{self.name}: calibrated with {self.params.num_step_groups} timestep groups but "
                               f"no StepGroups is installed on the denoiser (mixprec.timestep_groups)")
        if a_bits is not None and a_bits not in self.params.act_params:
            raise KeyError(f"{self.name}: no calibrated activation parameters for {a_bits} bits "
                           f"(calibrated: {sorted(self.params.act_params)}); rerun stage=calibrate "
                           f"with quant.act_bits including {a_bits}")
        self.w_bits, self.a_bits = w_bits, a_bits
        self.w_group = w_group if w_bits is not None else 0

    def input_columns(self) -> int:
        """Input columns of the weight matrix (Conv2d: in_channels * kh * kw): the grouped dimension."""
        w = self.inner.weight
        return w[0].numel()

    def act_qparams(self, a_bits: int | None = None) -> tuple[float, int]:
        """(scale, zero point) of ``a_bits`` (default: the active activation bits) for the current step group."""
        p = self.params
        a_bits = self.a_bits if a_bits is None else a_bits
        if p.step_params is not None:
            return p.step_params[a_bits][self.step_groups.current]
        return p.act_params[a_bits]

    def _require_params(self) -> None:
        if self.params is None:
            raise RuntimeError(f"{self.name}: not calibrated; run stage=calibrate (or mixprec.calibrate) first")

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer codes int8 in the weight's shape, scales [out] or [out, groups]) of the active weight
        option, rounded as the calibration says (nearest, or GPTQ from its Hessian). What the fake-quant
        path dequantizes and what the kernels pack, so both compute the same weights."""
        if self.w_bits is None:
            raise RuntimeError(f"{self.name}: weights are in full precision; no codes")
        key = (self.w_bits, self.w_group)
        scale = self.params.weight_scale(*key)
        w = self.inner.weight
        if self._cached_codes is None or self._cached_codes[0] != key or self._cached_codes[1].device != w.device:
            p = self.params
            if p.uses_gptq:
                codes = gptq_codes(w, p.hessian, scale, self.w_bits, self.w_group, damp=p.gptq_damp,
                                   block_size=p.gptq_block)
            elif self.w_group:
                codes = nearest_codes(w, scale, self.w_bits, self.w_group)
            else:
                codes = quantize_weight(w, scale, self.w_bits)
            self._cached_codes = (key, codes)
        return self._cached_codes[1], scale

    def quantized_weight(self) -> torch.Tensor:
        if self.w_bits is None:
            return self.inner.weight
        key = (self.w_bits, self.w_group)
        if self._cached_bits != key or self._cached_weight is None or \
                self._cached_weight.device != self.inner.weight.device:
            w = self.inner.weight
            if not self.w_group and not self.params.uses_gptq:
                self._cached_weight = fake_quant_weight(w, self.params.weight_scales[self.w_bits], self.w_bits)
            else:
                codes, scale = self.weight_codes()
                self._cached_weight = dequantize_codes(codes, scale, self.w_group, w.dtype)
            self._cached_bits = key
        return self._cached_weight

    def drop_cache(self) -> None:
        self._cached_bits, self._cached_weight, self._cached_codes = None, None, None

    def _linear_or_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            c = self.inner
            return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.linear(x, weight, self.inner.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.skip_first_token and x.dim() == 3 and x.shape[1] > 1
        if self.observer is not None:
            self.observer.update(x[:, 1:] if split else x)
        if self.hessian_acc is not None:
            self.hessian_acc.update(x[:, 1:] if split else x)
        if self.row_options:
            return self._forward_rows(x, split)
        if self.w_bits is None and self.a_bits is None:
            return self._linear_or_conv(x, self.inner.weight)
        return self._quantized_forward(x, self.quantized_weight(), self.a_bits, split)

    def _quantized_forward(self, x: torch.Tensor, weight: torch.Tensor, a_bits: int | None,
                           split: bool) -> torch.Tensor:
        rest = x[:, 1:] if split else x
        if a_bits is not None:
            scale, zero = self.act_qparams(a_bits)
            rest = fake_quant_act(rest, scale, zero, a_bits)
        out = self._linear_or_conv(rest, weight)
        if split:
            # contiguous: on CPU a strided slice takes another GEMM (batched, not folded) when the
            # weight does not require grad, and would round differently from the kernel modules
            out = torch.cat([self._linear_or_conv(x[:, :1].contiguous(), self.inner.weight), out], dim=1)
        return out

    def _forward_rows(self, x: torch.Tensor, split: bool) -> torch.Tensor:
        """Full precision for every batch row, then each row option's rows again with its quantization:
        one batch evaluates several single-layer perturbations (each row sees one quantized layer)."""
        if self.w_bits is not None or self.a_bits is not None:
            raise RuntimeError(f"{self.name}: row options and a layer-wide option (set_bits) cannot be combined")
        out = self._linear_or_conv(x, self.inner.weight)
        for option in self.row_options:
            if option.batch != x.shape[0]:
                raise RuntimeError(f"{self.name}: row options were set for a batch of {option.batch} rows but the "
                                   f"layer got {x.shape[0]}; batch dimension changed inside the denoiser")
            out[option.rows] = self._quantized_forward(x[option.rows], option.weight, option.a_bits, split)
        return out


@dataclass
class RowOption:
    """One quantization option of a layer, applied to some rows of the denoiser batch only."""

    rows: torch.Tensor  # batch indices (long)
    batch: int  # the batch size the rows index into
    weight: torch.Tensor  # the weight those rows use (full precision or fake-quantized)
    a_bits: int | None  # input-activation bits of those rows (None: full precision)


# --------------------------------------------------------------------------- model level
def is_cross_attention_kv(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in ("to_k", "to_v")


def quantize_(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None,
              skip_bos: bool = True) -> dict[str, QuantLayer]:
    """Wrap every Linear/Conv2d of ``model`` accepted by ``filter_fn`` in a :class:`QuantLayer`, in place.

    Returns the wrapped layers by their original qualified names. Idempotent: already wrapped
    layers are returned as they are.
    """
    existing = {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}
    if existing:
        return dict(sorted(existing.items(), key=lambda kv: _order(model, kv[0])))
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, QUANTIZABLE_TYPES) and (filter_fn is None or filter_fn(n, m))]
    layers: dict[str, QuantLayer] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = QuantLayer(name, module, skip_first_token=skip_bos and is_cross_attention_kv(name))
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers


def _order(model: nn.Module, name: str) -> int:
    for i, (n, _) in enumerate(model.named_modules()):
        if n == name:
            return i
    return -1


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The QuantLayers of a model in module order, by original name."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}


def set_plan(layers: Mapping[str, QuantLayer], weight_bits: Mapping[str, int | None] | None = None,
             act_bits: Mapping[str, int | None] | None = None, strict: bool = True,
             weight_groups: Mapping[str, int] | None = None) -> None:
    """Apply a plan (layer -> bits; None or 16+ means full precision); layers not named go to full precision.

    ``weight_groups``: layer -> weight group size for layers with per-group scales (absent or 0 = per
    output channel).
    """
    weight_bits = dict(weight_bits or {})
    act_bits = dict(act_bits or {})
    weight_groups = {k: int(v or 0) for k, v in dict(weight_groups or {}).items()}
    if strict:
        unknown = (set(weight_bits) | set(act_bits) | set(weight_groups)) - set(layers)
        if unknown:
            some = ", ".join(sorted(unknown)[:5])
            raise KeyError(f"the plan names {len(unknown)} layers this model does not have (e.g. {some}); "
                           f"was it made for another model?")

    def norm(b: int | None) -> int | None:
        return None if b is None or int(b) >= 16 else int(b)

    for name, layer in layers.items():
        layer.set_bits(norm(weight_bits.get(name)), norm(act_bits.get(name)), weight_groups.get(name, 0))


def reset_full_precision(layers: Iterable[QuantLayer]) -> None:
    for layer in layers:
        layer.w_bits, layer.a_bits, layer.w_group = None, None, 0
