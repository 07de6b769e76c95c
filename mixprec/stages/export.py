"""stage=export: the final plans as torchao per-layer configs (``torchao_plan.json``).

Reads ``final_weight_mp.yaml`` (and ``final_act_mp.yaml`` unless ``stage.use_act_plan=false``) and
the census ``layers.csv`` (each layer's kind); no model is loaded. The file holds torchao's own
serialization of one ``FqnToConfig`` (module names relative to the denoiser), the layers left in
full precision, and the layers torchao cannot quantize to the plan's bits with the reason.
"""

from __future__ import annotations

import logging
from collections import Counter

from mixprec import artifacts
from mixprec.context import StageContext
from mixprec.export import torchao_export, write_torchao_export

log = logging.getLogger("mixprec")


def run(ctx: StageContext) -> dict:
    ws, s = ctx.workspace, ctx.settings
    _, weight_plan, act_plan = artifacts.read_checked_final_plans(ws, s.plan_dir, bool(s.use_act_plan))
    act_bits = act_plan.bits if act_plan is not None else None
    kinds = {r.name: "conv" if r.type == "Conv2d" else "linear" for r in artifacts.read_census(ws)}
    export = torchao_export(weight_plan.bits, act_bits, kinds, activations=str(s.activations),
                            weight_groups=weight_plan.group_size)
    path = write_torchao_export(ws.path(str(s.output)), export)
    headline = {
        "path": str(path), "layers": len(kinds), "exported": len(export.configs),
        "full_precision": len(export.full_precision), "unsupported": len(export.unsupported),
        "configs": dict(Counter(type(c).__name__ for c in export.configs.values())),
        "unsupported_reasons": dict(Counter(export.unsupported.values())),
    }
    log.info("export: %d of %d layers as torchao configs, %d full precision, %d not exportable -> %s",
             headline["exported"], len(kinds), headline["full_precision"], headline["unsupported"], path)
    return headline
