"""stage=latency_table: per-layer latency of every (weight bits, activation bits) choice -> layer_latency.json.

At ``stage.resolution`` and ``stage.batch_size`` (see :mod:`mixprec.kernels.latency_table` for how
each row is measured and how a plan's latency is predicted from the table). ``stage=allocate
stage.budget=latency`` reads the file. A rerun with the same settings on the same device finds the
table and keeps it (``stage.force=true`` measures again).
"""

from __future__ import annotations

import logging

import torch

from mixprec import artifacts
from mixprec.context import StageContext, load_for_kernels
from mixprec.kernels import BackendConfig
from mixprec.kernels.latency_table import LatencyTable, measure_latency_table
from mixprec.kernels.probing import denoiser_inputs
from mixprec.models import latent_input_name, text_length
from mixprec.quantizers import set_plan
from mixprec.settings import is_forced

log = logging.getLogger("mixprec")


def run(ctx: StageContext) -> dict:
    s, ws = ctx.settings, ctx.workspace
    backend = BackendConfig.merged(ctx.run.quant.kernels, s.kernels)
    settings = {"resolution": int(s.resolution or ctx.run.model.resolution), "batch_size": int(s.batch_size),
                "choices": [str(c) for c in s.choices], "dtype": str(s.dtype), "memory_format": str(s.memory_format),
                "calibration": str(s.calibration), "compile": str(s.compile), "backend_options": backend.to_dict(),
                "calibrate_overhead": bool(s.calibrate)}
    if ws.exists(artifacts.LAYER_LATENCY) and not is_forced(s.force, "latency_table"):
        old = LatencyTable.from_json(artifacts.read_latency_table(ws), str(ws.path(artifacts.LAYER_LATENCY)))
        if old.meta.get("settings") == settings and old.meta.get("fingerprints") == ws.fingerprints:
            log.info("latency_table: %s already holds this table (stage.force=true measures again)",
                     artifacts.LAYER_LATENCY)
            return _headline(old, reused=True)
    latent = settings["resolution"] // 8
    bundle, dtype = load_for_kernels(ctx.run, ws, latent, str(s.calibration), s.dtype)
    denoiser = bundle.denoiser
    if s.memory_format == "channels_last":
        denoiser = denoiser.to(memory_format=torch.channels_last)
    x = denoiser_inputs(denoiser, settings["batch_size"], latent, text_length(bundle.pipe), seed=11,
                        device=bundle.device, dtype=dtype)
    if s.memory_format == "channels_last":
        key = latent_input_name(denoiser)
        x[key] = x[key].contiguous(memory_format=torch.channels_last)
    set_plan(bundle.layers)
    compile_backend, regions = compile_choice(str(s.compile))
    # an interrupted run left its per-geometry measurements: reuse them when they were taken the same way
    # (and on the same kind of device: times from another GPU must not mix in)
    where = torch.cuda.get_device_name(bundle.device) if bundle.device.type == "cuda" else str(bundle.device)
    partial = {"settings": settings, "fingerprints": ws.fingerprints, "device": where, "done": {}}
    if ws.exists(artifacts.LAYER_LATENCY_PARTIAL) and not is_forced(s.force, "latency_table"):
        old_partial = ws.read_json(artifacts.LAYER_LATENCY_PARTIAL, "latency_table")
        same = ("settings", "fingerprints", "device")
        if {k: old_partial.get(k) for k in same} == {k: partial[k] for k in same}:
            partial["done"] = dict(old_partial.get("done") or {})
            log.info("latency_table: resuming, %d measurements from %s", len(partial["done"]),
                     artifacts.LAYER_LATENCY_PARTIAL)
        else:
            log.info("latency_table: %s was measured with other settings: measuring anew",
                     artifacts.LAYER_LATENCY_PARTIAL)
    table = measure_latency_table(denoiser, bundle.layers, x, settings["choices"], backend, int(s.iters),
                                  int(s.warmup), meta={"settings": settings, "fingerprints": ws.fingerprints},
                                  compile_backend=compile_backend, regions=regions, done=partial["done"],
                                  on_measured=lambda _done: ws.write_json(artifacts.LAYER_LATENCY_PARTIAL, partial),
                                  progress=True, calibrate=bool(s.calibrate))
    ws.write_json(artifacts.LAYER_LATENCY, table.to_json())
    ws.path(artifacts.LAYER_LATENCY_PARTIAL).unlink(missing_ok=True)
    log.info("latency_table: %d layers x %d choices, 16-bit denoiser %.3f ms (%.3f ms outside the layers)",
             len(table.ms), len(table.choices), table.model_ms, table.rest_ms)
    cal = table.meta.get("calibration") or {}
    if table.calibrated:
        log.info("latency_table: the fastest plan (%d quantized layers) measured %.3f ms, predicted %.3f ms alone: "
                 "%+.2f us per quantized layer added to predictions", cal["quantized_layers"], cal["measured_ms"],
                 cal["predicted_ms"], 1000 * table.quantized_layer_ms)
    elif cal:
        log.info("latency_table: overhead not calibrated: %s", cal.get("skipped"))
    return _headline(table, reused=False)


def compile_choice(mode: str) -> tuple[str | None, tuple[str, ...] | None]:
    """``stage.compile`` -> (torch.compile backend, regions): ``none`` eager kernels; ``regional``
    every layer compiled by inductor and the whole denoiser compiled per repeated block (as
    ``stage=benchmark stage.compile=regional`` times plans); any other value is a torch.compile
    backend for the layers and the whole denoiser (``inductor``)."""
    if mode in ("none", "None", ""):
        return None, None
    if mode == "regional":
        from mixprec.kernels.regional import DEFAULT_REGIONS
        return "inductor", DEFAULT_REGIONS
    return mode, None


def _headline(table: LatencyTable, reused: bool) -> dict:
    return {"file": artifacts.LAYER_LATENCY, "layers": len(table.ms), "choices": table.choices,
            "model_ms": table.model_ms, "rest_ms": table.rest_ms, "quantized_layer_ms": table.quantized_layer_ms,
            "uniform_predicted_ms": table.uniform_ms(), "reused": reused}
