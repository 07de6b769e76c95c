"""Metric-decoupled sensitivity: quantize one layer, regenerate, compare with full precision.

Content-related layers are scored by SSIM between decoded images, quality-related layers by SQNR
(dB) of the denoiser output over all sampler steps; both per prompt, higher is better.
Full-precision references are computed once. Several single-layer perturbations can share one
batched generation (``perturbations_per_batch``): batch rows ``j*P .. j*P+P-1`` (P prompts) see
only perturbation ``j``'s layer quantized, every other layer in full precision, so each row
computes what the one-layer-at-a-time path computes (up to float rounding of batched GEMMs) at a
lower cost per image where small batches use the hardware poorly (CPU). The sweep appends one record per (layer, kind) to a
JSON-lines file as soon as it is finished, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixprec.generation import Sampler
from mixprec.metrics import sqnr_db_per_sample, ssim_torch
from mixprec.quant.options import option_order, parse_weight_option, table_key
from mixprec.quantizers import QuantLayer, RowOption

KINDS = ("w", "a")


@dataclass(frozen=True)
class Task:
    """One layer, one kind (weights or input activations), every candidate bit-width (weights: every
    option, ``4`` per channel or ``"4g64"`` per group of 64 input columns)."""

    layer: str
    group: str  # content | quality
    kind: str  # w | a
    bits: tuple[int | str, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.layer}"


@dataclass
class Reference:
    images: torch.Tensor | None  # decoded full-precision images (content metric)
    denoiser: torch.Tensor | None  # full-precision denoiser outputs, all steps (quality metric)


def make_tasks(layer_groups: Mapping[str, str], weight_bits: Sequence[int], act_bits: Sequence[int],
               kinds: Sequence[str] = KINDS, weight_groups: Mapping[str, Sequence[int]] | None = None,
               allowed: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> list[Task]:
    """Tasks in a fixed order: every layer's weights, then every layer's activations (module order).

    ``weight_groups``: layer -> the weight group sizes calibrated for it; each adds one option per
    weight width (``"4g64"``), measured after the per-channel ones.
    ``allowed``: kind (``"w"``/``"a"``) -> group -> the widths a plan may give that group's layers
    (``quant.weight_bits_by_group``): options of other widths are not measured, since no plan can
    use them (a layer left with none gets no task). A kind or group it does not name keeps every width.
    """
    tasks = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"sensitivity kinds are 'w' and 'a', got {kind!r}")
        bits = tuple(sorted(int(b) for b in (weight_bits if kind == "w" else act_bits)))
        usable = {g: {int(b) for b in widths} for g, widths in (allowed or {}).get(kind, {}).items()}
        for name, group in layer_groups.items():
            mine = tuple(b for b in bits if group not in usable or b in usable[group])
            if not mine:
                continue
            sizes = sorted((weight_groups or {}).get(name, ())) if kind == "w" else []
            tasks.append(Task(name, group, kind, mine + tuple(f"{b}g{g}" for g in sizes for b in mine)))
    return tasks


def fill_batch(batch_size: int, prompts: int) -> int:
    """Single-layer perturbations per batched generation that fill ``batch_size`` rows
    (perturbations x prompts), at least one: one batch holds no more rows than the one-at-a-time path's."""
    return max(1, int(batch_size) // max(1, prompts))


def shard_tasks(tasks: Sequence[Task], shard: int, num_shards: int) -> list[Task]:
    """A disjoint, interleaved slice (content and quality layers spread evenly over shards)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards), got shard={shard} num_shards={num_shards}")
    return [t for i, t in enumerate(tasks) if i % num_shards == shard]


def compute_reference(sampler: Sampler, prompts: Sequence[str], seeds: Sequence[int], need_images: bool,
                      need_denoiser: bool) -> Reference:
    out_img = sampler.generate(prompts, seeds, decode=True, keep_on_device=True) if need_images else None
    out_den = sampler.denoiser_outputs(prompts, seeds) if need_denoiser else None
    return Reference(images=out_img.images if out_img else None, denoiser=out_den)


def score(sampler: Sampler, group: str, ref: Reference, prompts: Sequence[str], seeds: Sequence[int],
          sqnr_cap_db: float) -> list[float]:
    """Per-prompt metric of the model as it is now set, against the full-precision reference."""
    if group == "content":
        images = sampler.generate(prompts, seeds, decode=True, keep_on_device=True).images
        values = ssim_torch(ref.images.float(), images.float())
    else:
        den = sampler.denoiser_outputs(prompts, seeds)
        values = sqnr_db_per_sample(ref.denoiser, den).clamp(max=sqnr_cap_db)
    return [float(v) if math.isfinite(float(v)) else float(sqnr_cap_db) for v in values.cpu()]


def evaluate_task(task: Task, layer: QuantLayer, sampler: Sampler, ref: Reference, prompts: Sequence[str],
                  seeds: Sequence[int], sqnr_cap_db: float) -> dict[int | str, list[float]]:
    values: dict[int | str, list[float]] = {}
    try:
        for b in task.bits:
            if task.kind == "w":
                opt = parse_weight_option(b)
                layer.set_bits(w_bits=opt.bits, w_group=opt.group_size)
            else:
                layer.set_bits(a_bits=int(b))
            values[b] = score(sampler, task.group, ref, prompts, seeds, sqnr_cap_db)
    finally:
        layer.set_bits(None, None)
        layer.drop_cache()
    return values


def _row_option(layer: QuantLayer, kind: str, bits: int | str, rows: torch.Tensor, batch: int) -> RowOption:
    """The option ``bits`` of ``layer`` for some batch rows (checked by set_bits, as the one-by-one path)."""
    try:
        if kind == "w":
            opt = parse_weight_option(bits)
            layer.set_bits(w_bits=opt.bits, w_group=opt.group_size)
            return RowOption(rows, batch, layer.quantized_weight(), None)
        layer.set_bits(a_bits=int(bits))
        return RowOption(rows, batch, layer.inner.weight, int(bits))
    finally:
        layer.set_bits(None, None)


def _tile(t: torch.Tensor | None, times: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))


def evaluate_perturbations(perturbations: Sequence[tuple[Task, int | str]], layers: Mapping[str, QuantLayer],
                           sampler: Sampler, ref: Reference, prompts: Sequence[str], seeds: Sequence[int],
                           sqnr_cap_db: float, pad_to: int = 0) -> list[list[float]]:
    """Per (task, bits) perturbation of one metric group, the per-prompt metric, from ONE batched
    generation of ``max(len(perturbations), pad_to) * len(prompts)`` rows (perturbation-major; padding
    rows run full precision). A fixed batch shape keeps each row's rounding independent of how many
    perturbations were left (a resumed or sharded sweep writes the same bytes)."""
    groups = {task.group for task, _ in perturbations}
    if len(groups) != 1:
        raise ValueError(f"one batch of perturbations takes one metric group, got {sorted(groups)}")
    n, count = len(prompts), max(len(perturbations), int(pad_to))
    batch = n * count
    cfg = sampler.classifier_free_guidance  # the denoiser sees [uncond; cond]: every row twice
    touched: list[QuantLayer] = []
    old_batch_size = sampler.batch_size
    try:
        for j, (task, bits) in enumerate(perturbations):
            rows = torch.arange(j * n, (j + 1) * n, device=sampler.device)
            rows = torch.cat([rows, rows + batch]) if cfg else rows
            layer = layers[task.layer]
            layer.row_options.append(_row_option(layer, task.kind, bits, rows, 2 * batch if cfg else batch))
            touched.append(layer)
        sampler.batch_size = batch
        tiled = Reference(images=_tile(ref.images, count), denoiser=_tile(ref.denoiser, count))
        values = score(sampler, groups.pop(), tiled, list(prompts) * count, list(seeds) * count, sqnr_cap_db)
    finally:
        sampler.batch_size = old_batch_size
        for layer in touched:
            layer.row_options.clear()
            layer.drop_cache()
    return [values[j * n:(j + 1) * n] for j in range(len(perturbations))]


def _one_by_one(todo: Sequence[Task], layers: Mapping[str, QuantLayer], sampler: Sampler, ref: Reference,
                prompts: Sequence[str], seeds: Sequence[int], sqnr_cap_db: float):
    """(task, values by bits, seconds) per task: one generation per (layer, bits)."""
    for task in todo:
        start = time.perf_counter()
        values = evaluate_task(task, layers[task.layer], sampler, ref, prompts, seeds, sqnr_cap_db)
        if sampler.device.type == "cuda":
            torch.cuda.synchronize()
        yield task, values, time.perf_counter() - start


def _batched(todo: Sequence[Task], layers: Mapping[str, QuantLayer], sampler: Sampler, ref: Reference,
             prompts: Sequence[str], seeds: Sequence[int], sqnr_cap_db: float, per_batch: int):
    """(task, values by bits, seconds) per task as its last bit finishes: ``per_batch`` (layer, bits)
    perturbations of one metric group per generation; a batch's time is shared by its perturbations."""
    values: dict[str, dict[int | str, list[float]]] = {}
    seconds: dict[str, float] = {}
    for group in ("content", "quality"):
        evals = [(t, b) for t in todo if t.group == group for b in t.bits]
        for i in range(0, len(evals), per_batch):
            chunk = evals[i:i + per_batch]
            start = time.perf_counter()
            scores = evaluate_perturbations(chunk, layers, sampler, ref, prompts, seeds, sqnr_cap_db, per_batch)
            if sampler.device.type == "cuda":
                torch.cuda.synchronize()
            share = (time.perf_counter() - start) / len(chunk)
            for (task, bits), v in zip(chunk, scores):
                values.setdefault(task.key, {})[bits] = v
                seconds[task.key] = seconds.get(task.key, 0.0) + share
                if len(values[task.key]) == len(task.bits):
                    yield task, {b: values[task.key][b] for b in task.bits}, seconds.pop(task.key)


# --------------------------------------------------------------------------- records
class RecordFile:
    """Append-only JSON lines; a line cut short by a crash is dropped (and rewritten) on resume."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lines = 0  # complete lines seen by the last load (more than its keys: duplicated records)

    def load(self, repair: bool = True) -> dict[str, dict[str, Any]]:
        """Records by key. ``repair=False`` only reads: another process (a shard still running) may be
        appending, and cutting its half-written line would lose that record."""
        records: dict[str, dict[str, Any]] = {}
        self.lines = 0
        if not self.path.exists():
            return records
        good_bytes = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    break
                records[f"{rec['kind']}:{rec['layer']}"] = rec
                good_bytes += len(raw)
                self.lines += 1
        if repair and good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def run_tasks(tasks: Sequence[Task], layers: Mapping[str, QuantLayer], sampler: Sampler, ref: Reference,
              prompts: Sequence[str], seeds: Sequence[int], records: RecordFile, sqnr_cap_db: float = 100.0,
              max_tasks: int | None = None, progress: bool = True,
              on_record: Callable[[dict[str, Any]], None] | None = None,
              perturbations_per_batch: int = 1) -> dict[str, dict[str, Any]]:
    """Evaluate the tasks that have no record yet; returns all records of these tasks found or made.

    ``perturbations_per_batch`` > 1 evaluates that many (layer, bits) perturbations per batched
    generation (:func:`evaluate_perturbations`); 1 is the one-at-a-time path."""
    done = records.load()
    todo = [t for t in tasks if t.key not in done]
    if max_tasks is not None:
        todo = todo[: max(0, int(max_tasks))]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(t.bits) for t in todo), desc="sensitivity", unit="eval", dynamic_ncols=True)
    per_batch = max(1, int(perturbations_per_batch))
    results = (_batched(todo, layers, sampler, ref, prompts, seeds, sqnr_cap_db, per_batch) if per_batch > 1
               else _one_by_one(todo, layers, sampler, ref, prompts, seeds, sqnr_cap_db))
    try:
        for task, values, seconds in results:
            rec = {"layer": task.layer, "group": task.group, "kind": task.kind,
                   "values": {str(b): v for b, v in values.items()}, "seconds": round(seconds, 4)}
            records.append(rec)
            done[task.key] = rec
            if on_record:
                on_record(rec)
            if bar is not None:
                bar.update(len(task.bits))
                bar.set_postfix_str(f"{task.kind} {task.layer[-40:]}")
    finally:
        if bar is not None:
            bar.close()
    return {t.key: done[t.key] for t in tasks if t.key in done}


def per_prompt_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for b, vals in rec["values"].items():
            for i, v in enumerate(vals):
                rows.append({"kind": rec["kind"], "group": rec["group"], "layer": rec["layer"], "bits": table_key(b),
                             "prompt": i, "value": repr(float(v))})
    return rows


def per_prompt_table(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, dict[int, list[float]]]]]:
    """``{"weight" | "act": {group: {layer: {bits: [value per prompt]}}}}``: per kind, what
    :func:`mixprec.allocation.allocate` takes (the same table ``sensitivity_per_prompt.csv`` holds).
    Per-group weight options have string keys (``"4g64"``, :mod:`mixprec.quant.options`)."""
    out: dict[str, dict[str, dict[str, dict[int, list[float]]]]] = {
        kind: {"content": {}, "quality": {}} for kind in ("weight", "act")}
    for rec in records:
        kind = "weight" if rec["kind"] == "w" else "act"
        out[kind][rec["group"]][rec["layer"]] = {table_key(b): [float(v) for v in vals]
                                                 for b, vals in rec["values"].items()}
    return out


def mean_table(records: Iterable[Mapping[str, Any]], kind: str, group: str) -> dict[str, dict[int, float]]:
    """layer -> {bits: mean over prompts} for one kind and group, in record order."""
    out: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec["kind"] == kind and rec["group"] == group:
            out[rec["layer"]] = {table_key(b): float(sum(v) / len(v))
                                 for b, v in sorted(rec["values"].items(), key=lambda kv: option_order(kv[0]))}
    return out


def monotone_fraction(table: Mapping[str, Mapping[int, float]], tol: float = 0.0) -> float:
    """Fraction of layers whose metric does not decrease as bits increase (within ``tol``), for each
    granularity (per channel, each group size) on its own."""
    if not table:
        return float("nan")
    ok = 0
    for per_bit in table.values():
        keys = sorted(per_bit, key=option_order)
        ok += all(per_bit[k2] >= per_bit[k1] - tol for k1, k2 in zip(keys, keys[1:])
                  if option_order(k1)[0] == option_order(k2)[0])
    return ok / len(table)


def choose_protected(act_tables: Mapping[str, Mapping[str, Mapping[int, float]]], counts: Mapping[str, int],
                     always: Sequence[str], bits: int = 8) -> dict[str, str]:
    """Layers kept in full precision for activations: the ``counts[group]`` lowest metrics at ``bits``.

    Returns layer -> reason. ``always`` (first and last convolutions) are added whatever their score.
    """
    chosen: dict[str, str] = {name: "first/last convolution" for name in always}
    for group, table in act_tables.items():
        n = int(counts.get(group, 0))
        ranked = sorted((per_bit[bits], name) for name, per_bit in table.items() if bits in per_bit and name not in chosen)
        for value, name in ranked[:n]:
            chosen[name] = f"{group}: lowest {'SSIM' if group == 'content' else 'SQNR'} at A{bits} ({value:.4g})"
    return chosen
