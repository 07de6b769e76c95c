"""Plans on disk: a YAML file with a header and a ``bits`` mapping (layer -> bit-width).

::

    header:
      kind: weight            # weight | act
      budget: mean_bits       # mean_bits | bytes
      target: 4.0             # mean bits, or MiB for budget=bytes
      K: 2.0
      seed: 0
      ...                     # achieved_mean_bits, bytes, objective, solver, status, fingerprints
    bits:
      conv_in: 16             # protected: full precision
      down_blocks.0.resnets.0.conv1: 8
      ...
    group_size:               # optional: layers with per-group weight scales (64 / 128 input columns)
      down_blocks.1.attentions.0.proj_in: 128

Files are byte-identical for identical inputs: layers are in natural order (``blocks.2`` before
``blocks.10``) whatever order the caller used, the header's key order is the caller's (a fixed
literal in the stage), and nothing time-dependent is written — wall-clock solve time belongs in
the stage record, the header carries CP-SAT's reproducible deterministic time instead. Writes are
atomic (temporary file in the same folder, then ``os.replace``), so a crashed job never leaves a
half-written plan for the Pareto collection to pick up.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixprec.workspace import atomic_write_text


@dataclass
class Plan:
    header: dict[str, Any]
    bits: dict[str, int | None] = field(default_factory=dict)
    # layer -> 64 / 128 for layers with per-group weight scales (absent: one scale per output channel);
    # written only when not empty, so per-channel plans read and write as before
    group_size: dict[str, int] = field(default_factory=dict)


def natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _plain(v: Any) -> Any:
    """numpy scalars, tuples and non-string keys -> plain YAML-safe values."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and math.isfinite(v):
        # 12 significant digits: reproducible, and free of last-ulp noise from summation order
        return float(f"{v:.12g}")
    return v


def plan_to_yaml(plan: Plan) -> str:
    bits = {l: (None if b is None else int(b)) for l, b in sorted(plan.bits.items(), key=lambda kv: natural_key(kv[0]))}
    data: dict[str, Any] = {"header": _plain(plan.header), "bits": bits}
    if plan.group_size:
        data["group_size"] = {l: int(g) for l, g in sorted(plan.group_size.items(), key=lambda kv: natural_key(kv[0]))}
    return yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=False)


def write_plan(path: str | os.PathLike, plan: Plan) -> Path:
    return atomic_write_text(path, plan_to_yaml(plan))


def read_plan(path: str | os.PathLike) -> Plan:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "bits" not in data:
        raise ValueError(f"{path} is not a plan file (expected a mapping with 'header' and 'bits')")
    return Plan(header=dict(data.get("header") or {}), bits=dict(data["bits"] or {}),
                group_size={str(l): int(g) for l, g in (data.get("group_size") or {}).items()})


def plans_digest(plans: Mapping[str, Plan | None]) -> str:
    """Short hash of the bits of some plans (``{"weight": plan, "act": plan}``): what a result was
    computed from. The report compares it with the final plans of the day to mark stale numbers."""
    from mixprec.workspace import fingerprint

    digest = {kind: {str(k): v for k, v in plan.bits.items()} for kind, plan in plans.items() if plan}
    # per-group weight layers are part of what a result was computed from (absent: the digest as before)
    digest.update({f"{kind}_group_size": dict(plan.group_size) for kind, plan in plans.items()
                   if plan and getattr(plan, "group_size", None)})
    return fingerprint(digest)


def plan_dirname(kind: str, target: float, K: float, budget: str = "mean_bits") -> str:
    """``weight_4_2`` / ``act_8_1`` / ``weight_1400MiB_1.5``: one folder per (target, K), seeds inside."""
    def num(x: float) -> str:
        return f"{float(x):g}"
    unit = "MiB" if budget == "bytes" else ""
    return f"{kind}_{num(target)}{unit}_{num(K)}"
