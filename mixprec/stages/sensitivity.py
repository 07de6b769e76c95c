"""stage=sensitivity: every layer, every bit, weights and activations; resumable and shardable.

Records go to ``sensitivity/shard<i>of<n>.jsonl`` as each layer finishes. When every shard of the
sweep is complete (immediately, for one shard) they are merged into
``sensitivity_{w,a}_{content,quality}.yaml`` (layer -> bits -> mean metric),
``sensitivity_per_prompt.csv`` and ``protected_layers.yaml``, with plots by depth.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mixprec import sensitivity as sens
from mixprec.models import _matches, layer_group
from mixprec.settings import is_forced
from mixprec.stages.common import (Calibration, ModelBundle, load_calibrated, model_spec, prompt_set, quant_recipe,
                                   read_calibration, to_dict, tracker)
from mixprec.workspace import Workspace, fingerprint

log = logging.getLogger("mixprec")

RECORD_DIR = "sensitivity"
PER_PROMPT_CSV = "sensitivity_per_prompt.csv"
PROTECTED_YAML = "protected_layers.yaml"
PLOT_DIR = "sensitivity_plots"


def table_name(kind: str, group: str) -> str:
    return f"sensitivity_{kind}_{group}.yaml"


def _shard_paths(i: int, n: int) -> tuple[str, str]:
    return f"{RECORD_DIR}/shard{i}of{n}.json", f"{RECORD_DIR}/shard{i}of{n}.jsonl"


class ShardError(ValueError):
    pass


@contextlib.contextmanager
def _flock(path: Path, wait: bool, busy: str) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (flock; NFS v4 maps it to a POSIX lock).

    Shard jobs of a sweep may run at once: the per-shard lock keeps a shard launched twice from
    appending to one records file from two processes, and the merge lock keeps two shards that
    finish together from writing the merged outputs at the same time.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ShardError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _identity(ws: Workspace, pairs, tasks: Sequence[sens.Task], num_shards: int, cap: float) -> dict[str, Any]:
    return {"fingerprints": ws.fingerprints, "prompts": [list(p) for p in pairs], "num_shards": num_shards,
            "sqnr_cap_db": cap, "tasks": fingerprint([[t.kind, t.layer, t.group, list(t.bits)] for t in tasks]),
            "num_tasks": len(tasks)}


def _check_header(ws: Workspace, i: int, identity: Mapping[str, Any], restart: bool, force: bool = False) -> None:
    header, records = _shard_paths(i, identity["num_shards"])
    if force and ws.exists(records):
        # stage.force: measure again, whatever the stored records were made with.
        log.info("sensitivity: stage.force discards the %s stored records of shard %d", records, i)
        ws.path(records).unlink()
    elif ws.exists(header):
        old = ws.read_json(header, "sensitivity")
        if old.get("identity") != identity:
            if not restart:
                raise ShardError(
                    f"{ws.path(records)} holds records of a sensitivity sweep with other settings (prompts, bits, "
                    f"layers or fingerprints differ). Rerun with stage.restart=true to discard them, or use another "
                    f"paths.workspace.")
            ws.path(records).unlink(missing_ok=True)
    ws.write_json(header, {"shard": i, "identity": identity})


def merge(ws: Workspace, tasks: Sequence[sens.Task], identity: Mapping[str, Any], strict: bool) -> list[dict] | None:
    """All records in task order, or None (strict=False) / ShardError (strict=True) when a shard is not ready."""
    n = identity["num_shards"]
    problems, by_key = [], {}
    for i in range(n):
        header, records = _shard_paths(i, n)
        if not ws.exists(header):
            problems.append(f"shard {i} has not run (run stage.shard={i} stage.num_shards={n})")
            continue
        if ws.read_json(header, "sensitivity").get("identity") != identity:
            problems.append(f"shard {i} was run with other settings (prompts, bits, layers or model differ); "
                            f"rerun it with stage.shard={i} stage.num_shards={n} stage.restart=true")
            continue
        record_file = sens.RecordFile(ws.path(records))
        found = record_file.load(repair=False)
        expected = sens.shard_tasks(tasks, i, n)
        missing = [t.key for t in expected if t.key not in found]
        stray = set(found) - {t.key for t in expected}
        if record_file.lines > len(found):
            problems.append(f"shard {i} holds {record_file.lines - len(found)} duplicated records (was it run twice "
                            f"at once?); rerun it with stage.shard={i} stage.num_shards={n} stage.restart=true")
        if stray:
            problems.append(f"shard {i} holds {len(stray)} records that belong to no task of shard {i}/{n}")
        if missing:
            problems.append(f"shard {i} is incomplete ({len(expected) - len(missing)}/{len(expected)} tasks); "
                            f"rerun stage.shard={i} stage.num_shards={n} to resume it")
        by_key.update({k: v for k, v in found.items() if k not in stray})
    if problems:
        if strict:
            raise ShardError("cannot merge the sensitivity shards: " + "; ".join(problems))
        log.info("sensitivity not merged yet: %s", "; ".join(problems))
        return None
    return [by_key[t.key] for t in tasks]


def write_outputs(ws: Workspace, records: list[dict], census_order: Sequence[str], counts: Mapping[str, int],
                  always_protect: Sequence[str], act_bits_for_protection: int) -> dict[str, Any]:
    tables = {(k, g): sens.mean_table(records, k, g) for k in sens.KINDS for g in ("content", "quality")}
    for (k, g), table in tables.items():
        ws.write_yaml(table_name(k, g), table)
    ws.write_csv(PER_PROMPT_CSV, sens.per_prompt_rows(records), ["kind", "group", "layer", "bits", "prompt", "value"])
    protected = {}
    if any(tables[("a", g)] for g in ("content", "quality")):
        protected = sens.choose_protected({g: tables[("a", g)] for g in ("content", "quality")}, counts,
                                          always_protect, bits=act_bits_for_protection)
        protected = {n: protected[n] for n in census_order if n in protected}
    ws.write_yaml(PROTECTED_YAML, list(protected))
    plot_paths = _plots(ws, tables, census_order)
    return {"tables": tables, "protected": protected, "plots": plot_paths}


def _plots(ws: Workspace, tables, census_order: Sequence[str]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = {n: i for i, n in enumerate(census_order)}
    paths = []
    for (kind, group), table in tables.items():
        if not table:
            continue
        fig, ax = plt.subplots(figsize=(10, 3.2))
        names = sorted(table, key=depth.get)
        for b in sorted({b for v in table.values() for b in v}):
            ax.plot([depth[n] for n in names], [table[n][b] for n in names], marker=".", lw=0.8,
                    label=f"{'W' if kind == 'w' else 'A'}{b}")
        ax.set_xlabel("layer depth (module order)")
        ax.set_ylabel("SSIM" if group == "content" else "SQNR (dB)")
        ax.set_title(f"{'weight' if kind == 'w' else 'activation'} sensitivity, {group} layers")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        name = f"{PLOT_DIR}/sens_{kind}_{group}.png"
        with ws.atomic_path(name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(name)
    return paths


def _first_last_convs(layer_names: Sequence[str], layer_types: Mapping[str, bool]) -> list[str]:
    convs = [n for n in layer_names if layer_types[n]]
    return [convs[0], convs[-1]] if len(convs) >= 2 else convs


def run(cfg: DictConfig, ws: Workspace) -> dict:
    s = cfg.stage
    i, n = int(s.shard), int(s.num_shards)
    if not 0 <= i < n:
        raise ShardError(f"stage.shard must be in [0, stage.num_shards), got shard={i} num_shards={n}")
    # The tasks, the shard's records and the merge need only the calibration file: the model is
    # loaded when there is work for it (a rerun of a finished shard just reports or merges).
    calib = read_calibration(cfg, ws)
    loaded: list[ModelBundle] = []

    def model() -> ModelBundle:
        if not loaded:
            loaded.append(_load_model(cfg, ws, calib))
        return loaded[0]

    q = quant_recipe(cfg)
    pairs = prompt_set(cfg, "sensitivity")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    all_groups = {name: layer_group(name, model_spec(cfg).content_patterns) for name in calib.layer_names}
    # stage.layers: a fixed slice of the layers (patterns as in model.exclude_patterns), e.g. to measure speed.
    only = list(s.get("layers") or [])
    groups = {name: g for name, g in all_groups.items() if not only or _matches(name, only)}
    if not groups:
        raise ValueError(f"stage.layers={only} matches none of the {len(all_groups)} quantizable layers")
    wbits = list(s.weight_bits) if s.get("weight_bits") else list(q["weight_bits"])
    abits = list(s.act_bits) if s.get("act_bits") else list(q["act_bits"])
    tasks = sens.make_tasks(groups, wbits, abits, kinds=list(s.kinds))
    all_tasks = sens.make_tasks(all_groups, wbits, abits, kinds=list(s.kinds))
    cap = float(s.sqnr_cap_db)
    identity = _identity(ws, pairs, tasks, n, cap)
    mine = sens.shard_tasks(tasks, i, n)

    merged = None
    merging = contextlib.ExitStack()
    with tracker(cfg, ws, "sensitivity", {"shard": i, "num_shards": n}) as track, merging:
        if not s.merge_only:
            busy = (f"shard {i} of {n} is being run by another process in {ws.root} (lock "
                    f"{RECORD_DIR}/shard{i}of{n}.lock); a shard runs once at a time")
            with _flock(ws.path(f"{RECORD_DIR}/shard{i}of{n}.lock"), wait=False, busy=busy):
                _check_header(ws, i, identity, bool(s.restart), is_forced(s.get("force"), "sensitivity"))
                records_file = sens.RecordFile(ws.path(_shard_paths(i, n)[1]))
                pending = [t for t in mine if t.key not in records_file.load()]
                if pending and (s.max_tasks is None or int(s.max_tasks) > 0):
                    need_img = any(t.group == "content" for t in pending)
                    need_den = any(t.group == "quality" for t in pending)
                    bundle = model()
                    ref = sens.compute_reference(bundle.sampler, prompts, seeds, need_img, need_den)
                    sens.run_tasks(mine, bundle.layers, bundle.sampler, ref, prompts, seeds, records_file, cap,
                                   max_tasks=s.max_tasks, progress=bool(s.progress))
        merged = merge(ws, tasks, identity, strict=bool(s.merge_only))
        if merged is not None:
            # Shards that finish together both see a complete sweep: the second waits here, then rewrites the
            # same bytes (atomic renames); the lock is held until the stage ends.
            merging.enter_context(_flock(ws.path(f"{RECORD_DIR}/merge.lock"), wait=True, busy=""))
        headline: dict[str, Any] = {"shard": i, "num_shards": n, "tasks": len(tasks), "shard_tasks": len(mine),
                                    "prompts": len(pairs), "merged": merged is not None}
        shard_records = sens.RecordFile(ws.path(_shard_paths(i, n)[1])).load(repair=False)
        headline["shard_tasks_done"] = sum(t.key in shard_records for t in mine)
        # Merged: the whole sweep's timing (every shard); the projection counts every layer, also with stage.layers.
        headline.update(_timing(merged if merged is not None else shard_records.values(), all_tasks))
        if merged is None:
            return headline
        always = []
        if q["protect_act"]["first_last_conv"]:
            is_conv = {name: layer.is_conv for name, layer in model().layers.items()}
            always = _first_last_convs(calib.layer_names, is_conv)
        out = write_outputs(ws, merged, calib.layer_names, to_dict(q["protect_act"]), always, max(abits))
        headline["protected"] = out["protected"]
        headline["monotone_fraction"] = {f"{k}_{g}": sens.monotone_fraction(t) for (k, g), t in out["tables"].items() if t}
        headline["layers"] = {f"{k}_{g}": len(t) for (k, g), t in out["tables"].items()}
        for (k, g), table in out["tables"].items():
            if table:
                bits = sorted({b for v in table.values() for b in v})
                track.log_table(f"sensitivity/{k}_{g}", ["layer"] + [f"{k}{b}" for b in bits],
                                [[name] + [v.get(b) for b in bits] for name, v in table.items()])
        for p in out["plots"]:
            track.log_file_image(p.replace("/", "_").removesuffix(".png"), ws.path(p))
        track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
    return headline


def _load_model(cfg: DictConfig, ws: Workspace, calib: Calibration) -> ModelBundle:
    s = cfg.stage
    bundle = load_calibrated(cfg, ws, batch_size=int(s.batch_size), calib=calib)
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
