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
import time
from typing import Any

import torch
from omegaconf import DictConfig

from mixprec import artifacts, search
from mixprec.artifacts import CHECKPOINT_FILE, IMAGES_DIR
from mixprec.generation import Sampler, to_pil
from mixprec.lora import check_inference_entries
from mixprec.models import denoiser_example_inputs, denoiser_of, latent_size, load_pipeline, resolve_device, \
    text_length
from mixprec.quantizers import set_plan
from mixprec.selection import adherence, image_names, image_scores, save_images
from mixprec.context import StageContext, load_calibrated, model_spec, prompt_set, quant_recipe, to_dict
from mixprec.workspace import MissingArtifactError, Workspace, check_safetensors

log = logging.getLogger("mixprec")

EXECUTIONS = ("fake", "kernels")


def _timed_generate(sampler, prompts, seeds, adapters=()):
    from mixprec.lora import loaded

    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with loaded(sampler.pipe, adapters):  # stage.lora: beside the layers for this generation only
        out = sampler.generate(prompts, seeds)
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
    return out.images, time.perf_counter() - start


def save_and_score(ws: Workspace, save_full_precision: bool, fp_images: torch.Tensor, q_images: torch.Tensor,
                   pairs, checker) -> dict[str, Any]:
    """Write the quantized (and full-precision) images; their scores against full precision."""
    save_images(ws, image_names(IMAGES_DIR, pairs), q_images, pairs)
    if save_full_precision:
        save_images(ws, image_names(f"{IMAGES_DIR}/full_precision", pairs), fp_images, pairs)
    return image_scores(fp_images, q_images, [p for p, _ in pairs], checker)


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
    packed = search.plan_bytes(applied, params, out_ch)
    fp16 = sum(2 * params[n] for n in applied)
    return {"quantized_layers_bytes": packed, "quantized_layers_fp16_bytes": fp16,
            "quantized_layers_mib": packed / search.MIB, "fp16_mib": fp16 / search.MIB,
            "compression": fp16 / packed if packed else None}


def kernel_options(cfg: DictConfig):
    """mixprec.kernels options: the recipe's ``quant.kernels``, overridden by ``stage.kernels``."""
    from mixprec.kernels import BackendConfig

    return BackendConfig.merged(quant_recipe(cfg).kernels, to_dict(cfg.stage.get("kernels")))


def probe_inputs(pipe, resolution: int, device: torch.device) -> dict[str, Any]:
    """One denoiser call's inputs (batch 1, the pipeline's resolution): what the dispatch report
    records rows and paths for."""
    denoiser = denoiser_of(pipe)
    dtype = next(denoiser.parameters()).dtype
    return denoiser_example_inputs(denoiser, 1, latent_size(pipe, resolution), text_length(pipe), device=device,
                                   dtype=dtype, generator=torch.Generator("cpu").manual_seed(7))


def _check_options(s: DictConfig) -> str:
    execution = str(s.get("execution") or "fake")
    if execution not in EXECUTIONS:
        raise ValueError(f"stage.execution must be one of {EXECUTIONS}, got {execution!r}")
    if s.get("save_checkpoint") and execution != "kernels":
        raise ValueError("stage.save_checkpoint=true needs stage.execution=kernels: a checkpoint holds the "
                         "converted kernel modules, which the fake-quantization run does not build")
    if s.get("checkpoint") and s.get("save_checkpoint"):
        raise ValueError("stage.checkpoint (generate from a saved checkpoint) and stage.save_checkpoint=true "
                         "exclude each other: the loaded file is already the checkpoint")
    return execution


def run(ctx: StageContext) -> dict:
    cfg, ws, track = ctx.cfg, ctx.workspace, ctx.tracker
    s = cfg.stage
    execution = _check_options(s)
    if s.get("checkpoint"):
        return run_from_checkpoint(ctx)
    final, weight_plan, act_plan = artifacts.read_checked_final_plans(ws, s.get("plan_dir"), bool(s.use_act_plan))
    adapters = check_inference_entries(to_dict(s.get("lora")))
    bundle = load_calibrated(cfg, ws, batch_size=int(s.batch_size))
    pairs = prompt_set(cfg, "inference")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]

    fp_images, fp_s = _timed_generate(bundle.sampler, prompts, seeds, adapters)
    set_plan(bundle.layers, weight_bits=weight_plan.bits, act_bits=act_plan.bits if act_plan else None)
    dispatch = {"backend": "fake", "layers": {n: "fake" for n, l in bundle.layers.items()
                                              if l.w_bits is not None or l.a_bits is not None}}
    applied = {n: {"w": l.w_bits, "a": l.a_bits} for n, l in bundle.layers.items()}
    weights = weight_bytes(bundle.layers, bundle.census())
    report = None
    if execution == "kernels":
        from mixprec.kernels import convert_

        with torch.no_grad():
            report = convert_(bundle.denoiser, kernel_options(cfg),
                              example_kwargs=probe_inputs(bundle.pipe, bundle.spec.resolution, bundle.device))
    q_images, q_s = _timed_generate(bundle.sampler, prompts, seeds, adapters)
    scores = save_and_score(ws, bool(s.save_full_precision), fp_images, q_images, pairs, bundle.spec.checker)
    fp_check = adherence(fp_images, prompts, bundle.spec.checker)
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
        "latency_s": {"full_precision": fp_s, "quantized": q_s, "device": str(bundle.device),
                      "note": "fake quantization (quantize-dequantize in float) measures quality, not speed; "
                              "stage=benchmark measures real kernels"},
        "dispatch_counts": {"fake": len(dispatch["layers"]),
                            "full_precision": len(bundle.layers) - len(dispatch["layers"])},
        "applied_bits": applied,
        "per_image": scores["per_image"],
    }
    if report is not None:
        _record_kernels(ws, headline, report, bundle.denoiser, q_s)
        if s.get("save_checkpoint"):
            from mixprec.checkpoint import save_quantized

            headline["checkpoint"] = save_quantized(
                bundle.denoiser, ws.path(CHECKPOINT_FILE),
                extra={"weight_plan": final["weight"], "act_plan": final["act"] if act_plan else None,
                       # what mixprec.load_quantized_pipeline checks a base model against
                       "model_fingerprint": ws.fingerprints.get("model"), "model": to_dict(cfg.model),
                       "device_type": bundle.device.type})
    track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
    track.log_images("infer/quantized", to_pil(q_images), prompts)
    track.log_images("infer/full_precision", to_pil(fp_images), prompts)
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


def run_from_checkpoint(ctx: StageContext) -> dict:
    """Generate with a saved quantized denoiser: no plans, no calibration."""
    cfg, ws, track = ctx.cfg, ctx.workspace, ctx.tracker
    from mixprec.checkpoint import load_quantized, read_info
    from mixprec.kernels import BackendConfig

    s = cfg.stage
    path = ws.path(str(s.checkpoint))
    if not path.exists():
        raise MissingArtifactError(
            f"the quantized checkpoint {path} does not exist. Write one with `python run.py stage=infer "
            f"stage.execution=kernels stage.save_checkpoint=true` (it lands in the workspace as {CHECKPOINT_FILE}).")
    check_safetensors(path, "`python run.py stage=infer stage.execution=kernels stage.save_checkpoint=true` "
                            "(or stage=benchmark stage.save_checkpoint=<plan>)")
    info = read_info(path)
    adapters = check_inference_entries(to_dict(s.get("lora")))
    spec = model_spec(cfg)
    device = resolve_device(str(cfg.device))
    pipe = load_pipeline(spec, device=device)
    denoiser = denoiser_of(pipe)
    dtype = str(next(denoiser.parameters()).dtype)
    if info.get("dtype") and info["dtype"] != dtype:
        raise ValueError(f"{path} was saved from a {info['dtype']} denoiser, but model={spec.name} loads in {dtype}: "
                         f"load it with the model settings it was saved with")
    sampler = Sampler(pipe, spec.resolution, spec.num_inference_steps, spec.guidance_scale,
                      batch_size=int(s.batch_size))
    pairs = prompt_set(cfg, "inference")
    prompts, seeds = [p for p, _ in pairs], [sd for _, sd in pairs]
    fp_images, fp_s = _timed_generate(sampler, prompts, seeds, adapters)
    # the options the file was saved with, then this stage's (the stored codes fix each format)
    options = BackendConfig.merged(info.get("backend"), to_dict(s.get("kernels")))
    load_quantized(denoiser, path, config=options, device=device)
    from mixprec.kernels.convert import report_for

    report = report_for(denoiser)
    with torch.no_grad():
        report.probe(denoiser, **probe_inputs(pipe, spec.resolution, device))
    q_images, q_s = _timed_generate(sampler, prompts, seeds, adapters)
    scores = save_and_score(ws, bool(s.save_full_precision), fp_images, q_images, pairs, spec.checker)
    headline = {
        "execution": "checkpoint", "lora": adapters, "checkpoint": {"path": str(path), "file_bytes": path.stat().st_size,
                                                  "plan_files": (info.get("extra") or {})},
        "images": len(pairs), "psnr_db": scores["psnr_db"], "ssim": scores["ssim"], "mse": scores["mse"],
        "adherence": scores.get("adherence"), "adherence_detail": scores.get("adherence_detail"),
        "latency_s": {"full_precision": fp_s, "quantized": q_s, "device": str(device)},
        "applied_bits": {d["name"]: {"w": d["w_bits"], "a": d["a_bits"]} for d in info["layers"]},
        "per_image": scores["per_image"],
    }
    _record_kernels(ws, headline, report, denoiser, q_s)
    track.summary({k: v for k, v in headline.items() if isinstance(v, (int, float))})
    track.log_images("infer/quantized", to_pil(q_images), prompts)
    log.info("infer (checkpoint %s): %d images, PSNR %.2f dB, SSIM %.4f; denoiser %.2f MiB", path.name, len(pairs),
             scores["psnr_db"], scores["ssim"], headline["denoiser_weight_bytes"] / search.MIB)
    return headline
