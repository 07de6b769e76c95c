"""stage=calibrate: PTQ parameters for every candidate bit-width of every quantizable layer.

Runs the calibration prompts through the pipeline (the sampler's own timesteps) with observers on
every layer input, then writes quant_params.safetensors (weight scales per bit, activation range
and per-bit activation parameters, fingerprints in its metadata) and the census layers.csv.
"""

from __future__ import annotations

import logging


from mixprec.calibration import calibrate_layers, gptq_nearest_layers, save_params
from mixprec.metrics import sqnr_db
from mixprec.quantizers import fake_quant_weight
from mixprec import artifacts
from mixprec.artifacts import QUANT_PARAMS
from mixprec.context import StageContext, load_model
from mixprec.timestep_groups import StepGroups

log = logging.getLogger("mixprec")


def run(ctx: StageContext) -> dict:
    ws, track = ctx.workspace, ctx.tracker
    bundle = load_model(ctx.run, batch_size=int(ctx.settings.batch_size))
    q = bundle.quant
    pairs = ctx.run.prompt_set("calibration")
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    groups = q.act_timestep_groups
    step_groups = StepGroups(bundle.sampler.timesteps(), groups) if groups > 1 else None
    if step_groups is not None:
        step_groups.install(bundle.denoiser, bundle.layers.values())
    params = calibrate_layers(
        bundle.layers, lambda: bundle.sampler.generate(prompts, seeds, decode=False),
        q.weight_bits, q.act_bits, momentum=q.act_momentum, weight_clip=q.weight_clip,
        progress=True, step_groups=step_groups, group_sizes=q.weight_group_sizes, rounding=q.rounding,
        gptq_damp=q.gptq.damp, gptq_block=q.gptq.block_size, gptq_max_columns=q.gptq.max_columns,
    )
    rows = bundle.census()
    artifacts.write_census(ws, [r.as_row() for r in rows])
    meta = {"fingerprints": ws.fingerprints, "weight_bits": list(q.weight_bits), "act_bits": list(q.act_bits),
            "quant": q.to_dict(), "model": dict(ctx.run.model_config), "calibration_prompts": pairs,
            "act_timestep_groups": groups, "weight_group_sizes": list(q.weight_group_sizes),
            "rounding": q.rounding,
            "gptq_nearest_layers": gptq_nearest_layers(params) if q.rounding == "gptq" else []}
    if step_groups is not None:
        meta["step_groups"] = step_groups.to_json()
    with ws.atomic_path(QUANT_PARAMS) as tmp:
        save_params(tmp, params, meta)

    wsqnr = {b: [] for b in q.weight_bits}
    table = []
    for name, layer in bundle.layers.items():
        w = layer.inner.weight
        row = [name]
        for b in q.weight_bits:
            v = sqnr_db(w, fake_quant_weight(w, params[name].weight_scales[b].to(w.device), b))
            wsqnr[b].append(v)
            row.append(v)
        table.append(row + list(params[name].act_range))
    track.log_table("weight_sqnr_db", ["layer"] + [f"w{b}" for b in q.weight_bits] + ["act_min", "act_max"], table)
    headline = {
        "layers": len(params),
        "act_timestep_groups": groups,
        "calibration_images": len(pairs),
        "mean_weight_sqnr_db": {b: sum(v) / len(v) for b, v in wsqnr.items()},
        "weight_group_sizes": list(q.weight_group_sizes),
        "grouped_layers": {g: sum(1 for p in params.values() if (q.weight_bits[0], g) in p.group_scales)
                           for g in q.weight_group_sizes},
        "rounding": q.rounding,
        "gptq_layers": sum(1 for p in params.values() if p.uses_gptq),
        "hessian_mib": sum(p.hessian.numel() * 4 for p in params.values() if p.hessian is not None) / 2 ** 20,
    }
    log.info("calibrated %d layers on %d prompts; mean weight SQNR %s", len(params), len(pairs),
             {b: round(v, 1) for b, v in headline["mean_weight_sqnr_db"].items()})
    return headline
