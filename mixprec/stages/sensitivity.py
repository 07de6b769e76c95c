"""stage=sensitivity: every layer, every bit, weights and activations; resumable and shardable.

Records go to ``sensitivity/shard<i>of<n>.jsonl`` as each layer finishes. When every shard of the
sweep is complete (immediately, for one shard) they are merged into
``sensitivity_{w,a}_{content,quality}.yaml`` (layer -> bits -> mean metric),
``sensitivity_per_prompt.csv`` and ``protected_layers.yaml``, with plots by depth.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mixprec import shards
from mixprec import sensitivity as sens
from mixprec.context import Calibration, ModelBundle, RunSettings, StageContext, load_calibrated, read_calibration
from mixprec.models import _matches, layer_group
from mixprec.recipe import QuantRecipe
from mixprec.quant.options import option_order
from mixprec.settings import SensitivitySettings, is_forced
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")


def _first_last_convs(layer_names: Sequence[str], layer_types: Mapping[str, bool]) -> list[str]:
    convs = [n for n in layer_names if layer_types[n]]
    return [convs[0], convs[-1]] if len(convs) >= 2 else convs


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    i, n = int(s.shard), int(s.num_shards)
    if not 0 <= i < n:
        raise shards.ShardError(f"stage.shard must be in [0, stage.num_shards), got shard={i} num_shards={n}")
    # The tasks, the shard's records and the merge need only the calibration file: the model is
    # loaded when there is work for it (a rerun of a finished shard just reports or merges).
    calib = read_calibration(ctx.run, ws)
    loaded: list[ModelBundle] = []

    def model() -> ModelBundle:
        if not loaded:
            loaded.append(_load_model(ctx.run, s, ws, calib))
        return loaded[0]

    q = ctx.run.quant
    pairs = ctx.run.prompt_set("sensitivity")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    all_groups = {name: layer_group(name, ctx.run.model.content_patterns) for name in calib.layer_names}
    # stage.layers: a fixed slice of the layers (patterns as in model.exclude_patterns), e.g. to measure speed.
    only = list(s.layers or [])
    groups = {name: g for name, g in all_groups.items() if not only or _matches(name, only)}
    if not groups:
        raise ValueError(f"stage.layers={only} matches none of the {len(all_groups)} quantizable layers")
    wbits = list(s.weight_bits) if s.weight_bits else list(q.weight_bits)
    abits = list(s.act_bits) if s.act_bits else list(q.act_bits)
    opts = {"kinds": list(s.kinds), "weight_groups": _weight_groups(calib, q.weight_group_sizes),
            "allowed": measured_widths(q, max(abits))}  # only the options a plan can use
    tasks, all_tasks = (sens.make_tasks(layers, wbits, abits, **opts) for layers in (groups, all_groups))
    cap = float(s.sqnr_cap_db)
    identity = shards.identity(ws, pairs, tasks, n, cap)
    mine = sens.shard_tasks(tasks, i, n)

    track.update_config({"shard": i, "num_shards": n})
    with contextlib.ExitStack() as merging:
        if not s.merge_only:
            busy = (f"shard {i} of {n} is being run by another process in {ws.root} (lock "
                    f"{shards.shard_lock(i, n)}); a shard runs once at a time")
            with shards.flock(ws.path(shards.shard_lock(i, n)), wait=False, busy=busy):
                shards.check_header(ws, i, identity, bool(s.restart), is_forced(s.force, "sensitivity"), mine)
                records_file = sens.RecordFile(ws.path(shards.shard_paths(i, n)[1]))
                pending = [t for t in mine if t.key not in records_file.load()]
                if pending and (s.max_tasks is None or int(s.max_tasks) > 0):
                    need_img = any(t.group == "content" for t in pending)
                    need_den = any(t.group == "quality" for t in pending)
                    bundle = model()
                    ref = sens.compute_reference(bundle.sampler, prompts, seeds, need_img, need_den)
                    sens.run_tasks(mine, bundle.layers, bundle.sampler, ref, prompts, seeds, records_file, cap,
                                   max_tasks=s.max_tasks, progress=bool(s.progress),
                                   perturbations_per_batch=perturbations_per_batch(s, len(prompts)))
        merged = shards.merge(ws, tasks, identity, strict=bool(s.merge_only))
        if merged is not None:
            # Shards that finish together both see a complete sweep: the second waits here, then rewrites the
            # same bytes (atomic renames); the lock is held until the stage ends.
            merging.enter_context(shards.flock(ws.path(shards.MERGE_LOCK), wait=True, busy=""))
        headline: dict[str, Any] = {"shard": i, "num_shards": n, "tasks": len(tasks), "shard_tasks": len(mine),
                                    "prompts": len(pairs), "merged": merged is not None}
        shard_records = sens.RecordFile(ws.path(shards.shard_paths(i, n)[1])).load(repair=False)
        headline["shard_tasks_done"] = sum(t.key in shard_records for t in mine)
        # Merged: the whole sweep's timing (every shard); the projection counts every layer, also with stage.layers.
        headline.update(_timing(merged if merged is not None else shard_records.values(), all_tasks))
        if merged is None:
            return headline
        always = []
        if q.protect_act.first_last_conv:
            is_conv = {name: layer.is_conv for name, layer in model().layers.items()}
            always = _first_last_convs(calib.layer_names, is_conv)
        out = shards.write_merged(ws, merged, calib.layer_names, asdict(q.protect_act), always, max(abits))
        headline["protected"] = out["protected"]
        headline["monotone_fraction"] = {f"{k}_{g}": sens.monotone_fraction(t) for (k, g), t in out["tables"].items() if t}
        headline["layers"] = {f"{k}_{g}": len(t) for (k, g), t in out["tables"].items()}
        for (k, g), table in out["tables"].items():
            if table:
                bits = sorted({b for v in table.values() for b in v}, key=option_order)
                track.log_table(f"sensitivity/{k}_{g}", ["layer"] + [f"{k}{b}" for b in bits],
                                [[name] + [v.get(b) for b in bits] for name, v in table.items()])
        for p in out["plots"]:
            track.log_file_image(p.replace("/", "_").removesuffix(".png"), ws.path(p))
        track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
    return headline


def perturbations_per_batch(s: SensitivitySettings, prompts: int) -> int:
    """stage.perturbations_per_batch: an integer as given; "auto" fills stage.batch_size rows
    (perturbations x prompts), so one batch holds no more rows than the one-at-a-time path's."""
    setting = s.perturbations_per_batch
    if setting == "auto":
        return sens.fill_batch(s.batch_size, prompts)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"stage.perturbations_per_batch must be 'auto' or an integer >= 1, got {setting!r}")
    return setting


def measured_widths(q: QuantRecipe, protect_bits: int) -> dict[str, dict[str, list[int]]]:
    """Per kind (``w``/``a``) and group, the widths the sweep measures: those a plan may give the group
    (``quant.weight_bits_by_group`` / ``act_bits_by_group``), plus, for the activations of a group with
    protected layers (``quant.protect_act``), the width protection ranks them at (``protect_bits``)."""
    counts = asdict(q.protect_act)
    act = {g: sorted(set(b) | ({protect_bits} if counts.get(g) else set())) for g, b in q.bits_by_group("act").items()}
    return {"w": {g: sorted(b) for g, b in q.bits_by_group("weight").items()}, "a": act}


def _weight_groups(calib: Calibration, group_sizes: Sequence[int]) -> dict[str, list[int]]:
    """Per layer, the weight group sizes of the recipe that the calibration holds scales for (only
    those smaller than the layer's input columns): each adds one weight option per width."""
    return {name: sorted({g for _, g in p.group_scales if g in group_sizes}) for name, p in calib.params.items()}


def _load_model(run: RunSettings, s: SensitivitySettings, ws: Workspace, calib: Calibration) -> ModelBundle:
    bundle = load_calibrated(run, ws, batch_size=int(s.batch_size), calib=calib)
    if list(bundle.layers) != calib.layer_names:
        raise ValueError(f"{calib.path} lists the quantizable layers in another order (or set) than model="
                         f"{bundle.spec.name} wraps them: rerun stage=calibrate")
    cuda = bundle.device.type == "cuda"
    compile_decoder = cuda if s.compile_decoder == "auto" else bool(s.compile_decoder)
    # NHWC pays only once compiled (bf16 on an H100: 0.39 s compiled NHWC, 0.42 s compiled NCHW,
    # 0.56 s eager NCHW, 0.79 s eager NHWC per 32-image content evaluation).
    nhwc = cuda and compile_decoder if s.decoder_channels_last == "auto" else bool(s.decoder_channels_last)
    bundle.sampler.optimize_decoder(channels_last=nhwc, compile=compile_decoder)
    return bundle


def _timing(records, tasks: Sequence[sens.Task]) -> dict[str, Any]:
    """Seconds per layer-evaluation (one layer, one bit) by group, and the projected full sweep."""
    per = {"content": [], "quality": []}
    for rec in records:
        per[rec["group"]].append(rec["seconds"] / max(1, len(rec["values"])))
    mean = {g: (sum(v) / len(v) if v else None) for g, v in per.items()}
    evals = {g: sum(len(t.bits) for t in tasks if t.group == g) for g in per}
    projected = sum(evals[g] * mean[g] for g in per if mean[g] is not None) if all(
        mean[g] is not None or evals[g] == 0 for g in per) else None
    return {"seconds_per_eval": mean, "evals": evals, "projected_sweep_s": projected,
            "measured_eval_s": sum(rec["seconds"] for rec in records)}
