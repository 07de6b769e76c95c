"""Post-training calibration: activation ranges from calibration prompts, weight scales per bit.

The result is one safetensors file holding, for every quantizable layer, the weight scales of every
candidate weight bit-width (per output channel, and per group of input columns for each of
``quant.weight_group_sizes``), the activation range and the activation (scale, zero point) of every
candidate activation bit-width, and with ``quant.rounding=gptq`` the layer's input Hessian E[x x^T]
(GPTQ codes are computed from it when an option is first used); its metadata records the bit sets,
group sizes, rounding, fingerprints and config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixprec.quant.groups import group_weight_scales
from mixprec.quantizers import HessianAccumulator, LayerQuantParams, QuantLayer, RangeObserver, StepRangeObserver, \
    act_qparams, weight_scales

FORMAT_VERSION = "1"


def calibrate_layers(layers: Mapping[str, QuantLayer], run_calibration: Callable[[], None],
                     weight_bits: Sequence[int], act_bits: Sequence[int], momentum: float = 0.95,
                     weight_clip: str = "minmax", progress: bool = False,
                     step_groups=None, group_sizes: Sequence[int] = (), rounding: str = "nearest",
                     gptq_damp: float = 0.01, gptq_block: int = 128,
                     gptq_max_columns: int | None = None) -> dict[str, LayerQuantParams]:
    """Observe input ranges while ``run_calibration()`` drives the model, then compute all parameters.

    ``group_sizes`` adds per-group weight scales (for layers with more input columns than the group
    size); ``rounding="gptq"`` also accumulates each layer's input Hessian on the same run (not for
    layers with more than ``gptq_max_columns`` input columns: they keep nearest rounding).

    Layers are left in full precision and get their ``params`` attached. With ``step_groups`` (a
    :class:`~mixprec.timestep_groups.StepGroups` installed on the denoiser of these layers) every
    layer also gets one range per step group, observed only at the steps of that group; the range
    over all steps is computed exactly as without it.
    """
    if step_groups is not None:
        strays = [n for n, layer in layers.items() if layer.step_groups is not step_groups]
        if strays:
            raise ValueError(f"{len(strays)} layers (e.g. {strays[:3]}) do not follow the given step groups: "
                             f"call step_groups.install(denoiser, layers.values()) before calibrating")
    if rounding not in ("nearest", "gptq"):
        raise ValueError(f"rounding must be 'nearest' or 'gptq', got {rounding!r}")
    for layer in layers.values():
        layer.w_bits = layer.a_bits = None
        layer.observer = RangeObserver(momentum) if step_groups is None else StepRangeObserver(step_groups, momentum)
        layer.hessian_acc = HessianAccumulator(layer.inner) if _gptq_takes(layer, rounding, gptq_max_columns) \
            else None
    try:
        with torch.no_grad():
            run_calibration()
    finally:
        observers = {n: layer.observer for n, layer in layers.items()}
        hessians = {n: layer.hessian_acc for n, layer in layers.items()}
        for layer in layers.values():
            layer.observer = layer.hessian_acc = None
    unseen = [n for n, o in observers.items() if o.lo is None]
    if unseen:
        raise RuntimeError(f"{len(unseen)} layers saw no input during calibration (e.g. {unseen[:3]}); "
                           f"they are not reached by this pipeline: add them to model.exclude_patterns")
    if step_groups is not None:
        starved = sorted({g for o in observers.values() for g, go in enumerate(o.groups) if go.lo is None})
        if starved:
            raise RuntimeError(f"step groups {starved} of {step_groups.num_groups} saw no denoiser call during "
                               f"calibration: the calibration must run the sampler's timesteps "
                               f"{step_groups.timesteps} (is the StepGroups installed on the denoiser?)")
    params: dict[str, LayerQuantParams] = {}
    items = layers.items()
    if progress:
        from tqdm import tqdm
        items = tqdm(items, total=len(layers), desc="weight scales", leave=False)
    for name, layer in items:
        obs = observers[name]
        params[name] = LayerQuantParams(
            weight_scales={b: weight_scales(layer.inner.weight, b, clip=weight_clip).cpu() for b in weight_bits},
            act_range=(obs.lo, obs.hi),
            act_params={b: act_qparams(obs.lo, obs.hi, b) for b in act_bits},
            group_scales=group_scales_of(layer.inner.weight, weight_bits, group_sizes, weight_clip),
            rounding="gptq" if hessians[name] is not None else "nearest",
            gptq_damp=float(gptq_damp), gptq_block=int(gptq_block),
            hessian=hessians[name].hessian() if hessians[name] is not None else None,
        )
        if step_groups is not None:
            params[name].step_ranges = [(g.lo, g.hi) for g in obs.groups]
            params[name].step_params = {b: [act_qparams(lo, hi, b) for lo, hi in params[name].step_ranges]
                                        for b in act_bits}
        layer.params = params[name]
        layer.drop_cache()
    return params


def _gptq_takes(layer: QuantLayer, rounding: str, max_columns: int | None) -> bool:
    return rounding == "gptq" and (max_columns is None or layer.input_columns() <= max_columns)


def gptq_nearest_layers(params: Mapping[str, LayerQuantParams]) -> list[str]:
    """Layers of a GPTQ calibration that keep nearest rounding (more input columns than
    ``quant.gptq.max_columns``); recorded in the file's metadata."""
    return [n for n, p in params.items() if p.rounding != "gptq"]


def group_scales_of(weight: torch.Tensor, weight_bits: Sequence[int], group_sizes: Sequence[int],
                    clip: str = "minmax") -> dict[tuple[int, int], torch.Tensor]:
    """Per-group scales by (bits, group size), for the group sizes smaller than the weight's input
    columns (a group as wide as the row is the per-channel option)."""
    cols = weight[0].numel()
    return {(int(b), int(g)): group_weight_scales(weight, int(b), int(g), clip=clip).cpu()
            for g in group_sizes if int(g) < cols for b in weight_bits}


def extend_params(layers: Mapping[str, QuantLayer], weight_bits: Sequence[int], act_bits: Sequence[int],
                  weight_clip: str = "minmax", group_sizes: Sequence[int] = ()) -> None:
    """Add parameters for bit-widths the calibration did not include.

    Weight scales depend only on the weights and activation parameters only on the calibrated
    range, so any bit-width can be added without running the calibration prompts again.
    """
    for layer in layers.values():
        layer._require_params()
        p = layer.params
        for b in weight_bits:
            if b not in p.weight_scales:
                p.weight_scales[b] = weight_scales(layer.inner.weight, b, clip=weight_clip).cpu()
        for key, scale in group_scales_of(layer.inner.weight, weight_bits, group_sizes, weight_clip).items():
            p.group_scales.setdefault(key, scale)
        for b in act_bits:
            if b not in p.act_params:
                if p.act_range is None:
                    raise ValueError(f"{layer.name}: no calibrated activation range to derive {b}-bit parameters from")
                p.act_params[b] = act_qparams(p.act_range[0], p.act_range[1], b)
            if p.step_ranges is not None and b not in p.step_params:
                p.step_params[b] = [act_qparams(lo, hi, b) for lo, hi in p.step_ranges]


def attach_params(layers: Mapping[str, QuantLayer], params: Mapping[str, LayerQuantParams],
                  step_groups=None) -> None:
    """Attach calibrated parameters; those with timestep groups need the ``step_groups`` they were
    calibrated with (:func:`step_groups_from_meta`), installed on the denoiser."""
    missing = sorted(set(layers) - set(params))
    if missing:
        raise KeyError(f"the calibration file has no parameters for {len(missing)} layers of this model "
                       f"(e.g. {missing[:3]}); it was made for another model: rerun stage=calibrate")
    counts = {params[n].num_step_groups for n in layers}
    want = step_groups.num_groups if step_groups is not None else 1
    if counts != {want}:
        raise ValueError(f"the calibration has {sorted(counts)} timestep group(s) per layer but "
                         f"{want} were given; pass the StepGroups recorded with it (step_groups_from_meta)")
    for name, layer in layers.items():
        if step_groups is not None and layer.step_groups is not step_groups:
            raise ValueError(f"{name} does not follow the given step groups: call "
                             f"step_groups.install(denoiser, layers.values()) first")
        layer.params = params[name]
        layer.drop_cache()


def save_params(path: str | os.PathLike, params: Mapping[str, LayerQuantParams], metadata: Mapping[str, Any]) -> None:
    """Write the parameters as safetensors; ``path`` should be a temporary name the caller renames."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for b, s in p.weight_scales.items():
            tensors[f"{name}/w{b}/scale"] = s.float().contiguous()
        for (b, g), s in p.group_scales.items():
            tensors[f"{name}/w{b}g{g}/scale"] = s.float().contiguous()
        if p.hessian is not None:
            tensors[f"{name}/hessian"] = p.hessian.float().contiguous()
        lo, hi = p.act_range
        tensors[f"{name}/act/range"] = torch.tensor([lo, hi], dtype=torch.float64)
        for b, (scale, zero) in p.act_params.items():
            tensors[f"{name}/a{b}/scale"] = torch.tensor([scale], dtype=torch.float64)
            tensors[f"{name}/a{b}/zero"] = torch.tensor([zero], dtype=torch.int64)
        if p.step_ranges is not None:
            tensors[f"{name}/act/step_ranges"] = torch.tensor(p.step_ranges, dtype=torch.float64)
            for b, qp in p.step_params.items():
                tensors[f"{name}/a{b}/step_scale"] = torch.tensor([sc for sc, _ in qp], dtype=torch.float64)
                tensors[f"{name}/a{b}/step_zero"] = torch.tensor([z for _, z in qp], dtype=torch.int64)
    groups = {p.num_step_groups for p in params.values()}
    if len(groups) > 1:
        raise ValueError(f"layers have different numbers of timestep groups {sorted(groups)}; one calibration "
                         f"has one number")
    declared = int(metadata.get("act_timestep_groups", 1))
    if groups and groups != {declared}:
        raise ValueError(f"the parameters have {groups.pop()} timestep group(s) but the metadata declares "
                         f"act_timestep_groups={declared}")
    meta = {"format": "mixprec.quant_params", "version": FORMAT_VERSION,
            "layers": json.dumps(list(params)), **{k: json.dumps(v) for k, v in metadata.items()}}
    save_file(tensors, str(path), metadata=meta)


def load_params(path: str | os.PathLike) -> tuple[dict[str, LayerQuantParams], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        raw_meta = f.metadata() or {}
        if raw_meta.get("format") != "mixprec.quant_params":
            raise ValueError(f"{path} is not a mixprec calibration file (format {raw_meta.get('format')!r})")
        meta = {k: json.loads(v) for k, v in raw_meta.items() if k not in ("format", "version")}
        keys = set(f.keys())
        params: dict[str, LayerQuantParams] = {}
        rounding = rounding_of(meta)
        gptq = (meta.get("quant") or {}).get("gptq") or {}
        nearest = set(meta.get("gptq_nearest_layers") or [])
        for name in meta["layers"]:
            wscales, aparams = {}, {}
            for b in meta["weight_bits"]:
                wscales[int(b)] = f.get_tensor(f"{name}/w{b}/scale")
            for b in meta["act_bits"]:
                aparams[int(b)] = (float(f.get_tensor(f"{name}/a{b}/scale")[0]), int(f.get_tensor(f"{name}/a{b}/zero")[0]))
            rng = f.get_tensor(f"{name}/act/range") if f"{name}/act/range" in keys else None
            params[name] = LayerQuantParams(wscales, (float(rng[0]), float(rng[1])) if rng is not None else None, aparams)
            params[name].group_scales = {(int(b), int(g)): f.get_tensor(f"{name}/w{b}g{g}/scale")
                                         for g in group_sizes_of(meta) for b in meta["weight_bits"]
                                         if f"{name}/w{b}g{g}/scale" in keys}
            if rounding == "gptq" and name not in nearest:
                if f"{name}/hessian" not in keys:
                    raise ValueError(f"{path} declares quant.rounding=gptq but holds no Hessian for {name}; the "
                                     f"file is damaged: rerun stage=calibrate")
                params[name].hessian = f.get_tensor(f"{name}/hessian")
                params[name].rounding = "gptq"
                params[name].gptq_damp = float(gptq.get("damp", 0.01))
                params[name].gptq_block = int(gptq.get("block_size", 128))
            if int(meta.get("act_timestep_groups", 1)) > 1:
                if f"{name}/act/step_ranges" not in keys:
                    raise ValueError(f"{path} declares {meta['act_timestep_groups']} timestep groups but has no "
                                     f"per-group ranges for {name}; the file is damaged: rerun stage=calibrate")
                step = f.get_tensor(f"{name}/act/step_ranges").tolist()
                params[name].step_ranges = [(float(lo), float(hi)) for lo, hi in step]
                params[name].step_params = {
                    int(b): [(float(sc), int(z)) for sc, z in zip(f.get_tensor(f"{name}/a{b}/step_scale").tolist(),
                                                                  f.get_tensor(f"{name}/a{b}/step_zero").tolist())]
                    for b in meta["act_bits"]}
    return params, meta


def rounding_of(meta: Mapping[str, Any]) -> str:
    """The weight rounding a calibration file was made for ("nearest" for files from before the option)."""
    return str(meta.get("rounding") or (meta.get("quant") or {}).get("rounding") or "nearest")


def group_sizes_of(meta: Mapping[str, Any]) -> list[int]:
    """The weight group sizes a calibration file holds scales for ([] = per channel only)."""
    return [int(g) for g in (meta.get("weight_group_sizes") or (meta.get("quant") or {}).get("weight_group_sizes")
                             or [])]


def check_weight_recipe(meta: Mapping[str, Any], rounding: str, group_sizes: Sequence[int],
                        gptq: Mapping[str, Any] | None, path: Path) -> None:
    """Refuse a calibration made with another weight rounding, other GPTQ settings, or without the
    group sizes this run asks for: the file's scales/Hessians cannot stand in for them."""
    have = rounding_of(meta)
    if have != rounding:
        raise ValueError(
            f"{path} was calibrated with quant.rounding={have} but this run asks for quant.rounding={rounding}. "
            f"Rerun `python run.py stage=calibrate quant.rounding={rounding}` (the pipeline does it with "
            f"stage.force=[calibrate]), or run with quant.rounding={have}.")
    if rounding == "gptq":
        have_g = dict((meta.get("quant") or {}).get("gptq") or {})
        if gptq is not None and have_g and have_g != dict(gptq):
            raise ValueError(f"{path} was calibrated with quant.gptq={have_g} but this run asks for quant.gptq="
                             f"{dict(gptq)}; rerun stage=calibrate, or run with the file's settings")
    lacking = sorted(set(int(g) for g in group_sizes) - set(group_sizes_of(meta)))
    if lacking:
        raise ValueError(f"{path} holds weight scales for group sizes {group_sizes_of(meta) or 'none'} (per channel "
                         f"always); this run asks for quant.weight_group_sizes including {lacking}. Rerun "
                         f"`python run.py stage=calibrate quant.weight_group_sizes=[...]` with them.")


def timestep_groups_of(meta: Mapping[str, Any]) -> int:
    """How many timestep groups a calibration file's activation ranges have (1 for files written
    before the option existed)."""
    return int(meta.get("act_timestep_groups", 1))


def step_groups_from_meta(meta: Mapping[str, Any]):
    """The :class:`~mixprec.timestep_groups.StepGroups` a calibration was made with (None for G = 1)."""
    from mixprec.timestep_groups import StepGroups

    if timestep_groups_of(meta) == 1:
        return None
    return StepGroups.from_json(meta["step_groups"])


def check_timestep_groups(meta: Mapping[str, Any], wanted: int, path: Path) -> None:
    """Refuse to use a calibration made with another number of timestep groups than this run asks for."""
    have = timestep_groups_of(meta)
    if have != int(wanted):
        raise ValueError(
            f"{path} holds activation ranges for {have} timestep group(s) but this run asks for "
            f"quant.act_timestep_groups={wanted}; ranges of one grouping cannot be used for another. Rerun "
            f"`python run.py stage=calibrate quant.act_timestep_groups={wanted}`, or run with "
            f"quant.act_timestep_groups={have}.")


def check_bits_available(meta: Mapping[str, Any], weight_bits: Sequence[int], act_bits: Sequence[int], path: Path) -> None:
    have_w, have_a = {int(b) for b in meta["weight_bits"]}, {int(b) for b in meta["act_bits"]}
    lacking_w = sorted(set(int(b) for b in weight_bits) - have_w)
    lacking_a = sorted(set(int(b) for b in act_bits) - have_a)
    if lacking_w or lacking_a:
        raise ValueError(
            f"{path} was calibrated for weight bits {sorted(have_w)} and activation bits {sorted(have_a)}; "
            f"this run needs weight bits {lacking_w or '-'} / activation bits {lacking_a or '-'} that it lacks. "
            f"Rerun `python run.py stage=calibrate` with quant.weight_bits / quant.act_bits including them."
        )
