"""A ready diffusers pipeline from a base model plus a mixprec quantized checkpoint.

What a serving script needs::

    import mixprec
    pipe = mixprec.load_quantized_pipeline("path/to/base-model", "outputs/sdxl/quantized_denoiser.safetensors",
                                           device="cuda")
    image = pipe("a red circle on a blue background").images[0]

The base model gives everything the checkpoint does not hold (text encoders, VAE, scheduler,
config); the checkpoint's denoiser replaces the base one's layers with kernel modules and its
tensors. Before anything is replaced the checkpoint is checked against the base: the architecture
fingerprint, the plan (when one is given) and the weights themselves (the base's weights, quantized
with the checkpoint's scales, must give the checkpoint's integer codes), so a checkpoint of another
model, another fine-tune or a LoRA-fused model is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mixprec.checkpoint import CheckpointMismatchError, load_quantized, read_info

# a checkpoint whose codes differ from the requantized base weights in more than this fraction of
# entries was made from other weights (float rounding of the scale can flip a handful of ties)
CODE_MISMATCH_TOLERANCE = 1e-3
# GPTQ codes differ from round-to-nearest by design (about 19% of them on the tiny model), but by more
# than one step only rarely (at most 0.7% of a layer's codes on the tiny model at 2-8 bits): a GPTQ
# layer fails the check when more than this fraction of its codes are over one step from nearest
GPTQ_FAR_CODE_TOLERANCE = 0.05


def load_quantized_pipeline(base: Any, checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu",
                            backend: Mapping[str, Any] | None = None, plan: Any = None,
                            lora: Iterable[Mapping[str, Any]] | None = None, check_weights: bool = True):
    """A diffusers pipeline whose denoiser is the quantized one of ``checkpoint``.

    ``base``: a local pipeline folder, a hub id (fetched only if not cached and ``HF_HUB_OFFLINE`` is
    unset), a :class:`~mixprec.models.ModelSpec` or its dict (e.g. ``{"name": "tiny", "source":
    "builtin"}``), or an already loaded pipeline. It is loaded in the checkpoint's dtype.
    ``backend``: :class:`~mixprec.kernels.BackendConfig` options (default: those stored in the file).
    ``plan``: a plan file (``final_weight_mp.yaml``) or a ``{layer: bits}`` mapping the checkpoint
    must implement. ``lora``: ``[{path, scale}]`` adapters to fuse into the base first (for a
    checkpoint made with ``model.lora``). Raises :class:`~mixprec.checkpoint.CheckpointMismatchError`
    with the reason when the checkpoint does not belong to this base.
    """
    from mixprec.models import denoiser_of

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"quantized checkpoint {checkpoint} does not exist; write one with `python run.py "
                                f"stage=infer stage.execution=kernels stage.save_checkpoint=true`")
    info = read_info(checkpoint)
    dtype = getattr(torch, info["dtype"].split(".")[-1]) if info.get("dtype") else torch.float16
    pipe = _load_base(base, dtype, device)
    if lora:
        from mixprec.lora import check_adapter_entries, fuse_adapters

        fuse_adapters(pipe, check_adapter_entries(lora))
    _check_model_fingerprint(base, info, checkpoint)
    if plan is not None:
        check_plan(info, plan, checkpoint)
    denoiser = denoiser_of(pipe)
    modules = dict(denoiser.named_modules()) if check_weights else {}
    # (another architecture is refused by load_quantized below, with its description)
    originals = {d["name"]: modules[d["name"]] for d in info["layers"] if d["name"] in modules}
    report = load_quantized(denoiser, checkpoint, config=backend, device=device)
    if check_weights:
        check_codes_match(denoiser, originals, checkpoint, info)
    pipe.to(torch.device(device))
    pipe.mixprec_report = report
    pipe.mixprec_info = info
    return pipe


def _load_base(base: Any, dtype: torch.dtype, device):
    from diffusers import DiffusionPipeline

    from mixprec.models import ModelSpec, load_pipeline

    if isinstance(base, (ModelSpec, Mapping)):
        spec = base if isinstance(base, ModelSpec) else ModelSpec.from_dict(dict(base))
        return load_pipeline(dataclasses.replace(spec, dtype=str(dtype).split(".")[-1]), device=device)
    if isinstance(base, (str, os.PathLike)):
        folder = Path(base)
        if folder.exists():
            if not (folder / "model_index.json").exists():
                raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
            return DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        return DiffusionPipeline.from_pretrained(str(base), torch_dtype=dtype, local_files_only=offline)
    if hasattr(base, "components"):  # a loaded pipeline: used as it is
        return base
    raise TypeError(f"base must be a pipeline folder, a hub id, a ModelSpec (or its dict) or a pipeline, "
                    f"got {type(base).__name__}")


def _check_model_fingerprint(base: Any, info: Mapping[str, Any], checkpoint: Path) -> None:
    """When both sides know it: the model fingerprint the checkpoint was made for (mixprec stages store it)."""
    from mixprec.models import ModelSpec

    stored = (info.get("extra") or {}).get("model_fingerprint")
    if stored is None or not isinstance(base, (ModelSpec, Mapping)):
        return
    from mixprec.workspace import fingerprint

    spec = base if isinstance(base, ModelSpec) else ModelSpec.from_dict(dict(base))
    ours = fingerprint(spec.fingerprint_data(device_type=(info.get("extra") or {}).get("device_type")))
    if ours != stored:
        made_for = (info.get("extra") or {}).get("model") or {}
        raise CheckpointMismatchError(
            f"{checkpoint} was made for model {made_for.get('name', '?')!r} with fingerprint {stored} "
            f"({_adapters_note(made_for)}), but the base given has fingerprint {ours} ({_adapters_note(vars(spec))}). "
            f"Load it with the model settings it was made with.")


def _adapters_note(model: Mapping[str, Any]) -> str:
    from mixprec.lora import describe_adapters

    return describe_adapters(model.get("lora"))


def check_plan(info: Mapping[str, Any], plan: Any, checkpoint: Path) -> None:
    """The checkpoint implements ``plan`` (a plan file or ``{layer: weight bits}``; 16/None = full precision)."""
    from mixprec.search import read_plan

    bits = read_plan(plan).bits if isinstance(plan, (str, os.PathLike)) else dict(plan)
    stored = {name: wa[0] for name, wa in (info.get("plan") or {}).items()}

    def norm(b):
        return None if b is None or int(b) >= 16 else int(b)

    differ = sorted(n for n in set(bits) | set(stored) if norm(bits.get(n)) != norm(stored.get(n)))
    if differ:
        some = ", ".join(f"{n}: plan {bits.get(n)} vs checkpoint {stored.get(n)}" for n in differ[:3])
        raise CheckpointMismatchError(f"{checkpoint} does not implement the given plan: {len(differ)} layers "
                                      f"differ ({some}); was it written from another final plan?")


@torch.no_grad()
def check_codes_match(denoiser: nn.Module, originals: Mapping[str, nn.Module], checkpoint: Path,
                      info: Mapping[str, Any]) -> None:
    """The base's weights, quantized with the checkpoint's scales, give the checkpoint's codes."""
    from mixprec.kernels.layers import KernelLayer, _codes_layout
    from mixprec.quant.groups import nearest_codes

    worst: tuple[float, str, float] = (0.0, "", 0.0)  # (fraction / tolerance, layer, fraction)
    for name, original in originals.items():
        layer = denoiser.get_submodule(name)
        if not isinstance(layer, KernelLayer) or layer.spec.weight_format == "fp8" or original.weight.is_meta:
            continue
        base_w = original.weight.to(layer.qweight.device)
        tolerance = CODE_MISMATCH_TOLERANCE
        if layer.spec.weight_format == "fp":
            mismatch = float((base_w.to(layer.weight.dtype) != layer.weight).float().mean())
        else:
            spec = layer.spec
            codes = _codes_layout(nearest_codes(base_w, layer.wscale, spec.w_bits, spec.group_size))
            if spec.rounding == "gptq":
                tolerance = GPTQ_FAR_CODE_TOLERANCE
                far = (codes.int() - layer.decode_codes().int()).abs() > 1
                mismatch = float(far.float().mean())
            else:
                mismatch = float((codes != layer.decode_codes()).float().mean())
        worst = max(worst, (mismatch / tolerance, name, mismatch))
    if worst[0] > 1.0:
        made_for = (info.get("extra") or {}).get("model") or {}
        raise CheckpointMismatchError(
            f"{checkpoint} was not made from these weights: in layer {worst[1]}, {100 * worst[2]:.1f}% of the "
            f"base's weights quantized with the checkpoint's scales differ from its codes (GPTQ layers: by more "
            f"than one step). It was made with "
            f"{_adapters_note(made_for)} fused; pass the base model it was quantized from (and lora=[...] for "
            f"fused adapters), or check_weights=False to skip this check.")
