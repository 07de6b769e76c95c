"""stage=benchmark: real-kernel latency, memory and accuracy of plans against 16-bit, in one process.

For the 16-bit denoiser and for every plan in ``stage.plans`` (built from the same calibrated
layers and run on real kernels through :func:`mixprec.kernels.convert_`, all compiled the same
way): denoiser latency at every resolution x batch size (CUDA-graph replays timed with CUDA
events after warm-up: median, p10/p90, std, back-to-back mean), peak inference memory, weight bytes,
SQNR of the denoiser output against 16-bit and against the plan's fake-quant reference, the
dispatch report (which backend each layer ran on), and the end-to-end pipeline time. The runner
writes the returned dict to ``benchmark.json``; per-layer dispatch goes to
``benchmark_dispatch.json``. Without CUDA the same code runs (reference/emulated kernels, wall-clock
timing) so the stage can be tested anywhere; its numbers then mean nothing for speed.

Plans: ``final`` (final_weight_mp.yaml and, when present, final_act_mp.yaml of the workspace),
a named family ``<scope>:wXaY[:fp8|int8]`` (:mod:`mixprec.kernels.named_plans`: ``uniform``,
``linear``, ``conv``, ``ff``, ``attn``, ``inner``, ``fused``; e.g. ``linear:w8a8:fp8``, ``uniform:w4a16``), or a
path to a plan YAML file (a latency-budget plan brings its activation plan along). The fake-quant
reference of a plan is its converted model run on the reference path
(:func:`mixprec.kernels.reference_path`): the exact function of the stored codes, fp8 rounding
included. The end-to-end pipeline runs the same compiled denoiser (and, with
``end_to_end_compile_vae``, a compiled VAE decoder), the components named in
``end_to_end_cuda_graphs`` replayed from CUDA graphs on a GPU, and reports its time split into text
encoders, denoiser and VAE decode.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from mixprec import artifacts, search
from mixprec.artifacts import BENCHMARK_TRACES_DIR, CHECKPOINT_FILE
from mixprec.kernels import BackendConfig, convert_, reference_path, weight_bytes
from mixprec.kernels.named_plans import parse_plan_name
from mixprec.kernels.pipeline_timing import pipeline_components, time_pipeline
from mixprec.kernels.probing import denoiser_inputs, sqnr_db
from mixprec.kernels.timing import capture, env_info, summarize, time_graph
from mixprec.models import latent_input_name, replace_denoiser, resolve_device, text_length
from mixprec.context import RunSettings, StageContext, load_for_kernels
from mixprec.quantizers import QuantLayer, quant_layers, set_plan
from mixprec.settings import BenchmarkSettings
from mixprec.workspace import Workspace

log = logging.getLogger("mixprec")

MIB = 2 ** 20
def resolve_plan(name: str, layers: dict[str, QuantLayer], ws: Workspace) -> tuple[dict, dict, dict]:
    """(weight bits, act bits, backend options over the stage's) by layer for a plan name (see the
    module doc)."""
    named = parse_plan_name(name)
    if named is not None:
        return (*named.bits(layers), named.kernel_overrides())
    if name == "final":
        wplan = artifacts.read_plan_file(ws, artifacts.FINAL_PLANS["weight"], "select")
        aplan = artifacts.read_plan_file(ws, artifacts.FINAL_PLANS["act"]) if ws.exists(artifacts.FINAL_PLANS["act"]) \
            else None
        return dict(wplan.bits), dict(aplan.bits) if aplan else {}, {}
    path = Path(name)
    if not path.exists():
        raise ValueError(f"benchmark plan {name!r}: use 'final', '<scope>:wXaY[:fp8|int8|fbgemm]' (scopes: uniform, "
                         f"linear, conv, ff, attn, inner, fused) or a plan file path")
    plan = search.read_plan(path)
    bits = dict(plan.bits)
    kind = plan.header.get("kind", "weight")
    if kind == "latency":  # weight bits here, activation bits in the file the header names
        return bits, dict(search.read_plan(path.parent / plan.header["act_plan"]).bits), {}
    return ((bits, {}) if kind == "weight" else ({}, bits)) + ({},)




def _time_cpu(fn, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return summarize(times)


@torch.no_grad()
def _peak(model, kwargs, cuda: bool) -> dict:
    wb = weight_bytes(model)
    out = {"weight_mib": wb / MIB}
    if not cuda:
        return out
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(**kwargs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out.update(activation_peak_mib=(peak - before) / MIB, peak_inference_mib=(wb + peak - before) / MIB)
    return out


def _compile(model, mode: str):
    if mode in (None, "none", ""):
        return model
    if mode == "regional":  # inductor (default mode) on each repeated block, in place; the glue stays eager
        from mixprec.kernels.regional import compile_regions
        compile_regions(model, dynamic=False)
        return model
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def _measure(name: str, fn_model, model, s, shapes, reference_denoiser, text_len: int, device, dtype,
             cuda: bool) -> dict:
    """Latency of ``fn_model`` (``model``, compiled or not) at every resolution x batch."""
    latent_key = latent_input_name(reference_denoiser)
    timing = {}
    for res, batch in shapes:
        xin = denoiser_inputs(reference_denoiser, batch, res // 8, text_len, seed=11, device=device, dtype=dtype)
        if s.memory_format == "channels_last":
            xin[latent_key] = xin[latent_key].contiguous(memory_format=torch.channels_last)

        def call():
            with torch.no_grad():
                return fn_model(**xin, return_dict=False)[0]

        t = time.perf_counter()
        if cuda:
            g = capture(call)
            warm = time.perf_counter() - t
            tm = time_graph(g, int(s.iters), int(s.warmup))
            del g
        else:
            tm = _time_cpu(call, int(s.iters), int(s.warmup))
            warm = time.perf_counter() - t
        tm["warmup_compile_s"] = warm
        tm["memory"] = _peak(model, xin, cuda)
        timing[f"{res}x{batch}"] = tm
        log.info("benchmark %s %dx%d: median %.2f ms (p10 %.2f, p90 %.2f)", name, res, batch,
                 tm["median_ms"], tm["p10_ms"], tm["p90_ms"])
    return timing


END_TO_END_COMPONENTS = ("text_encoder", "text_encoder_2", "denoiser", "vae_decode")


def end_to_end_graph_components(names, cuda: bool) -> list[str]:
    """The pipeline components whose calls replay CUDA graphs end to end (none without CUDA)."""
    names = list(names or [])
    unknown = [n for n in names if n not in END_TO_END_COMPONENTS]
    if unknown:
        raise ValueError(f"stage.end_to_end_cuda_graphs: unknown component {unknown[0]!r}; choose from "
                         f"{list(END_TO_END_COMPONENTS)} (or [] for none)")
    if names and not cuda:
        log.info("benchmark on CPU: stage.end_to_end_cuda_graphs ignored (CUDA graphs need a GPU)")
        return []
    return names


def _end_to_end(bundle, denoiser, run: RunSettings, batch: int, repeats: int,
                graph_components: list[str], host_profile: int = 0, trace_path: Path | None = None) -> dict | None:
    """Pipeline time (prompt encoding, all denoiser steps, VAE decode) with ``denoiser`` in place,
    split by component (:func:`mixprec.kernels.pipeline_timing.time_pipeline`); the components in
    ``graph_components`` replay CUDA graphs (:mod:`mixprec.kernels.cuda_graphs`), as a deployment
    would, instead of launching every kernel from Python at each call."""
    from mixprec.kernels.cuda_graphs import graphed_forwards
    pairs = run.prompt_set("inference" if "inference" in run.prompts else "calibration")
    pairs = (pairs * batch)[:batch]
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    pipe = bundle.pipe
    original = replace_denoiser(pipe, denoiser)
    try:
        sampler = type(bundle.sampler)(pipe, bundle.spec.resolution, bundle.spec.num_inference_steps,
                                       bundle.spec.guidance_scale, batch_size=batch)
        components = pipeline_components(pipe, denoiser)
        graphed = {n: m for n, m in components.items() if n in graph_components}
        with graphed_forwards(graphed) as graphs:
            # the text encoders run in every timed call: embeddings are not reused between runs
            out = time_pipeline(lambda: sampler.generate(prompts, seeds), components, repeats, warmup=1,
                                before_each=sampler.clear_prompt_cache, host_profile=host_profile,
                                trace_path=trace_path)
            out["cuda_graphs"] = {n: g.summary() for n, g in graphs.items()}
        if "trace" in out:
            tr = out["trace"]
            busy = "" if tr["gpu_busy_ms"] is None else f", GPU busy {tr['gpu_busy_ms']:.1f} ms"
            log.info("end-to-end trace: wall %.1f ms%s; timeline %s", tr["wall_ms"], busy, tr["file"])
        total = out["breakdown_ms"]["total"]
        out.update(median_s=total["median_ms"] / 1000, p10_s=total["p10_ms"] / 1000, p90_s=total["p90_ms"] / 1000,
                   batch=batch, resolution=bundle.spec.resolution, steps=bundle.spec.num_inference_steps)
        return out
    finally:
        replace_denoiser(pipe, original)


def _file_slug(plan: str) -> str:
    """A plan name (``fused:w8a8:fp8``, or a plan YAML's path) as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", plan).strip("_") or "plan"


def _compile_vae_decoder(bundle, mode: str) -> None:
    """Compile the VAE decoder in place (once: every plan shares the VAE)."""
    vae = getattr(bundle.pipe, "vae", None)
    if vae is None or mode in (None, "none", "") or isinstance(vae.decoder, torch._dynamo.eval_frame.OptimizedModule):
        return
    if mode == "regional":
        from mixprec.kernels.regional import DEFAULT_REGIONS, region_names
        if getattr(vae, "_mixprec_regions_compiled", False) or not region_names(vae.decoder, DEFAULT_REGIONS):
            return  # compiled already, or no repeated block to compile: the decoder stays eager
        vae._mixprec_regions_compiled = True
    vae.decoder = _compile(vae.decoder, mode)


SIZED = ("resolutions", "batch_sizes", "compile", "iters", "warmup", "end_to_end_repeats")


def sized_settings(s: BenchmarkSettings, device_type: str) -> BenchmarkSettings:
    """The stage settings with every size left at null taken from ``stage.sizes.<device type>``."""
    sizes = (s.sizes or {}).get("cuda" if device_type == "cuda" else "cpu") or {}
    out = dataclasses.replace(s, **{k: sizes.get(k) for k in SIZED if getattr(s, k) is None})
    missing = [k for k in SIZED if getattr(out, k) is None and k != "resolutions"]
    if missing:
        raise ValueError(f"stage={s.name}: set stage.{missing[0]} (or stage.sizes.{device_type}.{missing[0]})")
    if device_type != "cuda":
        log.info("benchmark on CPU: %s (stage.sizes.cpu; the reference kernels measure accuracy, not speed)",
                 ", ".join(f"{k}={getattr(out, k)}" for k in SIZED))
    return out


def benchmark_shapes(s: BenchmarkSettings, default_resolution: int) -> list[tuple[int, int]]:
    """(resolution, batch) pairs to time: ``stage.shapes`` ("RESxBATCH" items) when set, else every
    resolution x batch size (resolutions default to the model's)."""
    if s.shapes:
        pairs = []
        for item in s.shapes:
            m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(item))
            if not m:
                raise ValueError(f"stage.shapes: {item!r} is not RESOLUTIONxBATCH (e.g. [512x1, 1024x1, 512x4])")
            pairs.append((int(m.group(1)), int(m.group(2))))
        return pairs
    return [(int(r), int(b)) for r in (s.resolutions or [default_resolution]) for b in s.batch_sizes]


def _final_plans_digest(ws: Workspace) -> str:
    return search.plans_digest({k: artifacts.read_plan_file(ws, f) for k, f in artifacts.FINAL_PLANS.items()
                                if ws.exists(f)})


def run(ctx: StageContext) -> dict:
    ws, track = ctx.workspace, ctx.tracker
    device_type = resolve_device(ctx.run.device).type
    s = sized_settings(ctx.settings, device_type)
    graph_components = end_to_end_graph_components(s.end_to_end_cuda_graphs, device_type == "cuda")
    shapes = benchmark_shapes(s, int(ctx.run.model.resolution))
    latent0 = shapes[0][0] // 8
    bundle, dtype = load_for_kernels(ctx.run, ws, latent0, str(s.calibration), s.dtype)
    denoiser, layers, device = bundle.denoiser, bundle.layers, bundle.device
    text_len = text_length(bundle.pipe)
    cuda = device.type == "cuda"
    backend = BackendConfig.merged(bundle.quant.kernels, s.kernels)
    x0 = denoiser_inputs(denoiser, 1, latent0, text_len, seed=7, device=device, dtype=dtype)
    set_plan(layers)
    with torch.no_grad():
        fp_out = denoiser(**x0).sample.float()

    result: dict[str, Any] = {"env": env_info(), "device": str(device), "dtype": str(dtype),
                              "compile": str(s.compile), "memory_format": str(s.memory_format),
                              "shapes": [f"{r}x{b}" for r, b in shapes], "kernels": backend.to_dict(),
                              "settings": dataclasses.asdict(s), "plans": {}}
    if "final" in s.plans:  # what the report checks against the final plans of the day
        result["plans_digest"] = _final_plans_digest(ws)
    dispatch_detail: dict[str, Any] = {}
    names = ["bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else str(dtype)]
    names += list(s.plans)
    for name in names:
        result["plans"][name] = _run_plan(name, name == names[0], bundle, layers, s, shapes, x0, fp_out, text_len,
                                          dtype, backend, ctx.run, ws, track, dispatch_detail, graph_components)
    base = result["plans"][names[0]]["timing"]
    for name in names[1:]:
        rec = result["plans"][name]
        rec["speedup"] = {k: base[k]["median_ms"] / v["median_ms"] for k, v in rec["timing"].items()}
        rec["weight_ratio_vs_16bit"] = result["plans"][names[0]]["weight_mib"] / rec["weight_mib"]
    ws.write_json(artifacts.BENCHMARK_DISPATCH, dispatch_detail)
    _log_summary(result)
    return result


def _run_plan(name, full, bundle, layers, s, shapes, x0, fp_out, text_len, dtype, backend, run, ws, track,
              dispatch_detail, graph_components) -> dict[str, Any]:
    """Convert, check and time one plan (the 16-bit baseline when ``full``)."""
    denoiser, device = bundle.denoiser, bundle.device
    cuda = device.type == "cuda"
    rec: dict[str, Any] = {}
    wb, ab, overrides = ({}, {}, {}) if full else resolve_plan(name, layers, ws)
    for layer in layers.values():
        layer.drop_cache()
    model = copy.deepcopy(denoiser)
    mlayers = quant_layers(model)
    set_plan(mlayers, wb, ab)
    rec["quantized_layers"] = sum(1 for n in mlayers if wb.get(n) or ab.get(n))
    report = convert_(model, BackendConfig.from_mapping({**backend.to_dict(), **overrides}), example_kwargs=x0)
    rec["kernels"] = overrides or None
    rec["dispatch"] = report.summary()
    dispatch_detail[name] = report.to_dict()
    if s.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(**x0).sample.float()
        rec["sqnr_vs_16bit_db"] = sqnr_db(fp_out, out)
        if not full:  # the fake-quant function of the stored codes (fp8 rounding for fp8 layers)
            with reference_path(model):
                rec["sqnr_vs_fake_quant_db"] = sqnr_db(model(**x0).sample.float(), out)
    rec["weight_mib"] = weight_bytes(model) / MIB
    fn_model = _compile(model, str(s.compile))
    rec["timing"] = _measure(name, fn_model, model, s, shapes, denoiser, text_len, device, dtype, cuda)
    if s.end_to_end:
        if s.end_to_end_compile_vae:
            _compile_vae_decoder(bundle, str(s.compile))
        trace = ws.path(f"{BENCHMARK_TRACES_DIR}/{_file_slug(name)}.json") if s.end_to_end_trace else None
        rec["end_to_end"] = _end_to_end(bundle, fn_model, run, shapes[0][1], int(s.end_to_end_repeats),
                                        graph_components, int(s.end_to_end_host_profile), trace)
        if trace is not None:  # the JSON names the timeline inside the workspace, not on this machine
            rec["end_to_end"]["trace"]["file"] = trace.relative_to(ws.root).as_posix()
    if s.save_checkpoint and name == s.save_checkpoint:
        from mixprec.checkpoint import save_quantized
        rec["checkpoint"] = save_quantized(model, ws.path(CHECKPOINT_FILE), extra={"plan": name})
    track.log({f"benchmark/{name}/{k}/median_ms": v["median_ms"] for k, v in rec["timing"].items()})
    del model, out, fn_model
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


def _log_summary(result: dict) -> None:
    for name, rec in result["plans"].items():
        if rec.get("end_to_end"):
            parts = rec["end_to_end"]["breakdown_ms"]
            log.info("benchmark %-16s end to end %s", name,
                     "  ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in parts.items()))
        log.info("benchmark %-16s weights %8.1f MiB  %s  sqnr(16-bit) %.1f dB", name, rec["weight_mib"],
                 "  ".join(f"{k}: {v['median_ms']:.2f} ms" for k, v in rec["timing"].items()), rec["sqnr_vs_16bit_db"])
