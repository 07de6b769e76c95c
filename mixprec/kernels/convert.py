"""Choosing a backend per layer, converting a calibrated model in place, and the dispatch report.

Dispatch rules (:func:`choose_backend`), per QuantLayer with its plan bits (w, a):
  - w = a = None                -> ``fp``: the original nn.Linear/Conv2d is put back;
  - w = None, a set             -> ``reference``: no kernel multiplies quantized activations with
                                   16-bit weights, fake-quant the activation (fused by compile);
  - per-group weight scales     -> ``reference``: the kernels apply one weight scale per output
                                   channel in their epilogue (codes and scales are stored all the same);
  - w = 3, 5, 6, 7              -> stored in the next container (3 -> 4-bit, 5..7 -> 8-bit codes): the
                                   codes are the same integers, so the kernels are exact w.r.t. the
                                   fake quantization, with the container's storage;
  - grouped/dilated/odd convs, or ``convs=False`` -> ``reference``;
  - w = 8 (storage 8), a <= 8   -> ``w8a8`` option: ``int8`` (Triton, or torch._int_mm) or ``fp8``
                                   (e4m3: torch._scaled_mm for Linear, Triton for convs); fp8 needs
                                   a = 8, other a fall to int8;
  - w in 2..8, a = None         -> ``wonly``: packed codes decoded in the Triton kernel, 16-bit math;
  - w in 2..7, a <= 8           -> ``int8``: packed codes decoded to int8 for the int8 dot;
  - a > 8 with w set            -> ``wonly`` on the weights, activation unquantized is not the plan:
                                   ``reference`` instead;
  - ``low_bit="reference"``      -> ``reference`` for every w < 8;
  - ``low_bit="fbgemm"``         -> 4-bit-storage Linear layers (w 3..4) on fbgemm-gpu-genai's CUTLASS
                                   kernels (:mod:`mixprec.kernels.fbgemm`): a = None stays ``wonly``
                                   (int4 x bf16), a = 8 becomes ``fp8`` (int4 codes x fp8 e4m3
                                   activations: the activation format changes from the calibrated
                                   int8 grid to fp8, in the reference path too); convolutions and
                                   other widths keep the Triton kernels.
Layers with activation bits whose calibration has timestep groups (``quant.act_timestep_groups`` > 1)
stay QuantLayers (``reference``, reason listed): the kernels take one static activation scale.
At run time (KernelLayer.route) a layer on a kernel backend still takes the reference path without
CUDA (or emulates the kernel on CPU when asked), and below ``min_m`` GEMM rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from mixprec.quantizers import QUANTIZABLE_TYPES, QuantLayer, quant_layers

from . import fbgemm
from .architecture import architecture_fingerprint
from .layers import KernelLayer, storage_bits_for


@dataclass
class BackendConfig:
    """How a plan is executed (the ``quant.kernels`` options)."""

    w8a8: str = "int8"            # "int8" | "fp8" | "reference"
    int8_impl: str = "triton"     # "triton" | "torch" (torch._int_mm for Linear layers)
    low_bit: str = "triton"       # packed 2/4-bit weights: "triton" | "reference" | "fbgemm" (4-bit
                                  # Linear layers on fbgemm-gpu-genai's CUTLASS kernels, W4A8 with fp8
                                  # activations; optional dependency, Hopper GPUs)
    convs: bool = True            # convolutions on the implicit-GEMM kernel
    act_quant: str = "producer"   # "producer": plain torch ops before the GEMM (compile fuses them
                                  # into the op that made x); "kernel": quantize inside the GEMM
    fp8_weight: str = "channel"   # fp8 weight scales: "channel" (per output channel, applied after
                                  # cuBLAS's tensor-wise GEMM / in the Triton epilogue) | "rowwise"
                                  # (the same scales through _scaled_mm's row-wise kernel) | "tensor"
    fp8_act: str = "tensor"       # fp8 activation scales of Linear layers: "tensor" (the calibrated
                                  # static scale) | "token" (per GEMM row, max|row| / 448 at run
                                  # time; opt-in until its GPU speed is measured: on the UNet it did
                                  # not raise SQNR); convolutions always take the static one
    fp8_fast_accum: bool = False  # True: fp8 products accumulate in the tensor cores' reduced
                                  # precision over the whole K (cuBLAS fast accum; Triton's sm90
                                  # default); False: promoted to float32 every K block
    bos: str = "weight_only"      # cross-attn K/V BOS token: "weight_only" (quantized weight,
                                  # 16-bit activation) | "exact" (keeps a 16-bit weight copy)
    min_m: int = 1                # fewer GEMM rows than this run the reference path
    gemv_max_m: int = 8           # Linear layers with at most this many rows (and the BOS row)
                                  # take the fused product-and-sum path instead of a GEMM kernel
    cpu: str = "reference"        # without CUDA: "reference" | "emulate" (kernel arithmetic in torch)

    def __post_init__(self) -> None:
        checks = {"w8a8": ("int8", "fp8", "reference"), "int8_impl": ("triton", "torch"),
                  "low_bit": ("triton", "reference", "fbgemm"), "act_quant": ("producer", "kernel"),
                  "fp8_weight": ("tensor", "channel", "rowwise"), "fp8_act": ("tensor", "token"),
                  "bos": ("weight_only", "exact"),
                  "cpu": ("reference", "emulate")}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"kernels.{key} must be one of {allowed}, got {getattr(self, key)!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "BackendConfig":
        cfg = dict(cfg or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(cfg) - known
        if unknown:
            raise KeyError(f"unknown kernel options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**cfg)

    @classmethod
    def merged(cls, recipe: Mapping[str, Any] | None, stage: Mapping[str, Any] | None = None) -> "BackendConfig":
        """The one merge of kernel options: the recipe's ``quant.kernels``, overridden by ``stage.kernels``
        (stage=infer and stage=benchmark both run plans through it, so one plan runs the same way in both).
        A stage option left null keeps the recipe's."""
        return cls.from_mapping({**(recipe or {}), **{k: v for k, v in (stage or {}).items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

    def build_kwargs(self) -> dict:
        """Keyword arguments of :meth:`KernelLayer.from_quant_layer` for these options."""
        return dict(fp8_weight=self.fp8_weight, fp8_act=self.fp8_act, bos=self.bos, **self.layer_kwargs())

    def layer_kwargs(self) -> dict:
        return dict(cpu_path=self.cpu, min_m=self.min_m, int8_impl=self.int8_impl,
                    act_quant=self.act_quant, fp8_fast_accum=self.fp8_fast_accum, gemv_max_m=self.gemv_max_m,
                    low_bit_impl="fbgemm" if self.low_bit == "fbgemm" else "triton")


def choose_backend(inner: nn.Module, w_bits: int | None, a_bits: int | None,
                   cfg: BackendConfig, w_group: int = 0) -> tuple[str, str]:
    """(backend, reason) for one layer; reason is empty when a kernel takes the layer. ``w_group``: the
    weight group size (0 = per output channel)."""
    if w_bits is None and a_bits is None:
        return "fp", ""
    if w_bits is None:
        return "reference", "activation-only quantization (16-bit weights): fake-quant + dense GEMM"
    if w_group:
        return "reference", (f"per-group weight scales (group size {w_group}): the packed kernels apply one "
                             f"scale per output channel")
    if isinstance(inner, nn.Conv2d):
        if inner.groups != 1 or any(d != 1 for d in inner.dilation):
            return "reference", "grouped or dilated convolution"
        if isinstance(inner.padding, str) or len(set(inner.padding)) != 1 or len(set(inner.stride)) != 1:
            return "reference", "non-square padding/stride"
        if inner.padding_mode != "zeros":
            return "reference", f"padding_mode={inner.padding_mode}"
        if not cfg.convs:
            return "reference", "convolutions disabled (kernels.convs=false)"
    if not 2 <= w_bits <= 8:
        return "reference", f"{w_bits}-bit weights have no packed format"
    if a_bits is not None and a_bits > 8:
        return "reference", f"{a_bits}-bit activations have no integer kernel"
    low = storage_bits_for(w_bits) < 8
    if low and cfg.low_bit == "reference":
        return "reference", "low-bit kernels disabled (kernels.low_bit=reference)"
    if a_bits is None:
        return "wonly", ""
    if w_bits == 8:
        if cfg.w8a8 == "reference":
            return "reference", "W8A8 kernels disabled (kernels.w8a8=reference)"
        if cfg.w8a8 == "fp8" and a_bits == 8:
            return "fp8", ""
    elif (cfg.low_bit == "fbgemm" and a_bits == 8 and storage_bits_for(w_bits) == 4
          and isinstance(inner, nn.Linear)):
        return "fp8", ""  # int4 codes x fp8 activations (fbgemm's f8i4 kernel)
    return "int8", ""


# --------------------------------------------------------------------------- report
@dataclass
class LayerDispatch:
    name: str
    kind: str
    shape: list[int]
    w_bits: int | None
    a_bits: int | None
    backend: str
    reason: str = ""
    weight_bytes: int = 0
    rows: int | None = None       # GEMM rows seen by a probe run
    ran: str | None = None        # execution path taken in the probe run
    w_group: int = 0              # weight group size (0 = per output channel)


@dataclass
class DispatchReport:
    """Which backend each quantizable layer was given and, after :meth:`probe`, which path ran."""

    layers: list[LayerDispatch] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def by_name(self) -> dict[str, LayerDispatch]:
        return {d.name: d for d in self.layers}

    def fallbacks(self) -> list[LayerDispatch]:
        """Layers that ran (or would run) the reference path although they are quantized."""
        out = []
        for d in self.layers:
            if d.backend == "fp":
                continue
            if d.backend == "reference" or d.ran in ("reference",):
                out.append(d)
        return out

    def summary(self) -> dict:
        return {
            "layers": len(self.layers),
            "backends": dict(Counter(d.backend for d in self.layers)),
            "paths": dict(Counter(d.ran for d in self.layers if d.ran is not None)),
            "fallback_layers": len(self.fallbacks()),
            "fallback_reasons": dict(Counter(d.reason or f"route={d.ran}" for d in self.fallbacks())),
            "quantized_weight_bytes": sum(d.weight_bytes for d in self.layers),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "config": self.config, "layers": [asdict(d) for d in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [f"{'layer':60s} {'w':>6s} {'a':>2s} {'backend':9s} {'ran':9s} reason"]
        for d in self.layers:
            w = f"{d.w_bits}g{d.w_group}" if d.w_bits and d.w_group else (d.w_bits or "-")
            rows.append(f"{d.name[:60]:60s} {w:>6} {d.a_bits or '-':>2} {d.backend:9s} "
                        f"{d.ran or '?':9s} {d.reason}")
        return "\n".join(rows)

    @torch.no_grad()
    def probe(self, model: nn.Module, *args, **kwargs) -> Any:
        """Run ``model(*args, **kwargs)`` once (eager) and record each layer's rows and path."""
        entries = self.by_name()
        hooks = []

        def hook_for(name: str, module: nn.Module):
            def hook(mod, inputs):
                x = inputs[0]
                d = entries.get(name)
                if d is None:
                    return
                if isinstance(mod, KernelLayer):
                    d.rows = mod.gemm_rows(x)
                    d.ran = mod.route(d.rows, x.is_cuda)
                elif isinstance(mod, QuantLayer) and (mod.w_bits is not None or mod.a_bits is not None):
                    inner = mod.inner
                    d.rows = x.numel() // x.shape[1] if isinstance(inner, nn.Conv2d) else x.numel() // x.shape[-1]
                    d.ran = "reference"
                else:
                    d.rows = x.numel() // x.shape[1] if isinstance(mod, nn.Conv2d) else x.numel() // x.shape[-1]
                    d.ran = "dense"
            return hook

        for name, module in _named_layers(model).items():
            hooks.append(module.register_forward_pre_hook(hook_for(name, module)))
        try:
            return model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()


def _named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers by original name, whatever state they are in."""
    out: dict[str, nn.Module] = {}
    skip: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            out[mod.name] = mod
            skip.add(id(mod.inner))
        elif isinstance(mod, KernelLayer):
            out[mod.name] = mod
        elif isinstance(mod, QUANTIZABLE_TYPES) and id(mod) not in skip:
            out[name] = mod
    return out


# --------------------------------------------------------------------------- conversion
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_(model: nn.Module, config: BackendConfig | Mapping[str, Any] | None = None,
             example_args: tuple | None = None, example_kwargs: Mapping[str, Any] | None = None,
             ) -> DispatchReport:
    """Replace every calibrated QuantLayer of ``model`` by a kernel module, in place.

    The QuantLayers' plan (``w_bits``/``a_bits``) decides each backend. With ``example_args``
    (and/or ``example_kwargs``) the converted model runs once and the report records the
    execution path that each layer actually took for those inputs.
    """
    from mixprec.lora import refuse_if_loaded

    refuse_if_loaded(model, "convert_")
    cfg = config if isinstance(config, BackendConfig) else BackendConfig.from_mapping(config)
    if cfg.low_bit == "fbgemm" and any(p.is_cuda for p in model.parameters()):
        fbgemm.check_loads()  # asked for on a GPU: say why it cannot run rather than fall back quietly
    arch = architecture_fingerprint(model)
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLayer: wrap it with mixprec.quantizers.quantize_, "
                         "calibrate it and set a plan before converting")
    report = DispatchReport(config=cfg.to_dict())
    plan: dict[str, list[int | None]] = {}
    for name, layer in layers.items():
        inner = layer.inner
        shape = list(inner.weight.shape)
        kind = "conv" if isinstance(inner, nn.Conv2d) else "linear"
        plan[name] = [layer.w_bits, layer.a_bits]
        backend, reason = choose_backend(inner, layer.w_bits, layer.a_bits, cfg, layer.w_group)
        if backend == "fp":
            _replace(model, name, inner)
            report.layers.append(LayerDispatch(name, kind, shape, None, None, "fp"))
            continue
        if layer.params is None:
            raise RuntimeError(f"{name}: quantized in the plan but not calibrated")
        if layer.a_bits is not None and layer.params.step_params is not None:
            # The QuantLayer stays: it follows the denoiser's timestep hook, which a static scale can't.
            stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
            report.layers.append(LayerDispatch(name, kind, shape, layer.w_bits, layer.a_bits, "reference",
                                               timestep_groups_reason(layer.params.num_step_groups), stored))
            continue
        new = KernelLayer.from_quant_layer(layer, backend, **cfg.build_kwargs())
        layer.drop_cache()
        _replace(model, name, new)
        report.layers.append(LayerDispatch(name, kind, shape, layer.w_bits, layer.a_bits, backend, reason,
                                           new.weight_bytes(), w_group=layer.w_group))
    model._mixprec_arch = arch
    model._mixprec_plan = plan
    model._mixprec_backend = cfg.to_dict()
    if example_args is not None or example_kwargs is not None:
        report.probe(model, *(example_args or ()), **dict(example_kwargs or {}))
    return report


@contextmanager
def reference_path(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every KernelLayer of a converted ``model`` runs its reference path: fake
    quantization from the stored codes and scales, the exact function its kernels compute (for fp8
    layers the fp8 rounding, which a QuantLayer's integer fake quantization is not)."""
    kernels = [m for m in model.modules() if isinstance(m, KernelLayer)]
    saved = [m.min_m for m in kernels]
    for m in kernels:
        m.min_m = 1 << 62  # every call has fewer rows: route() answers "reference"
    try:
        yield model
    finally:
        for m, v in zip(kernels, saved):
            m.min_m = v


def timestep_groups_reason(groups: int) -> str:
    return (f"timestep-grouped activation ranges ({groups} groups; kernels take one static scale): "
            f"fake-quant QuantLayer")


def report_for(model: nn.Module) -> DispatchReport:
    """A report for an already converted (or loaded) model, without running it."""
    report = DispatchReport(config=dict(getattr(model, "_mixprec_backend", {}) or {}))
    for name, mod in _named_layers(model).items():
        if isinstance(mod, KernelLayer):
            s = mod.spec
            shape = [s.out_features, s.in_features, *s.kernel_size] if s.kind == "conv" else [s.out_features, s.in_features]
            reason = ""
            if s.backend == "reference":
                cfg = BackendConfig.from_mapping(report.config) if report.config else BackendConfig()
                probe = nn.Conv2d(s.in_features, s.out_features, s.kernel_size, s.stride, s.padding, device="meta") \
                    if s.kind == "conv" else nn.Linear(s.in_features, s.out_features, device="meta")
                reason = choose_backend(probe, s.w_bits, s.a_bits, cfg, s.group_size)[1] or "reference backend"
            report.layers.append(LayerDispatch(name, s.kind, shape, s.w_bits, s.a_bits, s.backend, reason,
                                               mod.weight_bytes(), w_group=s.group_size))
        elif isinstance(mod, QuantLayer) and (mod.w_bits is not None or mod.a_bits is not None):
            inner = mod.inner
            reason = (timestep_groups_reason(mod.params.num_step_groups)
                      if mod.a_bits is not None and mod.params is not None and mod.params.step_params is not None
                      else "not converted (QuantLayer)")
            report.layers.append(LayerDispatch(name, "conv" if isinstance(inner, nn.Conv2d) else "linear",
                                               list(inner.weight.shape), mod.w_bits, mod.a_bits, "reference", reason,
                                               sum(t.numel() * t.element_size() for t in mod.state_dict().values())))
        else:
            inner = mod.inner if isinstance(mod, QuantLayer) else mod
            report.layers.append(LayerDispatch(name, "conv" if isinstance(inner, nn.Conv2d) else "linear",
                                               list(inner.weight.shape), None, None, "fp"))
    return report


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores for inference (parameters and saved buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def option_coverage(weight_options: Iterable[Any], act_bits: Iterable[int | None],
                    config: BackendConfig | None = None) -> list[dict[str, Any]]:
    """Which backend each (weight option, activation bits) choice gets, for a Linear and a 3x3
    convolution: the kernels' coverage of what a recipe lets the search pick. ``weight_options``:
    keys or :class:`~mixprec.quant.options.WeightOption` (``4``, ``"3g64"``); ``act_bits``: widths,
    None = 16-bit activations. One row per layer kind x option x activation width, with the packed
    storage of the codes and, for a fallback, the reason."""
    from mixprec.quant.options import parse_weight_option

    from .layers import storage_bits_for

    cfg = config or BackendConfig()
    probes = {"linear": nn.Linear(64, 64, device="meta"), "conv3x3": nn.Conv2d(64, 64, 3, padding=1, device="meta")}
    rows = []
    for kind, probe in probes.items():
        for opt in (parse_weight_option(o) for o in weight_options):
            for a in act_bits:
                backend, reason = choose_backend(probe, opt.bits, a, cfg, opt.group_size)
                rows.append({"layer": kind, "weight": opt.key, "act": a or 16, "backend": backend,
                             "storage_bits": storage_bits_for(opt.bits), "kernel": backend != "reference",
                             "reason": reason})
    return rows
