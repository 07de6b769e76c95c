"""Where the time of one sensitivity evaluation goes, on one GPU, for a calibrated workspace.

One evaluation = one layer at one bit-width: regenerate the sensitivity prompts and score them
against the full-precision reference (content layers: decode + SSIM; quality layers: SQNR of the
denoiser output). This loads the workspace's model and calibration exactly as the stage does, then
times (CUDA-synchronised wall clock, median of ``--reps``) the two evaluations end to end and their
parts: the pipeline call without decoding, the bare UNet forward, the VAE decode as the SDXL
pipeline runs it (upcast to float32: ``force_upcast``) and in bfloat16, SSIM, SQNR; plus one
content evaluation under torch.profiler. Results go to one JSON file (and the profiler table next
to it). Nothing is written to the workspace.

    python benchmarks/sensitivity_profile.py --out $OUT/profile.json -- \
        stage=sensitivity model=sdxl_turbo model.weights=random model.dtype=float16 prompts=coco \
        'prompts.sensitivity={file:sweeps/prompts/sdxl32.txt,seed:1000}' stage.batch_size=32 tracking=disabled
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> dict:
    fn()  # warm-up: first calls pick kernels and fill caches
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def pick_layers(layers: dict, groups: dict) -> tuple[str, str]:
    """A content and a quality layer from the middle of the network (cost barely depends on which)."""
    names = list(layers)
    mid = names[len(names) // 3:]
    content = next(n for n in mid if groups[n] == "content")
    quality = next(n for n in mid if groups[n] == "quality" and not layers[n].is_conv)
    return content, quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4, help="weight bits of the evaluated layer")
    ap.add_argument("overrides", nargs="*", help="run.py overrides (after --)")
    args = ap.parse_args()

    from mixprec import sensitivity as sens
    from mixprec.metrics import sqnr_db_per_sample, ssim_torch
    from mixprec.models import layer_group
    from mixprec.context import load_calibrated, prompt_set, workspace

    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    cfg = compose(args.overrides)
    ws = workspace(cfg)
    sync()
    t = time.perf_counter()
    bundle = load_calibrated(cfg, ws, batch_size=int(cfg.stage.batch_size))
    sync()
    out["load_model_and_calibration_s"] = time.perf_counter() - t
    pipe, sampler, layers = bundle.pipe, bundle.sampler, bundle.layers
    pairs = prompt_set(cfg, "sensitivity")
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    out.update(prompts=len(prompts), batch_size=sampler.batch_size, resolution=sampler.resolution, steps=sampler.steps,
               dtype=str(bundle.denoiser.dtype), vae_force_upcast=bool(getattr(pipe.vae.config, "force_upcast", False)))
    groups = {n: layer_group(n, bundle.spec.content_patterns) for n in layers}
    counts = {g: sum(1 for v in groups.values() if v == g) for g in ("content", "quality")}
    out["layers"] = counts
    cap = float(cfg.stage.sqnr_cap_db)

    sync()
    t = time.perf_counter()
    ref = sens.compute_reference(sampler, prompts, seeds, True, True)
    sync()
    out["reference_s"] = time.perf_counter() - t
    lc, lq = pick_layers(layers, groups)
    out["content_layer"], out["quality_layer"] = lc, lq

    def eval_layer(name: str, group: str, kind: str = "w"):
        def run():
            layers[name].set_bits(w_bits=args.bits if kind == "w" else None, a_bits=8 if kind == "a" else None)
            try:
                sens.score(sampler, group, ref, prompts, seeds, cap)
            finally:
                layers[name].set_bits(None, None)
        return run

    r = {}
    r["eval_content_w"] = timed(eval_layer(lc, "content"), args.reps)
    r["eval_quality_w"] = timed(eval_layer(lq, "quality"), args.reps)
    r["eval_content_a8"] = timed(eval_layer(lc, "content", "a"), args.reps)
    r["eval_quality_a8"] = timed(eval_layer(lq, "quality", "a"), args.reps)

    # Parts of a content evaluation.
    r["pipeline_no_decode"] = timed(lambda: sampler.generate(prompts, seeds, decode=False, keep_on_device=True),
                                    args.reps)
    r["pipeline_capture_denoiser"] = timed(
        lambda: sampler.generate(prompts, seeds, decode=False, capture_denoiser=True, keep_on_device=True), args.reps)
    captured = {}

    def grab(_m, a, kw):
        captured.setdefault("call", (a, kw))

    h = bundle.denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    latents = sampler.generate(prompts, seeds, decode=False, keep_on_device=True).latents
    h.remove()
    ua, ukw = captured["call"]
    with torch.no_grad():
        r["unet_forward"] = timed(lambda: bundle.denoiser(*ua, **ukw), args.reps)
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor

    vae_dtype = vae.dtype

    def decode_as_pipeline():
        # what StableDiffusionXLPipeline does with force_upcast: float32 VAE for the decode, then back
        with torch.no_grad():
            vae.to(torch.float32)
            img = vae.decode(latents.float() / sf, return_dict=False)[0]
            vae.to(vae_dtype)
        return img

    r["vae_decode_fp32_upcast"] = timed(decode_as_pipeline, args.reps)
    vae_bf16 = copy.deepcopy(vae).to(torch.bfloat16)

    def decode_bf16():
        with torch.no_grad():
            return vae_bf16.decode(latents.to(torch.bfloat16) / sf, return_dict=False)[0]

    r["vae_decode_bf16"] = timed(decode_bf16, args.reps)
    images = sampler.generate(prompts, seeds, decode=True, keep_on_device=True).images
    r["ssim_32_images"] = timed(lambda: ssim_torch(ref.images.float(), images.float()).cpu(), args.reps)
    den = sampler.generate(prompts, seeds, decode=False, capture_denoiser=True, keep_on_device=True).denoiser
    r["sqnr_32"] = timed(lambda: sqnr_db_per_sample(ref.denoiser, den).cpu(), args.reps)

    ref_bf16 = ((decode_bf16().float() / 2 + 0.5).clamp(0, 1))

    def content_eval_bf16_vae():
        # the proposed path: same pipeline call without decoding, then a bfloat16 VAE decode and SSIM
        layers[lc].set_bits(w_bits=args.bits)
        try:
            lat = sampler.generate(prompts, seeds, decode=False, keep_on_device=True).latents
            with torch.no_grad():
                img = (vae_bf16.decode(lat.to(torch.bfloat16) / sf, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
            return ssim_torch(ref_bf16, img).cpu()
        finally:
            layers[lc].set_bits(None, None)

    r["eval_content_w_bf16_vae"] = timed(content_eval_bf16_vae, args.reps)
    sampler.batch_size = 8
    r["eval_content_w_batch8"] = timed(eval_layer(lc, "content"), max(1, args.reps - 1))
    r["eval_quality_w_batch8"] = timed(eval_layer(lq, "quality"), max(1, args.reps - 1))
    sampler.batch_size = int(cfg.stage.batch_size)
    out["timings"] = r
    out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None

    med = {k: v["median_s"] for k, v in r.items()}
    unet = med["unet_forward"]
    out["content_eval_breakdown_s"] = {
        "unet_forward": unet,
        "pipeline_overhead_without_decode": med["pipeline_no_decode"] - unet,
        "vae_decode_fp32_upcast": med["vae_decode_fp32_upcast"],
        "ssim_and_copy": med["ssim_32_images"],
        "rest": med["eval_content_w"] - med["pipeline_no_decode"] - med["vae_decode_fp32_upcast"]
        - med["ssim_32_images"],
    }
    evals = {g: 5 * counts[g] for g in counts}  # weights at 2/4/8 and activations at 4/8
    c = (med["eval_content_w"] * 3 + med["eval_content_a8"] * 2) / 5
    q = (med["eval_quality_w"] * 3 + med["eval_quality_a8"] * 2) / 5
    out["seconds_per_eval"] = {"content": c, "quality": q}
    out["projected_full_sweep_s"] = evals["content"] * c + evals["quality"] * q
    out["projected_full_sweep_s_bf16_vae"] = evals["content"] * (c - med["eval_content_w"]
                                                                 + med["eval_content_w_bf16_vae"]) + evals["quality"] * q

    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            eval_layer(lc, "content")()
            sync()
        events = prof.key_averages()
        try:
            table = events.table(sort_by="device_time_total" if torch.cuda.is_available() else "cpu_time_total",
                                 row_limit=30)
        except Exception:
            table = events.table(sort_by="cpu_time_total", row_limit=30)
        Path(args.out).with_suffix(".profiler.txt").write_text(table)
    except Exception as exc:  # the timings above are the result; the profiler table is a bonus
        print(f"profiler failed: {exc!r}")
    print(json.dumps({k: out[k] for k in ("gpu", "load_model_and_calibration_s", "reference_s", "seconds_per_eval",
                                          "projected_full_sweep_s", "projected_full_sweep_s_bf16_vae",
                                          "content_eval_breakdown_s", "peak_gpu_mem_gib")}, indent=2))


if __name__ == "__main__":
    main()
