"""Everything a report shows, read from one workspace folder into plain Python.

Each artifact is optional: a missing one leaves its field empty and its section out of the page.
Nothing here imports torch or loads a model, so reports of big workspaces (or of synthetic ones,
with no model at all) build quickly.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:  # the C loader is ~10x faster on 800-layer sensitivity tables and plans
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - libyaml missing
    from yaml import SafeLoader as _Loader

KINDS = {"w": "weight", "a": "act"}
GROUPS = ("content", "quality")
FULL_PRECISION_BITS = 16
# Stage records that describe the run (the report's own record is the report itself).
STAGE_ORDER = ("inspect", "calibrate", "sensitivity", "allocate", "allocate_weight", "allocate_act", "allocate_sweep",
               "select", "infer", "evaluate", "benchmark", "pipeline")


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


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
class Layer:
    name: str
    type: str
    group: str
    params: int
    act_elems: int
    out_channels: int
    block: str
    excluded: bool
    protected: bool
    depth: int = 0  # position in data-flow order among all census rows

    @property
    def role(self) -> str:
        """The layer's name inside its block with indices wildcarded: ``attentions.*.transformer_blocks.*.attn2.to_k``."""
        rest = self.name[len(self.block):].lstrip(".") if self.name.startswith(self.block) else self.name
        return ".".join("*" if p.isdigit() else p for p in rest.split(".")) or self.type


@dataclass
class Finals:
    path: str
    header: dict[str, Any]
    bits: dict[str, int]


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
        return f"source: {self.record}.json" + (f" ({'; '.join(parts)})" if parts else "")


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

def read_stage_records(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(root.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and "wall_time_s" in rec and rec.get("stage") != "report":
            out[p.stem] = rec
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def read_layers(path: Path, protected: Sequence[str] = ()) -> list[Layer]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    prot = set(protected)
    layers = []
    for r in rows:
        block = r.get("block") or r["name"].split(".")[0]
        layers.append(Layer(name=r["name"], type=r.get("type", ""), group=r.get("group", "quality"),
                            params=int(r.get("params") or 0), act_elems=int(r.get("act_elems") or 0),
                            out_channels=int(r.get("out_channels") or 0), block=block,
                            excluded=_truthy(r.get("excluded", False)),
                            protected=_truthy(r.get("protected", False)) or r["name"] in prot))
    # stable: module order within a phase
    order = sorted(range(len(layers)), key=lambda i: (flow_phase(layers[i].block), i))
    layers = [layers[i] for i in order]
    for d, l in enumerate(layers):
        l.depth = d
    return layers


def _clean_table(raw: Mapping[str, Mapping[Any, Any]] | None) -> dict[str, dict[int, float]]:
    out = {}
    for layer, per_bits in (raw or {}).items():
        out[str(layer)] = {int(b): float(v) for b, v in (per_bits or {}).items() if _num(v) is not None}
    return out


def read_sensitivity(root: Path) -> tuple[dict[tuple[str, str], dict[str, dict[int, float]]], str | None]:
    """Mean tables from ``sensitivity_{w,a}_{group}.yaml``; else means of ``sensitivity_per_prompt.csv``."""
    tables = {}
    for k in KINDS:
        for g in GROUPS:
            p = root / f"sensitivity_{k}_{g}.yaml"
            if p.exists():
                t = _clean_table(_yaml(p))
                if t:
                    tables[(k, g)] = t
    if tables:
        return tables, "sensitivity_{w,a}_{content,quality}.yaml"
    p = root / "sensitivity_per_prompt.csv"
    if not p.exists():
        return {}, None
    sums: dict[tuple[str, str, str, int], list[float]] = {}
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            sums.setdefault((r["kind"], r["group"], r["layer"], int(r["bits"])), []).append(float(r["value"]))
    for (k, g, layer, b), vals in sums.items():
        k = {"weight": "w", "act": "a"}.get(k, k)
        tables.setdefault((k, g), {}).setdefault(layer, {})[b] = sum(vals) / len(vals)
    return tables, "sensitivity_per_prompt.csv (means over prompts)"


def read_candidates(root: Path) -> list[dict[str, Any]]:
    """Candidate plans with their Pareto mark: ``pareto.csv`` when it lists every plan, else recomputed."""
    from mixprec.search import pareto_front
    from mixprec.stages.allocate import collect_candidates

    n_plans = sum(1 for _ in (root / "plans").glob("*/seed*.yaml")) if (root / "plans").is_dir() else 0
    rows: list[dict[str, Any]] = []
    p = root / "pareto.csv"
    if p.exists():
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
    if n_plans and len(rows) != n_plans:
        # a single-candidate allocate job adds plans without refreshing pareto.csv
        fresh = collect_candidates(root)
        rows = []
        for kind in sorted({r["kind"] for r in fresh}):
            rows += pareto_front([r for r in fresh if r["kind"] == kind], size_key="mib", objective_key="score",
                                 size_rtol=1e-3)
    out = []
    for r in rows:
        d = dict(r)
        for key in ("target", "K", "mean_bits_content", "mean_bits_quality", "mean_bits_overall", "mib", "score",
                    "objective"):
            d[key] = _num(r.get(key))
        d["seed"] = int(float(r["seed"])) if r.get("seed") not in (None, "") else 0
        d["pareto"] = _truthy(r.get("pareto"))
        out.append(d)
    return out


def read_selection(root: Path) -> list[dict[str, Any]]:
    p = root / "select_candidates.csv"
    if not p.exists():
        return []
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("rank", "target", "K", "seed", "mean_bits", "mib", "mse", "ssim", "psnr_db", "adherence"):
            r[key] = _num(r.get(key))
    return rows


def read_final(path: Path) -> Finals:
    data = _yaml(path) or {}
    bits = {str(k): int(v) if v is not None else FULL_PRECISION_BITS for k, v in (data.get("bits") or {}).items()}
    return Finals(path=path.name, header=dict(data.get("header") or {}), bits=bits)


def _headline(root: Path, name: str) -> dict[str, Any] | None:
    p = root / name
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    return rec.get("headline", rec) if isinstance(rec, dict) else {"value": rec}


def load_workspace(root: str | Path) -> WorkspaceData:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"workspace {root} does not exist; pass paths.workspace (or stage.compare) "
                                f"pointing at a folder that a mixprec stage wrote")
    d = WorkspaceData(root=root)
    d.stages = read_stage_records(root)
    if (root / "protected_layers.yaml").exists():
        d.protected = [str(n) for n in (_yaml(root / "protected_layers.yaml") or [])]
    if (root / "layers.csv").exists():
        d.layers = read_layers(root / "layers.csv", d.protected)
    d.sensitivity, d.sensitivity_source = read_sensitivity(root)
    from mixprec.search import natural_key, plans_digest, read_plan

    d.candidates = sorted(read_candidates(root), key=lambda r: (r["kind"] != "weight", natural_key(str(r["path"]))))
    d.selection = read_selection(root)
    raw_finals = {}
    for kind, name in (("weight", "final_weight_mp.yaml"), ("act", "final_act_mp.yaml")):
        if (root / name).exists():
            d.finals[kind] = read_final(root / name)
            raw_finals[kind] = read_plan(root / name)
    d.plans_digest = plans_digest(raw_finals) if raw_finals else None
    d.infer = _headline(root, "infer.json")
    d.evaluate = _headline(root, "evaluate.json")
    if (root / "evaluate.md").exists():
        d.evaluate_md = (root / "evaluate.md").read_text()
    d.benchmark = _headline(root, "benchmark.json")
    gen = root / "generated_images"
    if gen.is_dir():
        for p in sorted(gen.glob("*.png")):
            fp = gen / "full_precision" / p.name
            d.generated.append((str(p.relative_to(root)), str(fp.relative_to(root)) if fp.exists() else None))
    if (root / "select" / "full_precision.png").exists():
        d.select_reference = "select/full_precision.png"
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


def mean_bits(bits: Mapping[str, int], sizes: Mapping[str, int], include_fp: bool = False) -> float | None:
    items = [(sizes.get(n, 0), b) for n, b in bits.items() if include_fp or b < FULL_PRECISION_BITS]
    total = sum(s for s, _ in items)
    return sum(s * b for s, b in items) / total if total else None


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
