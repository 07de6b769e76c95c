"""LoRA adapters on quantized (and plain) pipelines, and LoRA fused into the weights before the search.

Two ways to use a LoRA with mixprec:

- **At inference, beside the quantized weights** (:func:`load_lora`): every layer the adapter names
  is wrapped in a :class:`LoraLayer` that runs the layer as it is (a fake-quant
  :class:`~mixprec.quantizers.QuantLayer`, a real-kernel :class:`~mixprec.kernels.KernelLayer`, or a
  plain ``nn.Linear``/``nn.Conv2d``) and adds ``up(down(x)) * alpha/r * weight`` in the activations'
  16-bit dtype. The quantized weights are never touched, so :func:`unload_lora` puts the very same
  module objects back and the model computes bit-identically to before. Several adapters can be
  loaded and weighted (:func:`set_lora_weights`). diffusers' own ``pipe.load_lora_weights`` cannot
  be used on a quantized denoiser: PEFT only injects into ``nn.Linear``/``nn.Conv2d`` modules, and
  the quantized layers are wrappers.
- **Before the search** (:func:`fuse_lora`, ``model.lora=[{path, scale}]``): the update is added
  to the 16-bit weights before anything is wrapped, so calibration, sensitivities, plans and
  checkpoints describe the fused model.

Adapters are read in the formats ``pipe.save_lora_weights`` writes (PEFT ``lora_A``/``lora_B`` keys
with ``lora_adapter_metadata``), the older diffusers ``lora.down``/``lora.up`` keys and, through
diffusers' ``lora_state_dict``, the Kohya formats it converts; the arithmetic is PEFT's
(``lora_B(lora_A(x)) * scaling``, ``scaling = lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.quantizers import QUANTIZABLE_TYPES, QuantLayer

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# state-dict prefixes -> pipeline component; keys without one belong to the denoiser
COMPONENT_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2")
_DOWN_UP = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
            (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))


@dataclass
class LoraUpdate:
    """The low-rank update of one layer: ``delta W = up @ down * scaling``."""

    down: torch.Tensor        # [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    up: torch.Tensor          # [out, r] or [out, r, 1, 1]
    scaling: float            # alpha / r (or alpha / sqrt(r) for rsLoRA)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """The dense update in float32, in the layer weight's layout."""
        down, up = self.down.float(), self.up.float()
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (delta * self.scaling).reshape(up.shape[0], *down.shape[1:])


# --------------------------------------------------------------------------- reading adapters
def read_lora(source: str | os.PathLike | Mapping[str, torch.Tensor], pipeline_class: type | None = None
              ) -> dict[str, dict[str, LoraUpdate]]:
    """Parse an adapter into ``{component: {module name: LoraUpdate}}``.

    ``source`` is a ``.safetensors`` file, a folder holding ``pytorch_lora_weights.safetensors``,
    or a state dict. With ``pipeline_class`` (a diffusers pipeline class) files go through its
    ``lora_state_dict``, which converts the Kohya/A1111 formats to diffusers keys.
    """
    state, alphas, metadata = _load_state(source, pipeline_class)
    grouped: dict[str, dict[str, LoraUpdate]] = {}
    pairs, leftovers = _pair_keys(state)
    if leftovers:
        raise ValueError(f"{_describe_source(source)}: {len(leftovers)} tensors are not LoRA down/up weights "
                         f"(e.g. {sorted(leftovers)[:3]}); DoRA magnitudes, biases and full layer weights are "
                         f"not supported")
    for key, (down, up) in pairs.items():
        component, module = _split_component(key)
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"{_describe_source(source)}: {key} has a down weight of rank {down.shape[0]} but an "
                             f"up weight of rank {up.shape[1]}")
        scaling = _scaling(component, module, down.shape[0], alphas, metadata, key)
        grouped.setdefault(component, {})[module] = LoraUpdate(down, up, scaling)
    if not grouped:
        raise ValueError(f"{_describe_source(source)} holds no LoRA weights (no lora_A/lora_B or lora.down/lora.up keys)")
    return grouped


def _describe_source(source: Any) -> str:
    return "the LoRA state dict" if isinstance(source, Mapping) else f"LoRA file {source}"


def lora_file(source: str | os.PathLike) -> Path:
    """The weights file of an adapter path (a file, or a folder written by ``save_lora_weights``)."""
    path = Path(source)
    if path.is_dir():
        candidates = [path / LORA_WEIGHT_NAME] + sorted(path.glob("*.safetensors"))
        for c in candidates:
            if c.exists():
                return c
        raise FileNotFoundError(f"LoRA folder {path} holds no .safetensors file (expected {LORA_WEIGHT_NAME})")
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return path


def _load_state(source, pipeline_class) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    if isinstance(source, Mapping):
        return _with_alphas(dict(source), {}, {})
    path = lora_file(source)
    metadata = _file_metadata(path)
    if pipeline_class is not None and hasattr(pipeline_class, "lora_state_dict"):
        out = pipeline_class.lora_state_dict(str(path), return_lora_metadata=True)
        state, alphas = out[0], out[1] if len(out) > 2 else None
        return _with_alphas(dict(state), dict(alphas or {}), metadata)
    from safetensors.torch import load_file

    return _with_alphas(load_file(str(path)), {}, metadata)


def _with_alphas(state: dict, alphas: dict, metadata: dict) -> tuple[dict, dict, dict]:
    """Move ``<layer>.alpha`` tensors of the state dict to the alphas (diffusers' network alphas)."""
    for key in [k for k in state if k.endswith(".alpha")]:
        alphas[key] = float(state.pop(key))
    return state, alphas, metadata


def _file_metadata(path: Path) -> dict[str, Any]:
    """The adapter configs diffusers stores in the safetensors header (``lora_adapter_metadata``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _pair_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], set[str]]:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    for key in state:
        for down_suffix, up_suffix in _DOWN_UP:
            if key.endswith(down_suffix):
                module = key[: -len(down_suffix)]
                up_key = module + up_suffix
                if up_key not in state:
                    raise ValueError(f"LoRA weights: {key} has no matching {up_key}")
                pairs[module] = (state[key], state[up_key])
                used.update((key, up_key))
    leftovers = {k for k in state if k not in used}
    return pairs, leftovers


def _split_component(key: str) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head in COMPONENT_PREFIXES and rest:
        return head, rest
    return "denoiser", key


def _scaling(component: str, module: str, rank: int, alphas: Mapping[str, float], metadata: Mapping[str, Any],
             key: str) -> float:
    """PEFT's scaling for one layer: alpha / r; alpha from network alphas, then the stored config."""
    alpha: float | None = None
    for k in (f"{key}.alpha", f"{module}.alpha", f"{component}.{module}.alpha"):
        if k in alphas:
            alpha = float(alphas[k])
    config = _component_config(metadata, component)
    if config.get("use_dora"):
        raise ValueError(f"{key}: DoRA adapters are not supported (use_dora=true in the adapter config)")
    if alpha is None:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
    if alpha is None and config.get("lora_alpha") is not None:
        alpha = float(config["lora_alpha"])
    if alpha is None:
        alpha = float(rank)  # diffusers' default when nothing says otherwise: scaling 1
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _component_config(metadata: Mapping[str, Any], component: str) -> dict[str, Any]:
    prefixes = [f"{component}."] if component != "denoiser" else ["unet.", "transformer.", ""]
    for prefix in prefixes:
        found = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)} if prefix else {}
        if found:
            return found
    return dict(metadata) if component == "denoiser" else {}


def _pattern_value(patterns: Mapping[str, Any], module: str) -> float | None:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return float(value)
    return None


def adapter_digest(path: str | os.PathLike) -> str:
    """Content hash of an adapter file: part of the model fingerprint of fused runs."""
    h = hashlib.sha256()
    with open(lora_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the layer
def _base_geometry(base: nn.Module) -> tuple[str, int, int, tuple, tuple]:
    """(kind, in, out, stride, padding) of a Linear/Conv2d however it is wrapped."""
    from mixprec.kernels.layers import KernelLayer

    inner = base.inner if isinstance(base, QuantLayer) else base
    if isinstance(inner, nn.Conv2d):
        if inner.groups != 1 or any(d != 1 for d in inner.dilation):
            raise ValueError("LoRA on grouped or dilated convolutions is not supported")
        return "conv", inner.in_channels, inner.out_channels, inner.stride, inner.padding
    if isinstance(inner, nn.Linear):
        return "linear", inner.in_features, inner.out_features, (1, 1), (0, 0)
    if isinstance(inner, KernelLayer):
        s = inner.spec
        if s.kind == "conv":
            return "conv", s.in_features, s.out_features, (s.stride,) * 2, (s.padding,) * 2
        return "linear", s.in_features, s.out_features, (1, 1), (0, 0)
    raise TypeError(f"LoRA can only wrap Linear/Conv2d layers (plain, QuantLayer or KernelLayer), got {type(base).__name__}")


def _compute_dtype(base: nn.Module) -> torch.dtype:
    from mixprec.kernels.layers import KernelLayer

    if isinstance(base, KernelLayer):
        return base.compute_dtype
    inner = base.inner if isinstance(base, QuantLayer) else base
    return inner.weight.dtype


def check_fits(name: str, layer: nn.Module, adapter: str, update: LoraUpdate) -> None:
    """A clear error when an adapter's update does not have the layer's shape."""
    kind, in_dim, out_dim, _, _ = _base_geometry(layer.base if isinstance(layer, LoraLayer) else layer)
    got_in, got_out = int(update.down.shape[1]), int(update.up.shape[0])
    got_kind = "conv" if update.down.dim() == 4 else "linear"
    if (got_in, got_out, got_kind) != (in_dim, out_dim, kind):
        raise ValueError(f"adapter {adapter!r} does not fit layer {name}: its update is {got_out}x{got_in} "
                         f"({got_kind}), the layer is {out_dim}x{in_dim} ({kind}); was it made for another model?")


class LoraBranch(nn.Module):
    """One adapter's ``up(down(x)) * scaling`` for one layer, in the layer's 16-bit compute dtype."""

    def __init__(self, update: LoraUpdate, kind: str, stride: tuple, padding: tuple, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.kind, self.stride, self.padding = kind, tuple(stride), tuple(padding)
        self.scaling = float(update.scaling)
        self.register_buffer("down", update.down.detach().to(device=device, dtype=dtype).contiguous())
        self.register_buffer("up", update.up.detach().to(device=device, dtype=dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.kind == "conv":
            return F.conv2d(F.conv2d(x, down, None, self.stride, self.padding), up)
        return F.linear(F.linear(x, down), up)


class LoraLayer(nn.Module):
    """A layer (plain, fake-quant or kernel) plus weighted LoRA branches beside it.

    ``forward(x) = base(x) + sum_i branch_i(x) * weight_i``: the base runs exactly as without
    adapters, so removing them restores its outputs bit for bit.
    """

    def __init__(self, name: str, base: nn.Module):
        super().__init__()
        self.name = name
        self.base = base
        self.kind, self.in_dim, self.out_dim, self.stride, self.padding = _base_geometry(base)
        self.branches = nn.ModuleDict()
        self.weights: dict[str, float] = {}

    def __getattr__(self, item: str):
        # in_features, weight, bias, ...: what callers read from the layer this one wraps
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(super().__getattr__("base"), item)

    def add(self, adapter: str, update: LoraUpdate, weight: float, device: torch.device) -> None:
        check_fits(self.name, self.base, adapter, update)
        self.branches[adapter] = LoraBranch(update, self.kind, self.stride, self.padding,
                                            _compute_dtype(self.base), device)
        self.weights[adapter] = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for adapter, branch in self.branches.items():
            weight = self.weights[adapter]
            if weight != 0.0:
                out = out + branch(x) * (branch.scaling * weight)
        return out

    def extra_repr(self) -> str:
        return f"name={self.name}, adapters={self.weights}"


# --------------------------------------------------------------------------- pipeline level
def _components(target) -> dict[str, nn.Module]:
    """The modules an adapter's components refer to, for a pipeline or a bare denoiser."""
    if isinstance(target, nn.Module):
        return {"denoiser": target, "unet": target, "transformer": target}
    from mixprec.models.denoiser import denoiser_of

    denoiser = denoiser_of(target)
    out = {"denoiser": denoiser, "unet": denoiser, "transformer": denoiser}
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(target, name, None)
        if module is not None:
            out[name] = module
    return out


def _layer_at(root: nn.Module, name: str, component: str) -> nn.Module:
    try:
        module = root.get_submodule(name)
    except AttributeError:
        raise KeyError(f"the LoRA names layer {name!r} of the {component}, which this model does not have; "
                       f"was the adapter made for another model?") from None
    return module


def _pipeline_class(target):
    return None if isinstance(target, nn.Module) else type(target)


def load_lora(target, source: str | os.PathLike | Mapping[str, torch.Tensor], adapter_name: str = "default",
              weight: float = 1.0) -> dict[str, int]:
    """Add an adapter beside the (quantized) layers of a pipeline or denoiser, in place.

    ``target`` is a diffusers pipeline (denoiser and text encoders) or a bare denoiser module;
    its layers may be plain, :class:`~mixprec.quantizers.QuantLayer` or
    :class:`~mixprec.kernels.KernelLayer`. Returns the number of layers per component.
    Load adapters after :func:`mixprec.kernels.convert_`, not before (conversion rebuilds layers).
    """
    from mixprec.kernels.layers import KernelLayer

    updates = read_lora(source, _pipeline_class(target))
    if adapter_name in list_lora(target):
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded; unload it first or pick another name")
    components = _components(target)
    plan: list[tuple[str, nn.Module, str, LoraUpdate]] = []
    for component, layers in updates.items():
        if component not in components:
            raise KeyError(f"the LoRA has weights for {component!r}, which this pipeline does not have")
        root = components[component]
        for name, update in layers.items():
            module = _layer_at(root, name, component)
            if not isinstance(module, (LoraLayer, QuantLayer, KernelLayer, *QUANTIZABLE_TYPES)):
                raise TypeError(f"LoRA layer {component}.{name} is a {type(module).__name__}, not a Linear/Conv2d")
            check_fits(f"{component}.{name}", module, adapter_name, update)
            plan.append((component, root, name, update))
    counts: dict[str, int] = {}
    for component, root, name, update in plan:  # everything was checked before the model changes
        layer = _wrapped(root, name)
        layer.add(adapter_name, update, weight, _device_of(layer.base))
        counts[component] = counts.get(component, 0) + 1
    return counts


def _device_of(module: nn.Module) -> torch.device:
    for t in module.buffers():
        return t.device
    return next(module.parameters()).device


def _wrapped(root: nn.Module, name: str) -> LoraLayer:
    module = root.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(name, module)
    _set_submodule(root, name, layer)
    return layer


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _lora_layers(target) -> list[tuple[nn.Module, str, LoraLayer]]:
    seen: set[int] = set()
    out = []
    for root in _components(target).values():
        if id(root) in seen:
            continue
        seen.add(id(root))
        out.extend((root, name, m) for name, m in root.named_modules() if isinstance(m, LoraLayer))
    return out


def list_lora(target) -> dict[str, float]:
    """Loaded adapters and their weights."""
    found: dict[str, float] = {}
    for _, _, layer in _lora_layers(target):
        found.update(layer.weights)
    return found


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def set_lora_weights(target, weights: Mapping[str, float]) -> None:
    """Weight of each named adapter (0 switches one off without unloading it)."""
    loaded = list_lora(target)
    unknown = sorted(set(weights) - set(loaded))
    if unknown:
        raise KeyError(f"no adapter named {unknown}; loaded: {sorted(loaded)}")
    for _, _, layer in _lora_layers(target):
        for adapter, w in weights.items():
            if adapter in layer.weights:
                layer.weights[adapter] = float(w)


def unload_lora(target, adapter_names: str | Iterable[str] | None = None) -> None:
    """Remove adapters (all by default); a layer left without any gets its original module back."""
    names = None if adapter_names is None else ({adapter_names} if isinstance(adapter_names, str) else set(adapter_names))
    if names is not None:
        unknown = sorted(names - set(list_lora(target)))
        if unknown:
            raise KeyError(f"no adapter named {unknown}; loaded: {sorted(list_lora(target))}")
    for root, name, layer in _lora_layers(target):
        for adapter in list(layer.branches):
            if names is None or adapter in names:
                del layer.branches[adapter]
                del layer.weights[adapter]
        if not layer.branches:
            _set_submodule(root, name, layer.base)


# --------------------------------------------------------------------------- fusing before the search
@torch.no_grad()
def fuse_lora(target, source: str | os.PathLike | Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, int]:
    """Add ``scale * delta W`` of an adapter to the 16-bit weights of a plain (not yet quantized) model.

    This is what ``model.lora`` does before calibration: the quantization then describes the fused
    model. Returns the number of fused layers per component.
    """
    updates = read_lora(source, _pipeline_class(target))
    components = _components(target)
    fused: list[tuple[nn.Module, torch.Tensor]] = []
    for component, layers in updates.items():
        if component not in components:
            raise KeyError(f"the LoRA has weights for {component!r}, which this pipeline does not have")
        for name, update in layers.items():
            module = _layer_at(components[component], name, component)
            if not isinstance(module, QUANTIZABLE_TYPES):
                raise TypeError(f"cannot fuse a LoRA into {component}.{name}: it is a {type(module).__name__}. "
                                f"Fuse adapters into the plain model before quantizing it (model.lora), or "
                                f"load them beside the quantized layers with mixprec.lora.load_lora")
            delta = update.delta_weight()
            if delta.shape != module.weight.shape:
                raise ValueError(f"the LoRA update of {component}.{name} has shape {list(delta.shape)}, the layer's "
                                 f"weight {list(module.weight.shape)}; was it made for another model?")
            fused.append((module, delta))
    counts: dict[str, int] = {}
    for module, delta in fused:
        w = module.weight
        w.copy_((w.float() + scale * delta.to(w.device)).to(w.dtype))
    for component, layers in updates.items():
        counts[component] = len(layers)
    return counts


def fuse_adapters(target, adapters: Iterable[Mapping[str, Any]]) -> None:
    """Fuse ``model.lora``-style entries ``{path, scale}`` in order."""
    for entry in adapters:
        fuse_lora(target, entry["path"], float(entry.get("scale", 1.0)))


def check_adapter_entries(entries: Iterable[Any]) -> list[dict[str, Any]]:
    """``model.lora`` entries as plain ``{path, scale}`` dicts; a clear error for a malformed one."""
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": str(entry)}
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ValueError(f"model.lora[{i}] must be {{path: <adapter file or folder>, scale: <float>}}, got {entry!r}")
        unknown = set(entry) - {"path", "scale"}
        if unknown:
            raise ValueError(f"model.lora[{i}] has unknown keys {sorted(unknown)}; it takes path and scale")
        try:
            lora_file(entry["path"])
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"model.lora[{i}].path: {exc}") from None
        out.append({"path": str(entry["path"]), "scale": float(entry.get("scale", 1.0))})
    return out


def adapters_identity(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What the fingerprint records of fused adapters: file content hash and scale, in order."""
    return [{"digest": adapter_digest(e["path"]), "scale": float(e.get("scale", 1.0))} for e in entries]


def describe_adapters(entries: Iterable[Mapping[str, Any]] | None) -> str:
    entries = list(entries or [])
    if not entries:
        return "no LoRA adapters"
    return "LoRA " + ", ".join(f"{Path(e['path']).name} (scale {float(e.get('scale', 1.0)):g})" for e in entries)


def check_calibrated_adapters(calibrated: Iterable[Mapping[str, Any]] | None, wanted: Iterable[Mapping[str, Any]],
                              artifact: str) -> None:
    """Refuse an artifact calibrated with other fused adapters than this run's ``model.lora``."""
    from mixprec.workspace import FingerprintMismatchError

    calibrated, wanted = list(calibrated or []), list(wanted or [])
    same = len(calibrated) == len(wanted) and all(
        Path(a["path"]).name == Path(b["path"]).name and float(a.get("scale", 1.0)) == float(b.get("scale", 1.0))
        for a, b in zip(calibrated, wanted))
    if not same:
        raise FingerprintMismatchError(
            f"{artifact} was calibrated on the model with {describe_adapters(calibrated)} fused, but this run fuses "
            f"{describe_adapters(wanted)} (model.lora): its ranges, sensitivities and plans describe another model. "
            f"Rerun `python run.py stage=calibrate` (or stage=pipeline) with this model.lora into its own "
            f"paths.workspace (e.g. model.name=<name>_lora), or drop model.lora.")


def refuse_if_loaded(model: nn.Module, action: str) -> None:
    """Conversion and checkpoints work on the quantized model alone: adapters go on afterwards."""
    if has_lora(model):
        raise ValueError(f"{action} needs the model without LoRA adapters: unload them first "
                         f"(mixprec.lora.unload_lora) and load them again afterwards, or fuse them before "
                         f"quantizing (model.lora)")


def random_lora_state_dict(model: nn.Module, targets: Iterable[str], rank: int = 4, alpha: float | None = None,
                           relative_norm: float = 0.1, seed: int = 0, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """A random adapter in the PEFT/diffusers key format for every Linear/Conv2d whose name ends with
    one of ``targets`` (tests and benchmarks). Each update ``up @ down`` has ``relative_norm`` times
    the Frobenius norm of the layer's weight (before the alpha / r scaling; alphas go in as
    ``<layer>.alpha`` keys when given), so the adapter is as strong on a wide model as on a narrow one."""
    gen = torch.Generator("cpu").manual_seed(seed)
    targets = tuple(targets)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            name, module = module.name, module.inner
        if not isinstance(module, QUANTIZABLE_TYPES) or name.endswith(".inner") or not name.endswith(targets):
            continue
        w = module.weight.detach().float().cpu()
        if isinstance(module, nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, module.in_features, generator=gen)
            up = torch.randn(module.out_features, rank, generator=gen)
        delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
        factor = (relative_norm * w.norm() / delta.norm()).sqrt()
        key = f"{prefix}.{name}" if prefix else name
        state[f"{key}.lora_A.weight"] = (down * factor).to(module.weight.dtype).contiguous()
        state[f"{key}.lora_B.weight"] = (up * factor).to(module.weight.dtype).contiguous()
        if alpha is not None:
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    if not state:
        raise ValueError(f"no Linear/Conv2d layer name ends with {targets}")
    return state


def check_inference_entries(entries: Iterable[Any] | None, setting: str = "stage.lora") -> list[dict[str, Any]]:
    """``stage.lora`` entries as ``{path, weight, name}`` (name defaults to the file's stem)."""
    out = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": str(entry)}
        if not isinstance(entry, Mapping) or "path" not in entry or set(entry) - {"path", "weight", "name"}:
            raise ValueError(f"{setting}[{i}] must be {{path: <adapter>, weight: <float>, name: <adapter name>}} "
                             f"(weight and name optional), got {entry!r}")
        try:
            file = lora_file(entry["path"])
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{setting}[{i}].path: {exc}") from None
        name = str(entry.get("name") or (file.parent.name if file.name == LORA_WEIGHT_NAME else file.stem))
        out.append({"path": str(entry["path"]), "weight": float(entry.get("weight", 1.0)), "name": name})
    names = [e["name"] for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{setting}: adapter names must differ, got {names}; set name: for each")
    return out


@contextlib.contextmanager
def loaded(target, entries: Iterable[Mapping[str, Any]]) -> Iterator[Any]:
    """``with loaded(pipe, entries):`` the adapters are beside the layers inside the block only."""
    entries = list(entries)
    for e in entries:
        load_lora(target, e["path"], e["name"], float(e.get("weight", 1.0)))
    try:
        yield target
    finally:
        if entries:
            unload_lora(target, [e["name"] for e in entries])
