"""Quantized denoiser checkpoints (safetensors only).

The file holds the converted model's whole state: packed weight codes and scales of the quantized
layers, the 16-bit tensors of everything else. The safetensors metadata carries, as JSON under
``mixprec``: the architecture fingerprint, the dtype, one :class:`LayerSpec` per quantized layer
(bits, storage format, activation parameters, geometry), the plan for every quantizable layer and
the backend options it was converted with. Loading rebuilds the kernel modules from the specs in a
freshly built model of the same architecture and assigns the tensors: no calibration needed.
The data section of the file is exactly :func:`mixprec.kernels.weight_bytes` of the model; the
header adds the JSON above.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mixprec.artifacts import CHECKPOINT_FILE  # noqa: F401  (where the stages keep a workspace's denoiser)
from mixprec.kernels.architecture import _config_dict, architecture_fingerprint, quantizable_shapes
from mixprec.quantizers import QUANTIZABLE_TYPES, QuantLayer
from mixprec.workspace import atomic_path

FORMAT = "mixprec-quantized-denoiser"
VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint was made for another model architecture."""


def _describe(info: Mapping[str, Any]) -> str:
    cfg = info.get("config") or {}
    keys = ("block_out_channels", "num_layers", "cross_attention_dim", "transformer_layers_per_block", "sample_size")
    parts = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    return f"{info.get('model_class', '?')}({', '.join(parts)}; {info.get('n_quantizable', '?')} quantizable layers)"


def save_quantized(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> dict:
    """Write a converted model to ``path``; returns sizes: file, tensor data (= weight bytes), header."""
    from safetensors.torch import save_file

    from mixprec.kernels.layers import KernelLayer
    from mixprec.lora import refuse_if_loaded

    refuse_if_loaded(model, "save_quantized")
    kernels = [m for m in model.modules() if isinstance(m, KernelLayer)]
    if not kernels and not getattr(model, "_mixprec_plan", None):
        raise ValueError("the model is not converted: run mixprec.kernels.convert_ before saving")
    unconverted = [m for m in model.modules() if isinstance(m, QuantLayer) and (m.w_bits is not None or m.a_bits is not None)]
    if unconverted:
        grouped = [m.name for m in unconverted if m.params is not None and m.params.step_params is not None]
        why = (f"{len(grouped)} of them quantize activations with timestep-grouped ranges "
               f"({unconverted[0].params.num_step_groups} groups), which a checkpoint cannot hold: it stores one "
               f"static activation scale per layer. Save a plan without activation quantization, or calibrate "
               f"with quant.act_timestep_groups=1" if grouped else "run mixprec.kernels.convert_ before saving")
        raise ValueError(f"{len(unconverted)} quantized layers (e.g. {unconverted[0].name}) are not kernel modules; "
                         + why)
    state: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        # safetensors refuses shared storage: shared tensors are stored once per name anyway
        t = t.clone() if ident in seen else t.contiguous()
        if ident is not None:
            seen[ident] = key
        state[key] = t.cpu()
    dtypes = {str(t.dtype) for t in model.parameters()}
    info = {
        "format": FORMAT, "version": VERSION,
        "arch_fingerprint": architecture_fingerprint(model),
        "model_class": type(model).__name__,
        "config": _config_dict(model),
        "n_quantizable": len(quantizable_shapes(model)),
        "dtype": sorted(dtypes)[0] if len(dtypes) == 1 else None,
        "layers": [m.spec.to_json() for m in kernels],
        "plan": getattr(model, "_mixprec_plan", None),
        "backend": getattr(model, "_mixprec_backend", None),
        "extra": dict(extra or {}),
    }
    meta = {"format": FORMAT, "mixprec": json.dumps(info, default=str)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    data_bytes = sum(t.numel() * t.element_size() for t in state.values())
    file_bytes = path.stat().st_size
    return {"path": str(path), "file_bytes": file_bytes, "weight_bytes": data_bytes,
            "header_bytes": file_bytes - data_bytes, "tensors": len(state), "quantized_layers": len(kernels)}


def read_info(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint, read from the header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT or "mixprec" not in meta:
        raise ValueError(f"{path} is not a mixprec quantized checkpoint (metadata format={meta.get('format')!r})")
    return json.loads(meta["mixprec"])


def load_quantized(model: nn.Module, path: str | os.PathLike, config: Any = None,
                   device: str | torch.device | None = None):
    """Load a checkpoint into a freshly built ``model`` of the same architecture, in place.

    Quantizable layers named in the checkpoint become kernel modules (backends from ``config``,
    a :class:`~mixprec.kernels.BackendConfig` or mapping; the stored one by default), all other
    tensors are assigned from the file. Returns the dispatch report.
    """
    from safetensors.torch import load_file

    from mixprec.kernels.convert import BackendConfig, _replace, choose_backend, report_for
    from mixprec.kernels.layers import KernelLayer, LayerSpec

    info = read_info(path)
    if info.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint format version {info.get('version')} is not supported (want {VERSION})")
    if any(isinstance(m, (QuantLayer, KernelLayer)) for m in model.modules()):
        raise ValueError("load_quantized needs a freshly built model (no QuantLayer/KernelLayer in it)")
    here = architecture_fingerprint(model)
    if here != info["arch_fingerprint"]:
        mine = {"model_class": type(model).__name__, "config": _config_dict(model),
                "n_quantizable": len(quantizable_shapes(model))}
        raise CheckpointMismatchError(
            f"{path} holds a quantized {_describe(info)} (architecture fingerprint {info['arch_fingerprint']}), "
            f"but the model to load it into is a {_describe(mine)} (fingerprint {here}). "
            f"Load it into the model it was made for, or quantize this model anew.")
    if config is None:
        cfg = BackendConfig.from_mapping(info.get("backend") or {})
    else:
        cfg = config if isinstance(config, BackendConfig) else BackendConfig.from_mapping(config)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = getattr(torch, info["dtype"].split(".")[-1]) if info.get("dtype") else torch.float16
    for d in info["layers"]:
        spec = LayerSpec.from_json(d)
        inner = model.get_submodule(spec.name)
        if not isinstance(inner, QUANTIZABLE_TYPES):
            raise CheckpointMismatchError(f"{spec.name} is a {type(inner).__name__} in this model, not Linear/Conv2d")
        if spec.weight_format == "int":
            # the stored codes fix the format; the options only choose among compatible kernels
            backend, _ = choose_backend(inner, spec.w_bits, spec.a_bits, cfg, spec.group_size)
            # 4-bit codes saved with fp8 activation scales (kernels.low_bit=fbgemm) keep them: the stored
            # scales fix the activation format too
            if not (spec.backend == "fp8" and spec.a_bits is not None):
                spec.backend = "int8" if backend == "fp8" else backend
        elif spec.weight_format == "fp8":
            spec.backend = "fp8" if cfg.w8a8 != "reference" else "reference"
        elif spec.weight_format == "fp":
            spec.backend = "reference"
        with torch.device("meta"):
            mod = KernelLayer(spec, dtype=dtype, **cfg.layer_kwargs())
        _replace(model, spec.name, mod)
    state = load_file(str(path), device=str(dev))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path} does not fit this model: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for mod in model.modules():
        if isinstance(mod, KernelLayer):
            mod.compute_dtype = dtype
            mod.prepare()
    model._mixprec_arch = info["arch_fingerprint"]
    model._mixprec_plan = info.get("plan")
    model._mixprec_backend = cfg.to_dict()
    return report_for(model)
