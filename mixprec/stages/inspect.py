"""stage=inspect: the layer census of the denoiser, written as layers.csv.

Full-size architectures with random weights are built on the meta device: the census needs only
shapes, so it costs neither memory nor time.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict


from mixprec import artifacts
from mixprec.models import LayerInfo, build_random_denoiser, census, family_text_length, \
    measure_act_elems
from mixprec.context import StageContext, load_model

log = logging.getLogger("mixprec")


def summarize(rows: list[LayerInfo], total_params: int) -> dict:
    types = Counter(r.type for r in rows)
    groups = Counter(r.group for r in rows if not r.excluded)
    return {
        "layers": len(rows),
        "linear": types.get("Linear", 0),
        "conv2d": types.get("Conv2d", 0),
        "content": groups.get("content", 0),
        "quality": groups.get("quality", 0),
        "excluded": sum(r.excluded for r in rows),
        "layer_params": sum(r.params for r in rows),
        "denoiser_params": total_params,
    }


def format_table(rows: list[LayerInfo]) -> str:
    by_block: dict[str, dict] = defaultdict(lambda: Counter())
    for r in rows:
        c = by_block[r.block]
        c["layers"] += 1
        c[r.type] += 1
        c[r.group] += 1
        c["params"] += r.params
    lines = [f"{'block':<22}{'layers':>7}{'Linear':>8}{'Conv2d':>8}{'content':>9}{'quality':>9}{'params (M)':>12}"]
    for block, c in by_block.items():
        lines.append(f"{block:<22}{c['layers']:>7}{c['Linear']:>8}{c['Conv2d']:>8}{c['content']:>9}{c['quality']:>9}"
                     f"{c['params'] / 1e6:>12.2f}")
    return "\n".join(lines)


def run(ctx: StageContext) -> dict:
    ws, spec = ctx.workspace, ctx.run.model
    if spec.source == "diffusers" and spec.weights == "random":
        denoiser = build_random_denoiser(spec.family, device="meta")
        size = spec.resolution // 8
        acts = measure_act_elems(denoiser, size, family_text_length(spec.family))
        rows = census(denoiser, spec.content_patterns, spec.exclude_patterns, acts)
        total = sum(p.numel() for p in denoiser.parameters())
    else:
        bundle = load_model(ctx.run)
        rows = bundle.census()
        total = sum(p.numel() for p in bundle.denoiser.parameters())
    artifacts.write_census(ws, [r.as_row() for r in rows])
    summary = summarize(rows, total)
    print(format_table(rows))
    print(f"{spec.name}: {summary['layers']} layers ({summary['linear']} Linear, {summary['conv2d']} Conv2d), "
          f"{summary['content']} content / {summary['quality']} quality, {summary['excluded']} excluded; "
          f"{summary['layer_params']:,} parameters in these layers, {summary['denoiser_params']:,} in the denoiser")
    return summary
