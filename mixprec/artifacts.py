"""The workspace's file contract: every artifact's name, its columns, and typed readers and writers.

Stages, the report, the sweep callbacks and the evaluation read and write workspace files only
through this module, so a file's layout is spelled in one place. Nothing here loads a model or
imports torch.

========================================  ===========  =====================================================
file                                      written by   read by
========================================  ===========  =====================================================
``layers.csv`` (:data:`CENSUS_COLUMNS`)    calibrate    allocate, evaluate, report (:func:`read_layers`)
``quant_params.safetensors``              calibrate    every stage that quantizes (mixprec.calibration)
``sensitivity/shard<i>of<n>.json[l]``     sensitivity  its merge, the sweep callbacks (mixprec.shards)
``sensitivity_{w,a}_{group}.yaml``        sensitivity  report (:func:`read_sensitivity_tables`)
``sensitivity_per_prompt.csv``            sensitivity  allocate, evaluate, report (:func:`read_per_prompt`)
``protected_layers.yaml``                 sensitivity  allocate, evaluate, report (:func:`read_protected`)
``plans/<kind>_<budget>_<K>/seed<s>.yaml``  allocate   select, report, pareto (:func:`read_plan_file`)
``pareto.csv`` / ``pareto.png``           allocate     report
``final_{weight,act}_mp.yaml``            select       infer, benchmark, report (:func:`final_plan_paths`)
``select_candidates.csv``                 select       report (:func:`read_selection`)
``layer_latency.json``                    latency_table  allocate budget=latency (:func:`read_latency_table`)
``plans/latency_<ms>ms_<K>/[act_]seed<s>.yaml``  allocate  benchmark (:func:`latency_plan_paths`)
``pareto_latency.csv`` / ``.png``          allocate     report (:func:`read_pareto_latency_csv`)
``generated_images/``                     infer        report
``benchmark_traces/<plan>.json``          benchmark    a person, in Perfetto / chrome://tracing
``<stage>.json``                          the runner   pipeline, report (:func:`read_stage_records`)
========================================  ===========  =====================================================

A plan's header is read through :class:`PlanHeader`: one :class:`Budget` (value and unit) whatever
the plan's budget type, and one kind name (``weight`` / ``act``; :func:`kind_code` gives the
``w`` / ``a`` code the sensitivity files use).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixprec.search.plan import Plan, natural_key, plan_dirname, read_plan, write_plan
from mixprec.quant.options import table_key
from mixprec.workspace import FingerprintMismatchError, Workspace

try:  # the C loader is ~10x faster on 800-layer sensitivity tables and plans
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - libyaml missing
    from yaml import SafeLoader as _Loader

# ---------------------------------------------------------------------------- names

LAYERS_CSV = "layers.csv"
CENSUS_COLUMNS = ["name", "type", "group", "params", "out_channels", "in_features", "kernel", "act_elems", "block",
                  "excluded", "protected"]  # the fields of mixprec.models.LayerInfo, in order
QUANT_PARAMS = "quant_params.safetensors"
SENSITIVITY_RECORDS_DIR = "sensitivity"
PER_PROMPT_CSV = "sensitivity_per_prompt.csv"
PER_PROMPT_COLUMNS = ["kind", "group", "layer", "bits", "prompt", "value"]
PROTECTED_YAML = "protected_layers.yaml"
SENSITIVITY_PLOTS_DIR = "sensitivity_plots"
PLANS_DIR = "plans"
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
PARETO_COLUMNS = ["kind", "budget", "target", "K", "seed", "mean_bits_content", "mean_bits_quality",
                  "mean_bits_overall", "mib", "score", "objective", "objective_content", "objective_quality",
                  "status", "solver", "pareto", "path"]
FINAL_PLANS = {"weight": "final_weight_mp.yaml", "act": "final_act_mp.yaml"}
SELECT_CANDIDATES_CSV = "select_candidates.csv"
SELECT_COLUMNS = ["kind", "rank", "path", "target", "K", "seed", "mean_bits", "mib", "mse", "ssim", "psnr_db",
                  "adherence", "duplicate_of", "grid"]
SELECT_GRIDS_DIR = "select"
IMAGES_DIR = "generated_images"
INFER_DISPATCH = "infer_dispatch.json"
BENCHMARK_DISPATCH = "benchmark_dispatch.json"
BENCHMARK_TRACES_DIR = "benchmark_traces"  # <plan>.json: one end-to-end run's timeline (stage.end_to_end_trace)
CHECKPOINT_FILE = "quantized_denoiser.safetensors"
LAYER_LATENCY = "layer_latency.json"
# the per-geometry measurements of an unfinished latency_table run (removed when the table is written)
LAYER_LATENCY_PARTIAL = "layer_latency.partial.json"
LATENCY_PLANS_PREFIX = "latency_"
PARETO_LATENCY_CSV = "pareto_latency.csv"
PARETO_LATENCY_PNG = "pareto_latency.png"
PARETO_LATENCY_COLUMNS = ["budget_ms", "budget_mib", "K", "seed", "predicted_ms", "mib", "score", "objective", "status",
                          "pareto", "path"]
EVALUATE_MD = "evaluate.md"
EVALUATE_SQNR_RECORDS = "evaluate/sqnr_content.jsonl"
TRAIN_TINY_METRICS = "train_tiny_metrics.json"
TRAIN_COMPOSE_METRICS = "train_compose_metrics.json"
REPORT_IMAGES_DIR = "report/images"
REPORT_MANIFEST = "report/images.json"

KIND_CODES = {"weight": "w", "act": "a"}
GROUPS = ("content", "quality")
FULL_PRECISION_BITS = 16


def stage_record(stage: str) -> str:
    """``<stage>.json``: what the runner writes after a stage (config, fingerprints, headline)."""
    return f"{stage}.json"


def sensitivity_table(code: str, group: str) -> str:
    """``sensitivity_w_content.yaml``: layer -> bits -> mean metric, for one kind code and group."""
    return f"sensitivity_{code}_{group}.yaml"


def kind_code(kind: str) -> str:
    """``weight`` -> ``w``, ``act`` -> ``a`` (a code passes through)."""
    return KIND_CODES.get(kind, kind)


def kind_name(code: str) -> str:
    """``w`` -> ``weight``, ``a`` -> ``act`` (a name passes through)."""
    return {v: k for k, v in KIND_CODES.items()}.get(code, code)


def _yaml(path: Path) -> Any:
    return yaml.load(Path(path).read_text(), Loader=_Loader)


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def number(v: Any) -> float | None:
    """A CSV cell as a float; empty, ``None`` or unparsable cells are None."""
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Budget:
    """What a plan was allocated for: ``value`` mean bits, or ``value`` MiB of packed weights."""

    value: float
    unit: str = "mean_bits"  # "mean_bits" | "MiB"

    UNITS = ("mean_bits", "MiB")

    def __post_init__(self) -> None:
        if self.unit not in self.UNITS:
            raise ValueError(f"a budget's unit is one of {self.UNITS}, got {self.unit!r}")

    @property
    def mode(self) -> str:
        """The allocate stage's ``stage.budget`` name: ``mean_bits`` or ``bytes``."""
        return "bytes" if self.unit == "MiB" else "mean_bits"

    @classmethod
    def of(cls, mode: str, value: float) -> "Budget":
        """From ``stage.budget`` (``mean_bits`` | ``bytes``) and its value."""
        if mode not in ("mean_bits", "bytes"):
            raise ValueError(f"stage.budget must be mean_bits or bytes, got {mode!r}")
        return cls(float(value), "MiB" if mode == "bytes" else "mean_bits")

    def matches(self, value: float | None) -> bool:
        return value is not None and float(value) == self.value


@dataclass(frozen=True)
class PlanHeader:
    """A plan file's header, read with types; ``fields`` is the header exactly as stored."""

    fields: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.fields.get("kind", "weight"))

    @property
    def code(self) -> str:
        return kind_code(self.kind)

    @property
    def budget(self) -> Budget | None:
        """The plan's one budget; None for a header without one (a hand-written plan)."""
        if self.fields.get("budget") == "bytes":
            value = self.fields.get("budget_mib")
            return None if value is None else Budget(float(value), "MiB")
        value = self.fields.get("target")
        return None if value is None else Budget(float(value), "mean_bits")

    @property
    def budget_value(self) -> float | None:
        b = self.budget
        return None if b is None else b.value

    @property
    def mean_bits(self) -> float | None:
        """Achieved size-weighted mean bits over all quantized layers."""
        return (self.fields.get("achieved_mean_bits") or {}).get("overall")

    @property
    def fingerprints(self) -> dict[str, Any]:
        return {"model": self.fields.get("model_fingerprint"), "quant": self.fields.get("quant_fingerprint")}

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def plan_header_fields(kind: str, budget: Budget, K: float, seed: int) -> dict[str, Any]:
    """The first keys of a plan header, in the stored layout (``target`` for mean bits, ``budget_mib``)."""
    return {"kind": kind, "budget": budget.mode,
            "target": budget.value if budget.unit == "mean_bits" else None,
            "budget_mib": budget.value if budget.unit == "MiB" else None,
            "K": float(K), "seed": int(seed)}


@dataclass
class PlanFile:
    """A plan read from the workspace: its path (relative to the workspace), header and bits."""

    path: str
    header: dict[str, Any]
    bits: dict[str, Any]
    # layer -> 64 / 128: weight layers with per-group scales (the plan file's optional group_size mapping)
    group_size: dict[str, int] = field(default_factory=dict)

    def bits_or_full(self) -> dict[str, int]:
        """Bits with full-precision layers (``null`` in the file) as 16."""
        return {str(k): FULL_PRECISION_BITS if v is None else int(v) for k, v in self.bits.items()}

    @property
    def typed(self) -> PlanHeader:
        return PlanHeader(self.header)


def plan_path(kind: str, budget: Budget, K: float, seed: int, tag: str = "") -> str:
    """``plans/weight_4_2/seed0.yaml``; MiB budgets: ``plans/weight_1400MiB_1.5/seed0.yaml``; ``tag``
    (the program of stage.program=both's split plans): ``plans/weight_4_2_split/seed0.yaml``."""
    folder = plan_dirname(kind, budget.value, float(K), budget.mode) + (f"_{tag}" if tag else "")
    return f"{PLANS_DIR}/{folder}/seed{int(seed)}.yaml"


def plan_paths(root: str | os.PathLike, kind: str | None = None) -> list[Path]:
    """Every candidate plan file (of one kind), in natural order. Plans under a latency budget form
    their own family (:func:`latency_plan_paths`, ``kind="latency"``), not the mean-bit/bytes one."""
    pattern = f"{PLANS_DIR}/{kind}_*/seed*.yaml" if kind else f"{PLANS_DIR}/*/seed*.yaml"
    found = [p for p in Path(root).glob(pattern) if kind or not p.parent.name.startswith(LATENCY_PLANS_PREFIX)]
    return sorted(found, key=lambda p: natural_key(str(p)))


def latency_plan_paths(budget_ms: float, K: float, seed: int, budget_mib: float | None = None) -> tuple[str, str]:
    """(weight plan, activation plan) of one latency-budget candidate, relative to the workspace
    (``budget_mib``: the weight-byte cap beside the latency budget, named in the folder)."""
    cap = f"{float(budget_mib):g}mib_" if budget_mib is not None else ""
    folder = f"{PLANS_DIR}/{LATENCY_PLANS_PREFIX}{float(budget_ms):g}ms_{cap}{float(K):g}"
    return f"{folder}/seed{int(seed)}.yaml", f"{folder}/act_seed{int(seed)}.yaml"


def read_latency_table(ws: Workspace, rel: str = LAYER_LATENCY) -> dict[str, Any]:
    """The raw ``layer_latency.json`` (parse it with mixprec.kernels.latency_table.LatencyTable)."""
    return ws.read_json(rel, "latency_table")


def latency_candidate_rows(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every latency-budget candidate's header as a row of :data:`PARETO_LATENCY_COLUMNS` (no mark)."""
    root = Path(root)
    rows = []
    for p in plan_paths(root, "latency"):
        h = read_plan_header(p)
        rows.append({"budget_ms": h.get("budget_ms"), "budget_mib": h.get("budget_mib"), "K": h.get("K"),
                     "seed": h.get("seed"), "predicted_ms": h.get("predicted_ms"), "mib": h.get("mib"),
                     "score": h.get("score"), "objective": h.get("objective"),
                     "status": h.get("status"), "path": str(p.relative_to(root))})
    return rows


def _read_csv_numbers(path: Path, numeric: Sequence[str]) -> list[dict[str, Any]]:
    """A CSV's rows with the ``numeric`` columns parsed (empty when the file is missing)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in numeric:
            r[key] = number(r.get(key))
    return rows


def read_pareto_latency_csv(root: str | os.PathLike) -> list[dict[str, Any]]:
    """``pareto_latency.csv`` with numbers parsed (empty when the file is missing)."""
    rows = _read_csv_numbers(Path(root) / PARETO_LATENCY_CSV, ("budget_ms", "budget_mib", "K", "predicted_ms", "mib",
                                                               "score", "objective"))
    for r in rows:
        r["pareto"] = _truthy(r.get("pareto"))
    return rows


def write_plan_file(ws: Workspace, rel: str, plan: Plan) -> Path:
    return write_plan(ws.path(rel), plan)


def read_plan_file(ws: Workspace, rel: str, producer: str | None = None) -> PlanFile:
    """A plan of the workspace; with ``producer``, a missing file names the stage that writes it."""
    path = ws.require(rel, producer) if producer else ws.path(rel)
    plan = read_plan(path)
    return PlanFile(rel, plan.header, plan.bits, plan.group_size)


def read_plan_header(path: str | os.PathLike) -> dict[str, Any]:
    """Only the header of a plan file: parsing 800 ``bits`` lines per candidate adds up in a sweep."""
    text = Path(path).read_text()
    cut = text.find("\nbits:")
    data = yaml.load(text[:cut] if cut >= 0 else text, Loader=_Loader) or {}
    return dict(data.get("header") or {})


def check_plan_fingerprints(ws: Workspace, header: Mapping[str, Any], path: str) -> None:
    """Refuse a plan allocated for another model or recipe (plans without fingerprints pass)."""
    found = PlanHeader(header).fingerprints
    if found["model"] is None:
        return
    try:
        ws.check_fingerprints(found, path, "allocate")
    except FingerprintMismatchError as exc:
        raise FingerprintMismatchError(f"plan {exc}") from None


def final_plan_paths(output_dir: str | None = None) -> dict[str, str]:
    """Where one selection writes: the workspace root (what infer and report read), or its own folder,
    so that selections for several budgets can run side by side in one workspace."""
    folder = str(output_dir or "").strip("/")
    at = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)
    return {"weight": at(FINAL_PLANS["weight"]), "act": at(FINAL_PLANS["act"]), "csv": at(SELECT_CANDIDATES_CSV),
            "grids": folder or SELECT_GRIDS_DIR}


def read_checked_final_plans(ws: Workspace, plan_dir: str | None, use_act_plan: bool):
    """(paths, weight plan, act plan or None) of a selection's final plans, checked against this run."""
    final = final_plan_paths(plan_dir)
    producer = f"select stage.output_dir={plan_dir}" if plan_dir else "select"
    weight_plan = read_plan_file(ws, final["weight"], producer)
    check_plan_fingerprints(ws, weight_plan.header, final["weight"])
    act_plan = None
    if use_act_plan:
        act_plan = read_plan_file(ws, final["act"], producer)
        check_plan_fingerprints(ws, act_plan.header, final["act"])
    return final, weight_plan, act_plan


def read_final_plans(root: str | os.PathLike) -> dict[str, PlanFile]:
    """kind -> the final plan the select stage wrote at the workspace root (those present)."""
    out = {}
    for kind, name in FINAL_PLANS.items():
        p = Path(root) / name
        if p.exists():
            data = _yaml(p) or {}
            out[kind] = PlanFile(name, dict(data.get("header") or {}), dict(data.get("bits") or {}),
                                 {str(l): int(g) for l, g in (data.get("group_size") or {}).items()})
    return out


def candidate_row(path: str, header: Mapping[str, Any]) -> dict[str, Any]:
    """One plan as a row of the Pareto family (:data:`PARETO_COLUMNS` plus its model fingerprint)."""
    h = PlanHeader(header)
    mb = header.get("achieved_mean_bits") or {}
    ob = header.get("objective_by_group") or {}
    return {"kind": header.get("kind"), "budget": header.get("budget"), "target": h.budget_value,
            "K": header.get("K"), "seed": header.get("seed"), "mean_bits_content": mb.get("content"),
            "mean_bits_quality": mb.get("quality"), "mean_bits_overall": mb.get("overall"),
            "mib": header.get("mib"), "score": header.get("score"), "objective": header.get("objective"),
            "objective_content": ob.get("content"), "objective_quality": ob.get("quality"),
            "status": header.get("status"), "solver": header.get("solver"),
            "path": path, "model_fingerprint": header.get("model_fingerprint")}


def collect_candidates(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every candidate plan's header as a Pareto-family row, in natural path order."""
    root = Path(root)
    return [candidate_row(str(p.relative_to(root)), read_plan_header(p)) for p in plan_paths(root)]


def read_pareto_csv(root: str | os.PathLike) -> list[dict[str, Any]]:
    """``pareto.csv`` with numbers parsed (empty when the file is missing)."""
    p = Path(root) / PARETO_CSV
    if not p.exists():
        return []
    with open(p, newline="") as f:
        return [typed_candidate_row(r) for r in csv.DictReader(f)]


def typed_candidate_row(r: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(r)
    for key in ("target", "K", "mean_bits_content", "mean_bits_quality", "mean_bits_overall", "mib", "score",
                "objective"):
        d[key] = number(r.get(key))
    d["seed"] = int(float(r["seed"])) if r.get("seed") not in (None, "") else 0
    d["pareto"] = _truthy(r.get("pareto"))
    return d


# ---------------------------------------------------------------------------- census

@dataclass
class CensusLayer:
    """One row of ``layers.csv``."""

    name: str
    type: str
    group: str
    params: int
    act_elems: int
    out_channels: int
    block: str
    excluded: bool
    protected: bool
    depth: int = 0  # position in data-flow order among all census rows (set by the report)

    @property
    def role(self) -> str:
        """The layer's name inside its block with indices wildcarded: ``attentions.*.transformer_blocks.*.attn2.to_k``."""
        rest = self.name[len(self.block):].lstrip(".") if self.name.startswith(self.block) else self.name
        return ".".join("*" if p.isdigit() else p for p in rest.split(".")) or self.type


def write_census(ws: Workspace, rows: Sequence[Mapping[str, Any]]) -> Path:
    return ws.write_csv(LAYERS_CSV, rows, CENSUS_COLUMNS)


def read_layers(path: str | os.PathLike, protected: Sequence[str] = ()) -> list[CensusLayer]:
    """Every census row, in module order, typed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    prot = set(protected)
    return [CensusLayer(name=r["name"], type=r.get("type", ""), group=r.get("group", "quality"),
                        params=int(r.get("params") or 0), act_elems=int(r.get("act_elems") or 0),
                        out_channels=int(r.get("out_channels") or 0), block=r.get("block") or r["name"].split(".")[0],
                        excluded=_truthy(r.get("excluded", False)),
                        protected=_truthy(r.get("protected", False)) or r["name"] in prot)
            for r in rows]


def read_census(ws: Workspace) -> list[CensusLayer]:
    """The quantizable (non-excluded) census layers of the workspace, in module order."""
    path = ws.require(LAYERS_CSV, "calibrate")
    with open(path, newline="") as f:
        columns = set(next(csv.reader(f), []))
    need = {"name", "group", "params", "act_elems", "out_channels"}
    if columns and not need <= columns:
        raise ValueError(f"{path} lacks census columns {sorted(need - columns)}; rerun the calibrate stage")
    return [layer for layer in read_layers(path) if not layer.excluded]


# ---------------------------------------------------------------------------- sensitivity

PerPrompt = dict[str, dict[str, dict[str, dict[int, list[float]]]]]


def write_per_prompt(ws: Workspace, rows: Sequence[Mapping[str, Any]]) -> Path:
    return ws.write_csv(PER_PROMPT_CSV, rows, PER_PROMPT_COLUMNS)


def parse_per_prompt(path: str | os.PathLike) -> PerPrompt:
    """``{kind: {group: {layer: {bits: [value per prompt]}}}}`` with kind "weight"/"act".

    Cached on (path, size, mtime): a basic-launcher sweep runs every job in one process and would
    otherwise parse the same table a hundred times.
    """
    st = os.stat(path)
    return _parse_per_prompt(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _parse_per_prompt(path: str, size: int, mtime_ns: int) -> PerPrompt:
    raw: dict[tuple, dict[int, float]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            raw.setdefault((r["kind"], r["group"], r["layer"], table_key(r["bits"])), {})[int(r["prompt"])] = \
                float(r["value"])
    out: PerPrompt = {k: {g: {} for g in GROUPS} for k in KIND_CODES}
    for (code, group, layer, b), by_prompt in raw.items():
        kind = kind_name(code)
        if kind not in out or group not in out[kind]:
            raise ValueError(f"{path}: unknown kind/group {code!r}/{group!r} (expected w|a and content|quality)")
        if sorted(by_prompt) != list(range(len(by_prompt))):
            raise ValueError(f"{path}: layer {layer} at {b} bits has prompts {sorted(by_prompt)}, not 0..n-1; "
                             "the sensitivity merge is incomplete — rerun `stage=sensitivity stage.merge_only=true`")
        out[kind][group].setdefault(layer, {})[b] = [by_prompt[i] for i in range(len(by_prompt))]
    return out


def read_per_prompt(ws: Workspace, grouped: bool = False) -> PerPrompt:
    """The workspace's per-prompt sensitivity table (see :func:`parse_per_prompt`). Per-group weight
    options (string keys ``"4g64"``, :mod:`mixprec.quant.options`) only with ``grouped=True``: readers
    that take integer widths see the per-channel options, as before the options existed."""
    table = parse_per_prompt(ws.require(PER_PROMPT_CSV, "sensitivity"))
    if grouped:
        return table
    return {kind: {g: {layer: {b: v for b, v in by_bits.items() if isinstance(b, int)}
                       for layer, by_bits in by_layer.items()} for g, by_layer in by_group.items()}
            for kind, by_group in table.items()}


def check_sensitivity_fingerprints(ws: Workspace) -> bool:
    """Refuse a per-prompt table made for another model or recipe; False when there is no record to check."""
    if not ws.exists(stage_record("sensitivity")):
        return False
    ws.check_fingerprints(ws.read_json(stage_record("sensitivity"), "sensitivity").get("fingerprints"),
                          PER_PROMPT_CSV, "sensitivity")
    return True


def write_protected(ws: Workspace, names: Sequence[str]) -> Path:
    return ws.write_yaml(PROTECTED_YAML, list(names))


def read_protected(ws: Workspace) -> list[str]:
    return [str(n) for n in (ws.read_yaml(PROTECTED_YAML, "sensitivity") or [])]


def write_sensitivity_table(ws: Workspace, code: str, group: str, table: Mapping[str, Any]) -> Path:
    return ws.write_yaml(sensitivity_table(code, group), table)


def _clean_table(raw: Mapping[str, Mapping[Any, Any]] | None) -> dict[str, dict[int, float]]:
    return {str(layer): {table_key(b): float(v) for b, v in (per_bits or {}).items() if number(v) is not None}
            for layer, per_bits in (raw or {}).items()}


def read_sensitivity_tables(root: str | os.PathLike, grouped: bool = False
                            ) -> tuple[dict[tuple[str, str], dict[str, dict[int, float]]], str | None]:
    """Mean tables ``{(code, group): {layer: {bits: metric}}}`` and where they came from: the
    ``sensitivity_{w,a}_{group}.yaml`` files, else means over prompts of ``sensitivity_per_prompt.csv``.
    Per-group weight options (``"4g64"`` keys) only with ``grouped=True``."""
    tables, source = _read_sensitivity_tables(root)
    if not grouped:
        tables = {k: {layer: {b: v for b, v in row.items() if isinstance(b, int)} for layer, row in t.items()}
                  for k, t in tables.items()}
    return tables, source


def _read_sensitivity_tables(root: str | os.PathLike) -> tuple[dict[tuple[str, str], dict[str, dict[int, float]]],
                                                               str | None]:
    root = Path(root)
    tables = {}
    for code in KIND_CODES.values():
        for g in GROUPS:
            p = root / sensitivity_table(code, g)
            if p.exists():
                t = _clean_table(_yaml(p))
                if t:
                    tables[(code, g)] = t
    if tables:
        return tables, "sensitivity_{w,a}_{content,quality}.yaml"
    p = root / PER_PROMPT_CSV
    if not p.exists():
        return {}, None
    for kind, by_group in parse_per_prompt(p).items():
        for g, by_layer in by_group.items():
            for layer, by_bits in by_layer.items():
                for b, vals in by_bits.items():
                    tables.setdefault((kind_code(kind), g), {}).setdefault(layer, {})[b] = sum(vals) / len(vals)
    return tables, "sensitivity_per_prompt.csv (means over prompts)"


# ---------------------------------------------------------------------------- selection

def selection_row(kind: str, rank: int, path: str, header: Mapping[str, Any], scores: Mapping[str, Any],
                  duplicate_of: str | None) -> dict[str, Any]:
    """One row of ``select_candidates.csv``; ``target`` is the plan's budget (mean bits or MiB)."""
    h = PlanHeader(header)
    return {"kind": kind, "rank": rank, "path": path, "target": h.budget_value, "K": h.get("K"),
            "seed": h.get("seed"), "mean_bits": h.mean_bits, "mib": h.get("mib"), "mse": scores.get("mse"),
            "ssim": scores.get("ssim"), "psnr_db": scores.get("psnr_db"), "adherence": scores.get("adherence"),
            "duplicate_of": duplicate_of, "grid": scores.get("grid")}


def write_selection(ws: Workspace, rel: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    return ws.write_csv(rel, rows, SELECT_COLUMNS)


def read_selection(root: str | os.PathLike) -> list[dict[str, Any]]:
    return _read_csv_numbers(Path(root) / SELECT_CANDIDATES_CSV,
                             ("rank", "target", "K", "seed", "mean_bits", "mib", "mse", "ssim", "psnr_db", "adherence"))


# ---------------------------------------------------------------------------- stage records and images

# Stage records that describe the run (the report's own record is the report itself).
STAGE_ORDER = ("inspect", "calibrate", "sensitivity", "allocate", "allocate_weight", "allocate_act", "allocate_sweep",
               "select", "infer", "evaluate", "benchmark", "pipeline")


def read_stage_records(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every ``<stage>.json`` the runner wrote (not the report's), in pipeline order."""
    out = {}
    for p in sorted(Path(root).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and "wall_time_s" in rec and rec.get("stage") != "report":
            out[p.stem] = rec
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def read_headline(root: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The headline of ``<stage>.json`` (None when the stage has not run)."""
    p = Path(root) / stage_record(stage)
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    return rec.get("headline", rec) if isinstance(rec, dict) else {"value": rec}


def generated_image_pairs(root: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(quantized, full-precision or None) paths of the infer stage's images, relative to the workspace."""
    root = Path(root)
    gen = root / IMAGES_DIR
    out = []
    if gen.is_dir():
        for p in sorted(gen.glob("*.png")):
            fp = gen / "full_precision" / p.name
            out.append((str(p.relative_to(root)), str(fp.relative_to(root)) if fp.exists() else None))
    return out
