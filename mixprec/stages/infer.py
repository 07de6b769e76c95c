"""stage=infer: run the final plans and measure what they cost and save.

Loads ``final_weight_mp.yaml`` (and ``final_act_mp.yaml`` unless ``stage.use_act_plan=false``),
generates the inference prompts into ``generated_images/`` (full-precision references under
``generated_images/full_precision/``; prompt and seed in each file name and PNG metadata) and
returns the numbers the runner writes to ``infer.json``: PSNR/SSIM against full precision,
caption adherence where the model has a checker (per image for full precision and the plan, and
the images the plan broke and fixed: ``adherence_changes``), weight bytes, latency, and the bits
each layer actually ran with and on which kernel.

``stage.execution`` chooses how the quantized images are made: ``fake`` (quantize-dequantize in
float: the quality the search optimized) or ``kernels`` (the plan converted to mixprec.kernels
modules: packed codes, fp8/int8 GEMMs on CUDA, the reference path elsewhere; the dispatch report
goes to ``infer_dispatch.json``). With ``kernels``, ``stage.save_checkpoint=true`` writes the
converted denoiser to ``quantized_denoiser.safetensors``; ``stage.checkpoint=<file>`` generates with
such a file instead of the plans, with no calibration at all.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mixprec import artifacts, search
from mixprec.artifacts import CHECKPOINT_FILE, IMAGES_DIR
from mixprec.context import StageContext, load_calibrated
from mixprec.generation import Sampler, to_pil
from mixprec.lora import check_inference_entries
from mixprec.models import denoiser_example_inputs, denoiser_of, latent_size, load_pipeline, resolve_device, \
    text_length
from mixprec.quantizers import set_plan
from mixprec.selection import Generation, adherence, generate_and_score
from mixprec.settings import InferSettings
from mixprec.workspace import MissingArtifactError, Workspace, check_safetensors

log = logging.getLogger("mixprec")

EXECUTIONS = ("fake", "kernels")


def save_images(ws: Workspace, s: InferSettings, full_precision: Generation, quantized: Generation,
                pairs: list[tuple[str, int]]) -> None:
    """The quantized images under ``generated_images/``, the full-precision ones (``stage.save_full_precision``)
    under ``generated_images/full_precision/``; prompt and seed in each file name and PNG metadata."""
    quantized.save(ws, IMAGES_DIR, pairs)
    if s.save_full_precision:
        full_precision.save(ws, f"{IMAGES_DIR}/full_precision", pairs)


def adherence_changes(fp_check: dict[str, Any] | None, scores: dict[str, Any], pairs) -> dict[str, Any] | None:
    """Per image, whether full precision and the plan follow the caption, and which images the plan
    broke (full precision right, plan wrong) or fixed: equal rates can hide one of each."""
    plan = scores.get("per_image", {}).get("adherence")
    if not fp_check or plan is None:
        return None
    full = fp_check["per_image"]

    def listed(which: list[int]) -> list[dict[str, Any]]:
        return [{"index": i, "prompt": pairs[i][0], "seed": pairs[i][1]} for i in which]
    broke = [i for i, (f, q) in enumerate(zip(full, plan)) if f and not q]
    fixed = [i for i, (f, q) in enumerate(zip(full, plan)) if q and not f]
    return {"full_precision": [bool(v) for v in full], "plan": [bool(v) for v in plan],
            "broke": listed(broke), "fixed": listed(fixed)}


def weight_bytes(layers, census_rows) -> dict[str, Any]:
    params = {r.name: r.params for r in census_rows}
    out_ch = {r.name: r.out_channels for r in census_rows}
    applied = {n: (16 if l.w_bits is None else l.w_bits) for n, l in layers.items()}
    groups = {n: int(l.w_group) for n, l in layers.items() if l.w_bits is not None and getattr(l, "w_group", 0)}
    packed = search.weight_plan_bytes(applied, params, out_ch, groups)
    fp16 = sum(2 * params[n] for n in applied)
    return {"quantized_layers_bytes": packed, "quantized_layers_fp16_bytes": fp16,
            "quantized_layers_mib": packed / search.MIB, "fp16_mib": fp16 / search.MIB,
            "compression": fp16 / packed if packed else None}


def kernel_options(recipe_kernels, stage_kernels):
    """mixprec.kernels options: the recipe's ``quant.kernels``, overridden by ``stage.kernels``."""
    from mixprec.kernels import BackendConfig

    return BackendConfig.merged(recipe_kernels, stage_kernels)


def probe_inputs(pipe, resolution: int, device: torch.device) -> dict[str, Any]:
    """One denoiser call's inputs (batch 1, the pipeline's resolution): what the dispatch report
    records rows and paths for."""
    denoiser = denoiser_of(pipe)
    dtype = next(denoiser.parameters()).dtype
    return denoiser_example_inputs(denoiser, 1, latent_size(pipe, resolution), text_length(pipe), device=device,
                                   dtype=dtype, generator=torch.Generator("cpu").manual_seed(7))


def _check_options(s: InferSettings) -> str:
    execution = str(s.execution or "fake")
    if execution not in EXECUTIONS:
        raise ValueError(f"stage.execution must be one of {EXECUTIONS}, got {execution!r}")
    if s.save_checkpoint and execution != "kernels":
        raise ValueError("stage.save_checkpoint=true needs stage.execution=kernels: a checkpoint holds the "
                         "converted kernel modules, which the fake-quantization run does not build")
    if s.checkpoint and s.save_checkpoint:
        raise ValueError("stage.checkpoint (generate from a saved checkpoint) and stage.save_checkpoint=true "
                         "exclude each other: the loaded file is already the checkpoint")
    return execution


def _apply_plans(bundle, weight_plan, act_plan, execution: str, options):
    """Set the final plans on the quantized layers and, with ``kernels``, convert them to kernel modules.
    Returns the quantized layers' names, the bits each layer runs with, the weight bytes and the
    dispatch report (None with ``fake``)."""
    set_plan(bundle.layers, weight_bits=weight_plan.bits, act_bits=act_plan.bits if act_plan else None,
             weight_groups=weight_plan.group_size)
    quantized = [n for n, l in bundle.layers.items() if l.w_bits is not None or l.a_bits is not None]
    # per-group weight layers say their group size ("g"); per-channel entries read as before
    applied = {n: {"w": l.w_bits, "a": l.a_bits} | ({"g": l.w_group} if l.w_bits is not None and l.w_group else {})
               for n, l in bundle.layers.items()}
    weights = weight_bytes(bundle.layers, bundle.census())
    report = None
    if execution == "kernels":
        from mixprec.kernels import convert_

        with torch.no_grad():
            report = convert_(bundle.denoiser, options,
                              example_kwargs=probe_inputs(bundle.pipe, bundle.spec.resolution, bundle.device))
    return quantized, applied, weights, report


def run(ctx: StageContext) -> dict:
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    execution = _check_options(s)
    if s.checkpoint:
        return run_from_checkpoint(ctx)
    final, weight_plan, act_plan = artifacts.read_checked_final_plans(ws, s.plan_dir, bool(s.use_act_plan))
    adapters = check_inference_entries(s.lora)
    bundle = load_calibrated(ctx.run, ws, batch_size=int(s.batch_size))
    pairs = ctx.run.prompt_set("inference")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    checker = bundle.spec.checker

    fp = generate_and_score(bundle.sampler, None, prompts, seeds, adapters=adapters)
    quantized, applied, weights, report = _apply_plans(bundle, weight_plan, act_plan, execution,
                                                       kernel_options(ctx.run.quant.kernels, s.kernels))
    q = generate_and_score(bundle.sampler, None, prompts, seeds, fp.images, checker, adapters=adapters)
    save_images(ws, s, fp, q, pairs)
    scores = q.scores
    fp_check = adherence(fp.images, prompts, checker)
    fp_adh = fp_check["all"] if fp_check else None
    changes = adherence_changes(fp_check, scores, pairs)
    headline = {
        "execution": execution,
        "lora": adapters,
        "images": len(pairs),
        "psnr_db": scores["psnr_db"], "ssim": scores["ssim"], "mse": scores["mse"],
        "adherence": scores.get("adherence"), "adherence_detail": scores.get("adherence_detail"),
        "adherence_full_precision": fp_adh,
        "adherence_changes": changes,
        "weights": weights,
        "weight_plan": {"path": final["weight"], "mean_bits": weight_plan.header.get("achieved_mean_bits")},
        "act_plan": {"path": final["act"], "mean_bits": act_plan.header.get("achieved_mean_bits")} if act_plan else None,
        # what the numbers were computed from: the report marks them stale once the final plans change
        "plans_digest": search.plans_digest({"weight": weight_plan, "act": act_plan}),
        "latency_s": {"full_precision": fp.seconds, "quantized": q.seconds, "device": str(bundle.device),
                      "note": "fake quantization (quantize-dequantize in float) measures quality, not speed; "
                              "stage=benchmark measures real kernels"},
        "dispatch_counts": {"fake": len(quantized), "full_precision": len(bundle.layers) - len(quantized)},
        "applied_bits": applied,
        "per_image": scores["per_image"],
    }
    if report is not None:
        _record_kernels(ws, headline, report, bundle.denoiser, q.seconds)
        if s.save_checkpoint:
            from mixprec.checkpoint import save_quantized

            headline["checkpoint"] = save_quantized(
                bundle.denoiser, ws.path(CHECKPOINT_FILE),
                extra={"weight_plan": final["weight"], "act_plan": final["act"] if act_plan else None,
                       # what mixprec.load_quantized_pipeline checks a base model against
                       "model_fingerprint": ws.fingerprints.get("model"), "model": dict(ctx.run.model_config),
                       "device_type": bundle.device.type})
    track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
    track.log_images("infer/quantized", to_pil(q.images), prompts)
    track.log_images("infer/full_precision", to_pil(fp.images), prompts)
    if execution == "fake":
        set_plan(bundle.layers)
    log.info("infer: %d images, PSNR %.2f dB, SSIM %.4f%s; weights %.2f MiB (fp16 %.2f MiB)", len(pairs),
             scores["psnr_db"], scores["ssim"],
             f", adherence {scores['adherence']:.3f} (fp {fp_adh:.3f}; the plan broke {len(changes['broke'])} and "
             f"fixed {len(changes['fixed'])} image(s))" if changes else "",
             headline["weights"]["quantized_layers_mib"], headline["weights"]["fp16_mib"])
    return headline


def _record_kernels(ws: Workspace, headline: dict, report, denoiser, seconds: float) -> None:
    from mixprec.kernels import weight_bytes as stored_bytes

    headline["dispatch_counts"] = report.summary()
    headline["denoiser_weight_bytes"] = stored_bytes(denoiser)
    headline["latency_s"]["quantized"] = seconds
    headline["latency_s"]["note"] = ("real kernel modules (see dispatch_counts for the paths that ran); on CPU "
                                     "they take the reference path. stage=benchmark times them on a GPU")
    ws.write_json(artifacts.INFER_DISPATCH, report.to_dict())


def _checkpoint_file(ws: Workspace, name: str):
    path = ws.path(name)
    if not path.exists():
        raise MissingArtifactError(
            f"the quantized checkpoint {path} does not exist. Write one with `python run.py stage=infer "
            f"stage.execution=kernels stage.save_checkpoint=true` (it lands in the workspace as {CHECKPOINT_FILE}).")
    return check_safetensors(path, "`python run.py stage=infer stage.execution=kernels stage.save_checkpoint=true` "
                                   "(or stage=benchmark stage.save_checkpoint=<plan>)")


def run_from_checkpoint(ctx: StageContext) -> dict:
    """Generate with a saved quantized denoiser: no plans, no calibration."""
    s, ws, track = ctx.settings, ctx.workspace, ctx.tracker
    from mixprec.checkpoint import load_quantized, read_info
    from mixprec.kernels.convert import report_for

    path = _checkpoint_file(ws, str(s.checkpoint))
    info = read_info(path)
    adapters = check_inference_entries(s.lora)
    spec = ctx.run.model
    device = resolve_device(ctx.run.device)
    pipe = load_pipeline(spec, device=device)
    denoiser = denoiser_of(pipe)
    dtype = str(next(denoiser.parameters()).dtype)
    if info.get("dtype") and info["dtype"] != dtype:
        raise ValueError(f"{path} was saved from a {info['dtype']} denoiser, but model={spec.name} loads in {dtype}: "
                         f"load it with the model settings it was saved with")
    sampler = Sampler(pipe, spec.resolution, spec.num_inference_steps, spec.guidance_scale,
                      batch_size=int(s.batch_size))
    pairs = ctx.run.prompt_set("inference")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    fp = generate_and_score(sampler, None, prompts, seeds, adapters=adapters)
    # the options the file was saved with, then this stage's (the stored codes fix each format)
    load_quantized(denoiser, path, config=kernel_options(info.get("backend"), s.kernels), device=device)
    report = report_for(denoiser)
    with torch.no_grad():
        report.probe(denoiser, **probe_inputs(pipe, spec.resolution, device))
    q = generate_and_score(sampler, None, prompts, seeds, fp.images, spec.checker, adapters=adapters)
    save_images(ws, s, fp, q, pairs)
    scores = q.scores
    headline = {
        "execution": "checkpoint", "lora": adapters, "checkpoint": {"path": str(path), "file_bytes": path.stat().st_size,
                                                  "plan_files": (info.get("extra") or {})},
        "images": len(pairs), "psnr_db": scores["psnr_db"], "ssim": scores["ssim"], "mse": scores["mse"],
        "adherence": scores.get("adherence"), "adherence_detail": scores.get("adherence_detail"),
        "latency_s": {"full_precision": fp.seconds, "quantized": q.seconds, "device": str(device)},
        "applied_bits": {d["name"]: {"w": d["w_bits"], "a": d["a_bits"]} for d in info["layers"]},
        "per_image": scores["per_image"],
    }
    _record_kernels(ws, headline, report, denoiser, q.seconds)
    track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
    track.log_images("infer/quantized", to_pil(q.images), prompts)
    log.info("infer (checkpoint %s): %d images, PSNR %.2f dB, SSIM %.4f; denoiser %.2f MiB", path.name, len(pairs),
             scores["psnr_db"], scores["ssim"], headline["denoiser_weight_bytes"] / search.MIB)
    return headline
