"""Seconds per sensitivity evaluation with the VAE decoder as is, in NHWC, and NHWC + compiled.

Loads a calibrated workspace as the sensitivity stage does and times ``sensitivity.score`` for one
content layer (decode + SSIM) and one quality layer (denoiser SQNR) under each decoder variant,
in one process, after a warm-up; writes JSON.

    python benchmarks/sensitivity_decoder.py --out $OUT/decoder.json -- stage=sensitivity ...overrides
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sensitivity_profile import compose, pick_layers, sync  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time the compiled decoder")
    ap.add_argument("--only", default="", help="comma-separated variant labels")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from mixprec import sensitivity as sens
    from mixprec.models import denoiser_of, layer_group
    from mixprec.context import load_calibrated, prompt_set, workspace

    cfg = compose(args.overrides)
    bundle = load_calibrated(cfg, workspace(cfg), batch_size=int(cfg.stage.batch_size))
    sampler, layers = bundle.sampler, bundle.layers
    pairs = prompt_set(cfg, "sensitivity")
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    groups = {n: layer_group(n, bundle.spec.content_patterns) for n in layers}
    lc, lq = pick_layers(layers, groups)
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "dtype": str(bundle.denoiser.dtype), "prompts": len(prompts), "batch_size": sampler.batch_size,
           "content_layer": lc, "quality_layer": lq, "variants": {}}

    def median_time(fn):
        values = fn()  # warm-up (and compilation)
        sync()
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), values

    def time_eval(name, group, ref):
        def once():
            layers[name].set_bits(w_bits=4)
            try:
                return sens.score(sampler, group, ref, prompts, seeds, 100.0)
            finally:
                layers[name].set_bits(None, None)
        return median_time(once)

    # (label, decoder NHWC, compiled decoder, cudnn.benchmark, UNet NHWC); cudnn.benchmark picks the
    # fastest convolution algorithm per shape (the shapes never change during a sweep).
    variants = [("as_is", False, False, False, False), ("channels_last", True, False, False, False),
                ("cudnn_benchmark", False, False, True, False)]
    if args.compile:
        variants += [("compiled", False, True, True, False), ("channels_last_compiled", True, True, True, False),
                     ("compiled_unet_channels_last", False, True, True, True)]
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    for label, nhwc, comp, bench, unet_nhwc in variants:
        torch.backends.cudnn.benchmark = bench
        vae = bundle.pipe.vae
        vae.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        if comp and not hasattr(vae.decoder, "_orig_mod"):
            sampler.optimize_decoder(channels_last=nhwc, compile=True)
        denoiser_of(bundle.pipe).to(memory_format=torch.channels_last if unet_nhwc else torch.contiguous_format)
        t0 = time.perf_counter()
        ref = sens.compute_reference(sampler, prompts, seeds, True, True)
        sync()
        ref_s = time.perf_counter() - t0
        c, cvals = time_eval(lc, "content", ref)
        q, _ = time_eval(lq, "quality", ref)
        out["variants"][label] = {"content_s": c, "quality_s": q, "reference_s": ref_s,
                                  "content_ssim_mean": sum(cvals) / len(cvals)}
        print(f"{label:24s} content {c:.3f} s  quality {q:.3f} s  (reference {ref_s:.1f} s, SSIM {sum(cvals)/len(cvals):.5f})",
              flush=True)
    # A/B of the one-step replay (Sampler.denoiser_outputs, what score() uses) against the pipeline call
    def quality_through_pipeline():
        layers[lq].set_bits(w_bits=4)
        try:
            den = sampler.generate(prompts, seeds, decode=False, capture_denoiser=True, keep_on_device=True).denoiser
            return sens.sqnr_db_per_sample(ref.denoiser, den).cpu()
        finally:
            layers[lq].set_bits(None, None)
    out["quality_through_pipeline_s"] = median_time(quality_through_pipeline)[0]
    print(f"quality evaluation through the pipeline call: {out['quality_through_pipeline_s']:.3f} s", flush=True)
    counts = {g: sum(1 for v in groups.values() if v == g) for g in ("content", "quality")}
    for label, v in out["variants"].items():
        v["projected_full_sweep_s"] = 5 * counts["content"] * v["content_s"] + 5 * counts["quality"] * v["quality_s"]
        print(f"{label:24s} projected full sweep {v['projected_full_sweep_s'] / 60:.1f} min")
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
