"""Everything a report shows, read from one workspace folder into plain Python.

Each artifact is optional: a missing one leaves its field empty and its section out of the page.
Nothing here imports torch or loads a model, so reports of big workspaces (or of synthetic ones,
with no model at all) build quickly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixprec import artifacts
from mixprec.artifacts import FULL_PRECISION_BITS, CensusLayer, PlanFile, read_stage_records  # noqa: F401
from mixprec.search.pareto import pareto_front
from mixprec.search.program import mean_bits

Layer = CensusLayer  # a census row as the report shows it
Finals = PlanFile  # a final plan, full-precision layers at 16 bits


def flow_phase(block: str) -> int:
    """Where a block sits in a denoiser's data flow: stem, down path, middle, up path, head.

    diffusers registers ``mid_block`` after ``up_blocks`` (and PixArt registers ``proj_out`` before
    its timestep and caption embeddings); sorting by this phase first puts the layers in the order
    an activation passes through them, which is what "depth" should mean.
    """
    head = block.split(".")[0]
    return {"down_blocks": 1, "mid_block": 2, "transformer_blocks": 2, "up_blocks": 3, "conv_norm_out": 4,
            "conv_out": 4, "proj_out": 4}.get(head, 0)


@dataclass
class Source:
    """What a section's numbers were computed from; ``stale`` says why they no longer describe the workspace."""

    record: str
    fingerprints: dict[str, str]
    plans_digest: str | None
    stale: str | None = None

    def describe(self) -> str:
        parts = [f"{k} fingerprint {v}" for k, v in self.fingerprints.items()]
        parts += [f"final plans {self.plans_digest}"] if self.plans_digest else []
        return f"source: {artifacts.stage_record(self.record)}" + (f" ({'; '.join(parts)})" if parts else "")


@dataclass
class WorkspaceData:
    root: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: list[Layer] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    # {("w" | "a", group): {layer: {bits: mean metric}}}
    sensitivity: dict[tuple[str, str], dict[str, dict[int, float]]] = field(default_factory=dict)
    sensitivity_source: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    selection: list[dict[str, Any]] = field(default_factory=list)
    finals: dict[str, Finals] = field(default_factory=dict)
    infer: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    evaluate_md: str | None = None
    benchmark: dict[str, Any] | None = None
    generated: list[tuple[str, str | None]] = field(default_factory=list)  # (quantized, full precision) paths
    select_reference: str | None = None
    plots: list[str] = field(default_factory=list)
    # digest of the final plans' bits (mixprec.search.plans_digest): what current results come from
    plans_digest: str | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @functools.cached_property
    def latency_table_json(self) -> dict[str, Any] | None:
        """The workspace's ``layer_latency.json`` (stage=latency_table), read once per report; None
        when there is none; ``ValueError`` when it is not JSON (not cached: the caller says why)."""
        path = self.root / artifacts.LAYER_LATENCY
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def quantizable(self) -> list[Layer]:
        return [l for l in self.layers if not l.excluded]

    @property
    def blocks(self) -> list[str]:
        """Blocks in data-flow order."""
        seen: dict[str, None] = {}
        for l in self.layers:
            seen.setdefault(l.block, None)
        return list(seen)

    def fingerprints(self) -> dict[str, dict[str, str]]:
        return {s: dict(r.get("fingerprints") or {}) for s, r in self.stages.items() if r.get("fingerprints")}

    def config(self) -> dict[str, Any] | None:
        """The resolved config of the most complete stage record (the pipeline's when there is one)."""
        for s in ("pipeline", "infer", "select", "allocate_weight", "allocate", "sensitivity", "calibrate", "inspect"):
            if s in self.stages and self.stages[s].get("config"):
                return self.stages[s]["config"]
        return next((r["config"] for r in self.stages.values() if r.get("config")), None)

    def current_fingerprints(self) -> dict[str, str]:
        """The model and quantization fingerprints of the workspace's calibration (else its newest record)."""
        for s in ("calibrate", "pipeline", "sensitivity", "select", "infer"):
            if (self.stages.get(s) or {}).get("fingerprints"):
                return dict(self.stages[s]["fingerprints"])
        return next(iter(self.fingerprints().values()), {})

    def source(self, result: str) -> "Source":
        """Where the numbers of ``result`` (infer, benchmark, evaluate, select, sensitivity...) came from,
        and why they are stale when they are (computed from other final plans or another recipe)."""
        rec = self.stages.get(result) or {}
        headline = rec.get("headline") or {}
        fps = dict(rec.get("fingerprints") or {})
        digest = headline.get("plans_digest")
        reasons = []
        if fps and self.current_fingerprints() and fps != self.current_fingerprints():
            reasons.append(f"{result}.json was made for another model or quantization recipe "
                           f"(fingerprints {fps}, the workspace's are {self.current_fingerprints()})")
        uses_finals = result == "infer" or (result == "benchmark" and "final" in (headline.get("plans") or []))
        if uses_finals and headline.get("execution") == "checkpoint":
            reasons.append(f"computed from the quantized checkpoint {(headline.get('checkpoint') or {}).get('path')}, "
                           f"not from the final plans")
        elif uses_finals:
            if not self.finals:
                reasons.append("the final plans it was computed from are gone")
            elif digest is None:
                reasons.append(f"{result}.json does not record which final plans it was computed from "
                               f"(written by an older mixprec)")
            elif digest != self.plans_digest:
                reasons.append(f"computed from other final plans (digest {digest}; the final plans now are "
                               f"{self.plans_digest})")
        stale = "; ".join(reasons) + f": rerun `python run.py stage={result}`" if reasons else None
        return Source(result, fps, digest if uses_finals else None, stale)

    def chosen_paths(self) -> dict[str, str]:
        """kind -> plan path the select stage kept."""
        return {k: f.header.get("selected_from") for k, f in self.finals.items() if f.header.get("selected_from")}


# ------------------------------------------------------------------ readers

def read_layers(path: Path, protected: Sequence[str] = ()) -> list[Layer]:
    """The census in data-flow order (stable: module order within a phase), with depths."""
    layers = artifacts.read_layers(path, protected)
    order = sorted(range(len(layers)), key=lambda i: (flow_phase(layers[i].block), i))
    layers = [layers[i] for i in order]
    for d, layer in enumerate(layers):
        layer.depth = d
    return layers


def read_candidates(root: Path) -> list[dict[str, Any]]:
    """Candidate plans with their Pareto mark: ``pareto.csv`` when it lists every plan, else recomputed."""
    from mixprec.allocation import mark_front

    n_plans = len(artifacts.plan_paths(root))
    rows = artifacts.read_pareto_csv(root)
    if n_plans and len(rows) != n_plans:
        # a single-candidate allocate job adds plans without refreshing pareto.csv
        rows = [artifacts.typed_candidate_row(r) for r in mark_front(artifacts.collect_candidates(root))]
    return rows


def load_workspace(root: str | Path) -> WorkspaceData:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"workspace {root} does not exist; pass paths.workspace (or stage.compare) "
                                f"pointing at a folder that a mixprec stage wrote")
    d = WorkspaceData(root=root)
    d.stages = read_stage_records(root)
    if (root / artifacts.PROTECTED_YAML).exists():
        d.protected = [str(n) for n in (artifacts._yaml(root / artifacts.PROTECTED_YAML) or [])]
    if (root / artifacts.LAYERS_CSV).exists():
        d.layers = read_layers(root / artifacts.LAYERS_CSV, d.protected)
    d.sensitivity, d.sensitivity_source = artifacts.read_sensitivity_tables(root)
    from mixprec.search import natural_key, plans_digest

    d.candidates = sorted(read_candidates(root), key=lambda r: (r["kind"] != "weight", natural_key(str(r["path"]))))
    d.selection = artifacts.read_selection(root)
    raw_finals = artifacts.read_final_plans(root)  # bits as stored (null: full precision)
    d.finals = {k: Finals(f.path, f.header, f.bits_or_full(), f.group_size) for k, f in raw_finals.items()}
    d.plans_digest = plans_digest(raw_finals) if raw_finals else None
    d.infer = artifacts.read_headline(root, "infer")
    d.evaluate = artifacts.read_headline(root, "evaluate")
    if (root / artifacts.EVALUATE_MD).exists():
        d.evaluate_md = (root / artifacts.EVALUATE_MD).read_text()
    d.benchmark = artifacts.read_headline(root, "benchmark")
    d.generated = artifacts.generated_image_pairs(root)
    if (root / artifacts.SELECT_GRIDS_DIR / "full_precision.png").exists():
        d.select_reference = f"{artifacts.SELECT_GRIDS_DIR}/full_precision.png"
    return d


# ------------------------------------------------------------------ derived views

def census_by_block(layers: Sequence[Layer]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for l in layers:
        r = rows.setdefault(l.block, {"block": l.block, "layers": 0, "linear": 0, "conv": 0, "content": 0,
                                      "quality": 0, "params": 0, "act_elems": 0, "protected": 0, "excluded": 0})
        r["layers"] += 1
        r["conv" if l.type == "Conv2d" else "linear"] += 1
        if l.excluded:
            r["excluded"] += 1
        else:
            r[l.group] += 1
        r["params"] += l.params
        r["act_elems"] += l.act_elems
        r["protected"] += int(l.protected)
    return list(rows.values())


def roles_of_block(layers: Sequence[Layer], block: str) -> list[dict[str, Any]]:
    """One row per layer role within a block (e.g. every ``attn2.to_k`` of its transformer blocks)."""
    rows: dict[str, dict[str, Any]] = {}
    for l in layers:
        if l.block != block:
            continue
        r = rows.setdefault(l.role, {"role": l.role, "type": l.type, "group": l.group, "layers": 0, "params": 0,
                                     "act_elems": 0})
        r["layers"] += 1
        r["params"] += l.params
        r["act_elems"] += l.act_elems
    return list(rows.values())


def allocation_by_block(layers: Sequence[Layer], bits: Mapping[str, int], size_attr: str) -> list[dict[str, Any]]:
    """Per block: size at each bit-width (layers missing from the plan count as full precision)."""
    rows: dict[str, dict[str, Any]] = {}
    for l in layers:
        if l.excluded:
            continue
        b = int(bits.get(l.name, FULL_PRECISION_BITS))
        r = rows.setdefault(l.block, {"block": l.block, "by_bits": {}, "layers_by_bits": {}, "size": 0})
        size = getattr(l, size_attr)
        r["by_bits"][b] = r["by_bits"].get(b, 0) + size
        r["layers_by_bits"][b] = r["layers_by_bits"].get(b, 0) + 1
        r["size"] += size
    for r in rows.values():
        q = {b: s for b, s in r["by_bits"].items() if b < FULL_PRECISION_BITS}
        tot = sum(q.values())
        r["mean_bits"] = sum(b * s for b, s in q.items()) / tot if tot else None
    return list(rows.values())


def measured_latency(rows: Sequence[Mapping[str, Any]], root: Path, benchmark: Mapping[str, Any] | None,
                     shape: str | None) -> list[dict[str, Any]]:
    """``rows`` of ``pareto_latency.csv`` with what ``benchmark.json`` measured for the same plan files
    (``stage=benchmark stage.plans=[<latency plan path>]``): ``measured_ms`` at ``shape`` (the latency
    table's ``RESxBATCH``; else the first timed shape), ``error_pct`` against the prediction,
    ``within_budget``, and ``pareto_measured``: the front of score vs measured latency."""
    plans = (benchmark or {}).get("plans") or {}
    by_file: dict[Path, Mapping[str, Any]] = {}
    for name, rec in plans.items():
        p = Path(name)
        for cand in (p, root / p):
            if cand.suffix in (".yaml", ".yml") and cand.exists():
                by_file[cand.resolve()] = rec
    out = []
    for r in rows:
        r = dict(r)
        rec = by_file.get((root / str(r.get("path", ""))).resolve()) if r.get("path") else None
        timing = (rec or {}).get("timing") or {}
        t = timing.get(shape) if shape in timing else next(iter(timing.values()), None)
        if t is not None:
            r["measured_ms"] = t["median_ms"]
            if r.get("predicted_ms"):
                r["error_pct"] = 100.0 * (t["median_ms"] - r["predicted_ms"]) / r["predicted_ms"]
            if r.get("budget_ms") is not None:
                r["within_budget"] = t["median_ms"] <= r["budget_ms"]
        out.append(r)
    marked = pareto_front(out, size_key="measured_ms", objective_key="score")
    for r, m in zip(out, marked):
        if "measured_ms" in r:
            r["pareto_measured"] = m["pareto"]
    return out


def benchmark_plan_rows(benchmark: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per plan of ``benchmark.json``: weights, SQNR, the denoiser's median (p10, p90) and
    speedup over 16 bit at each timed shape, and the end-to-end pipeline's median per component."""
    rows = []
    for name, rec in ((benchmark or {}).get("plans") or {}).items():
        if not isinstance(rec, Mapping):
            continue
        row: dict[str, Any] = {"plan": name, "weight_mib": rec.get("weight_mib"),
                               "quantized_layers": rec.get("quantized_layers"),
                               "sqnr_vs_16bit_db": rec.get("sqnr_vs_16bit_db")}
        speedup = rec.get("speedup") or {}
        for shape, t in (rec.get("timing") or {}).items():
            row.update({f"{shape}_ms": t.get("median_ms"), f"{shape}_p10_ms": t.get("p10_ms"),
                        f"{shape}_p90_ms": t.get("p90_ms"), f"{shape}_speedup": speedup.get(shape, 1.0)})
        for part, t in (((rec.get("end_to_end") or {}).get("breakdown_ms")) or {}).items():
            row[f"e2e_{part}_ms"] = t.get("median_ms")
        rows.append(row)
    return rows


def final_plan_latency(d: "WorkspaceData") -> dict[str, Any] | None:
    """The final plans' denoiser latency as the workspace's latency table predicts it, beside the
    table's 16-bit time: whether the plan the search picked would run slower than 16 bit. None
    without final plans or a table; ``error`` when the table cannot price the plan (a bit-width it
    did not measure, layers of another model)."""
    if not d.finals:
        return None
    from mixprec.kernels.latency_table import LatencyTable

    try:
        data = d.latency_table_json
        if data is None:
            return None
        table = LatencyTable.from_json(data, str(d.root / artifacts.LAYER_LATENCY))
        weight = d.finals["weight"].bits if "weight" in d.finals else {}
        act = d.finals["act"].bits if "act" in d.finals else {}
        missing = sorted(set(weight) - set(table.ms))
        if missing:
            raise KeyError(f"layer {missing[0]!r} is not in the latency table; rerun stage=latency_table")
        predicted = table.predict_ms(weight, act)
    except (KeyError, ValueError) as e:
        return {"error": str(e.args[0] if e.args else e)}
    return {"predicted_ms": predicted, "model_ms": table.model_ms, "speedup": table.model_ms / predicted,
            "slower_than_16bit": predicted > table.model_ms, "calibrated": table.calibrated,
            "shape": _table_shape(table.meta)}


def _table_shape(meta: Mapping[str, Any]) -> str | None:
    """``<resolution>x<batch>`` the latency table was measured at (None for a table without settings)."""
    settings = meta.get("settings") or {}
    return f"{settings['resolution']}x{settings['batch_size']}" if "resolution" in settings else None


def latency_rows(d: "WorkspaceData") -> list[dict[str, Any]]:
    """The workspace's latency-budget plans (``pareto_latency.csv``) with their measured latency where
    ``stage=benchmark`` timed them, at the latency table's resolution and batch."""
    rows = artifacts.read_pareto_latency_csv(d.root)
    if not rows:
        return []
    try:
        shape = _table_shape((d.latency_table_json or {}).get("meta") or {})
    except (OSError, ValueError):
        shape = None
    return measured_latency(rows, d.root, d.benchmark, shape)
