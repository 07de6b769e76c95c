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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)


# --------------------------------------------------------------------------- weights
def weight_qmax(bits: int) -> int:
    if bits < 2:
        raise ValueError(f"weight bits must be >= 2, got {bits}")
    return 2 ** (bits - 1) - 1


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


def weight_scales(weight: torch.Tensor, bits: int, clip: str = "minmax",
                  clip_grid: int = 20, clip_min_ratio: float = 0.5) -> torch.Tensor:
    """Per-output-channel scales (float32, shape [out_channels]) for ``bits``.

    ``clip="mse"`` searches a clipping ratio per channel in [clip_min_ratio, 1] that minimises the
    squared error of the fake-quantized weights (helps most at 2 and 4 bits).
    """
    qmax = weight_qmax(bits)
    w = _per_channel(weight)
    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    if clip == "minmax":
        return amax / qmax
    if clip != "mse":
        raise ValueError(f"unknown weight clipping {clip!r}: use 'minmax' or 'mse'")
    best_scale = amax / qmax
    best_err = torch.full_like(amax, float("inf"))
    for ratio in torch.linspace(1.0, clip_min_ratio, clip_grid).tolist():
        scale = amax * ratio / qmax
        q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
        err = (q * scale[:, None] - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


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
    """Calibrated parameters of one layer: weight scales per bit, activation range and qparams per bit."""

    weight_scales: dict[int, torch.Tensor]
    act_range: tuple[float, float] | None
    act_params: dict[int, tuple[float, int]]
    # Timestep-aware ranges (quant.act_timestep_groups > 1): range and per-bit qparams of each step
    # group; act_range/act_params above stay the range over all steps.
    step_ranges: list[tuple[float, float]] | None = None
    step_params: dict[int, list[tuple[float, int]]] | None = None

    @property
    def num_step_groups(self) -> int:
        return len(self.step_ranges) if self.step_ranges else 1


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
        self.params: LayerQuantParams | None = None
        self.observer: RangeObserver | StepRangeObserver | None = None
        # Shared with the denoiser's timestep hook when the calibration has timestep groups.
        self.step_groups = None
        self._cached_bits: int | None = None
        self._cached_weight: torch.Tensor | None = None

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
        return f"name={self.name}, w_bits={self.w_bits}, a_bits={self.a_bits}, skip_first_token={self.skip_first_token}"

    def set_bits(self, w_bits: int | None = None, a_bits: int | None = None) -> None:
        if w_bits is not None or a_bits is not None:
            self._require_params()
        if w_bits is not None and w_bits not in self.params.weight_scales:
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

    def act_qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the active activation bits for the current step group."""
        p = self.params
        if p.step_params is not None:
            return p.step_params[self.a_bits][self.step_groups.current]
        return p.act_params[self.a_bits]

    def _require_params(self) -> None:
        if self.params is None:
            raise RuntimeError(f"{self.name}: not calibrated; run stage=calibrate (or mixprec.calibrate) first")

    def quantized_weight(self) -> torch.Tensor:
        if self.w_bits is None:
            return self.inner.weight
        if self._cached_bits != self.w_bits or self._cached_weight is None or \
                self._cached_weight.device != self.inner.weight.device:
            scale = self.params.weight_scales[self.w_bits]
            self._cached_weight = fake_quant_weight(self.inner.weight, scale, self.w_bits)
            self._cached_bits = self.w_bits
        return self._cached_weight

    def drop_cache(self) -> None:
        self._cached_bits, self._cached_weight = None, None

    def _linear_or_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            c = self.inner
            return F.conv2d(x, weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.linear(x, weight, self.inner.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.skip_first_token and x.dim() == 3 and x.shape[1] > 1
        if self.observer is not None:
            self.observer.update(x[:, 1:] if split else x)
        if self.w_bits is None and self.a_bits is None:
            return self._linear_or_conv(x, self.inner.weight)
        rest = x[:, 1:] if split else x
        if self.a_bits is not None:
            scale, zero = self.act_qparams()
            rest = fake_quant_act(rest, scale, zero, self.a_bits)
        out = self._linear_or_conv(rest, self.quantized_weight())
        if split:
            # contiguous: on CPU a strided slice takes another GEMM (batched, not folded) when the
            # weight does not require grad, and would round differently from the kernel modules
            out = torch.cat([self._linear_or_conv(x[:, :1].contiguous(), self.inner.weight), out], dim=1)
        return out


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
             act_bits: Mapping[str, int | None] | None = None, strict: bool = True) -> None:
    """Apply a plan (layer -> bits; None or 16+ means full precision); layers not named go to full precision."""
    weight_bits = dict(weight_bits or {})
    act_bits = dict(act_bits or {})
    if strict:
        unknown = (set(weight_bits) | set(act_bits)) - set(layers)
        if unknown:
            some = ", ".join(sorted(unknown)[:5])
            raise KeyError(f"the plan names {len(unknown)} layers this model does not have (e.g. {some}); "
                           f"was it made for another model?")

    def norm(b: int | None) -> int | None:
        return None if b is None or int(b) >= 16 else int(b)

    for name, layer in layers.items():
        layer.set_bits(norm(weight_bits.get(name)), norm(act_bits.get(name)))


def reset_full_precision(layers: Iterable[QuantLayer]) -> None:
    for layer in layers:
        layer.w_bits, layer.a_bits = None, None
