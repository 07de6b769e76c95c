"""Comparison images: full precision vs each final plan vs uniform precision at the same budget.

Uniform precision "at the same budget" means every layer the final plan quantizes gets the
largest whole bit-width not above the plan's mean-bit target (4 for a 4-bit plan; a byte-budget
plan uses its achieved mean bits), and layers the plan keeps in full precision (protected
activations) stay there too, so the only difference is how the bits are spread. Uniform widths
the calibration did not include are derived from the calibrated scales and ranges, as the
evaluate stage does, without running the calibration prompts again.

Images are cached under ``report/images/`` with a manifest; a rerun with the same plans, prompts
and fingerprints reuses them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixprec.artifacts import REPORT_IMAGES_DIR as IMAGES_DIR
from mixprec.artifacts import PlanHeader
from mixprec.artifacts import REPORT_MANIFEST as MANIFEST

from .data import FULL_PRECISION_BITS, Finals, Layer, mean_bits

log = logging.getLogger("mixprec")


@dataclass
class Variant:
    key: str
    label: str
    kind: str  # reference | mixed | uniform
    description: str
    weight_bits: dict[str, int] | None = None
    act_bits: dict[str, int] | None = None
    weight_groups: dict[str, int] | None = None  # the weight plan's per-group layers (Plan.group_size)


def uniform_width(header: Mapping[str, Any]) -> int:
    h = PlanHeader(header)
    target = h.budget_value if h.budget is not None and h.budget.unit == "mean_bits" else None
    if target is None:
        target = h.mean_bits
    if target is None:
        raise ValueError("plan header has neither a mean-bit target nor achieved mean bits")
    return int(min(8, max(2, math.floor(float(target) + 1e-9))))


def _uniform(plan: Mapping[str, int], bits: int) -> dict[str, int]:
    return {n: (FULL_PRECISION_BITS if b >= FULL_PRECISION_BITS else bits) for n, b in plan.items()}


def variants(finals: Mapping[str, Finals]) -> list[Variant]:
    """Full precision, then for each final plan: the mixed plan and its uniform counterpart."""
    out = [Variant("full_precision", "full precision", "reference", "no quantization")]
    w = finals.get("weight")
    if w is None:
        return out
    wb = uniform_width(w.header)
    mb = (w.header.get("achieved_mean_bits") or {}).get("overall")
    out.append(Variant("mixed_w", f"mixed W{mb:.2f}" if mb is not None else "mixed W", "mixed",
                       f"{w.path}; activations full precision", w.bits, None, w.group_size or None))
    out.append(Variant(f"uniform_w{wb}", f"uniform W{wb}", "uniform",
                       f"every layer at {wb} bits (the weight plan's budget); activations full precision",
                       _uniform(w.bits, wb), None))
    a = finals.get("act")
    if a is not None:
        ab = uniform_width(a.header)
        amb = (a.header.get("achieved_mean_bits") or {}).get("overall")
        out.append(Variant("mixed_wa", f"mixed W{mb:.2f}A{amb:.2f}" if mb is not None and amb is not None
                           else "mixed W+A", "mixed", f"{w.path} + {a.path}", w.bits, a.bits,
                           w.group_size or None))
        out.append(Variant(f"uniform_w{wb}a{ab}", f"uniform W{wb}A{ab}", "uniform",
                           f"weights at {wb} bits, activations at {ab} bits (protected layers stay full precision)",
                           _uniform(w.bits, wb), _uniform(a.bits, ab)))
    return out


def describe(v: Variant, layers: Sequence[Layer]) -> dict[str, Any]:
    """Mean bits and packed weight size of a variant, from the census."""
    from mixprec.search import MIB, weight_plan_bytes

    params = {l.name: l.params for l in layers}
    acts = {l.name: l.act_elems for l in layers}
    out_ch = {l.name: l.out_channels for l in layers}
    q = [l.name for l in layers if not l.excluded]
    wbits = {n: (v.weight_bits or {}).get(n, FULL_PRECISION_BITS) for n in q}
    abits = {n: (v.act_bits or {}).get(n, FULL_PRECISION_BITS) for n in q}
    have_sizes = all(n in out_ch for n in q) and bool(q)
    # over the quantized layers, as the plan headers count them; full-precision layers are counted apart
    return {
        "weight_mean_bits": mean_bits(wbits, params),
        "act_mean_bits": mean_bits(abits, acts) if sum(acts.values()) else None,
        "weight_fp_layers": sum(b >= FULL_PRECISION_BITS for b in wbits.values()),
        "act_fp_layers": sum(b >= FULL_PRECISION_BITS for b in abits.values()),
        "weight_mib": weight_plan_bytes(wbits, params, out_ch, v.weight_groups) / MIB if have_sizes else None,
    }


def _digest(v: Variant) -> str:
    from mixprec.selection import bits_digest

    parts = {"w": bits_digest(v.weight_bits or {}), "a": bits_digest(v.act_bits or {})}
    if v.weight_groups:  # per-channel variants keep their digest
        parts["g"] = bits_digest(v.weight_groups)
    return bits_digest(parts)


def cache_key(vs: Sequence[Variant], pairs: Sequence[tuple[str, int]], fingerprints: Mapping[str, str]) -> str:
    from mixprec.workspace import fingerprint

    return fingerprint({"variants": [(v.key, _digest(v)) for v in vs], "prompts": [list(p) for p in pairs],
                        "fingerprints": dict(fingerprints)})


def read_manifest(root: Path) -> dict[str, Any] | None:
    p = root / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def generate(bundle, ws, vs: Sequence[Variant], pairs: Sequence[tuple[str, int]], layers: Sequence[Layer],
             key: str) -> dict[str, Any]:
    """Generate every variant's images, score them against full precision, write them and the manifest."""
    from mixprec.calibration import extend_params
    from mixprec.quantizers import set_plan
    from mixprec.selection import generate_and_score, image_scores

    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    wb = sorted({b for v in vs for b in (v.weight_bits or {}).values() if b < FULL_PRECISION_BITS})
    ab = sorted({b for v in vs for b in (v.act_bits or {}).values() if b < FULL_PRECISION_BITS})
    extend_params(bundle.layers, wb, ab, weight_clip=bundle.quant.weight_clip)
    entries, reference = [], None
    try:
        for v in vs:
            generated = generate_and_score(bundle.sampler, bundle.layers, prompts, seeds, None, None,
                                           v.weight_bits, v.act_bits, weight_groups=v.weight_groups)
            if reference is None:  # the first variant, full precision (its own adherence is reported too)
                reference = generated.images
            scores = image_scores(reference, generated.images, prompts, bundle.spec.checker)
            files = generated.save(ws, f"{IMAGES_DIR}/{v.key}", pairs, slug_limit=40, metadata=False)
            entry = {"key": v.key, "label": v.label, "kind": v.kind, "description": v.description,
                     "digest": _digest(v), "files": files, **describe(v, layers)}
            if v.kind != "reference":
                entry["scores"] = {k: scores.get(k) for k in ("mse", "ssim", "psnr_db", "adherence")}
                entry["per_image"] = scores["per_image"]
            elif scores.get("adherence") is not None:
                entry["scores"] = {"adherence": scores["adherence"]}
                entry["per_image"] = {"adherence": scores["per_image"].get("adherence")}
            entries.append(entry)
            log.info("report: %s images (%s)", v.label, ", ".join(
                f"{k} {val:.4g}" for k, val in (entry.get("scores") or {}).items() if isinstance(val, float)))
    finally:
        set_plan(bundle.layers)
    manifest = {"key": key, "prompts": [list(p) for p in pairs], "variants": entries}
    ws.write_json(MANIFEST, manifest)
    return manifest
