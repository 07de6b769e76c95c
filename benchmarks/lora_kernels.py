"""LoRA on the real-kernel path: accuracy against the fake-quant reference and unload bit-identity.

For each model x plan: the denoiser is calibrated on random inputs and set to the plan; one copy
stays fake-quant (QuantLayers, the reference), one is converted to kernel modules. The same random
adapter (PEFT key format, Linear and Conv2d layers) is loaded beside both with
``mixprec.lora.load_lora``. Recorded, on one batch of random denoiser inputs:

- ``sqnr_db.kernel_lora_vs_fake_lora``: denoiser output, kernels + LoRA vs fake-quant + LoRA (eager),
  and ``compiled_kernel_lora_vs_fake_lora`` under ``torch.compile`` (inductor);
- ``sqnr_db.kernel_vs_fake`` without the adapter (what the kernels cost on their own) and
  ``lora_effect`` (fake-quant with vs without the adapter: how much the adapter changes the output);
- ``sqnr_db.reference_stability``: the fake-quant + LoRA reference against itself with its latent
  input multiplied by ``1 + 1e-3 * noise`` (about two fp16 rounding steps). With quantized
  activations the network is a step function: any difference before a quantizer (another GEMM
  order, fp16 vs float32 rounding) moves some codes by one step and the moves spread layer by
  layer, so no implementation that is not bit-identical to the reference can agree with it much
  better than the reference agrees with itself. ``kernel_vs_fake`` near this number means the
  kernels are as close as any other rounding of the same plan; far below it, a kernel bug;
- ``sqnr_db.fake_vs_16bit``: fake-quant + LoRA vs the 16-bit model + LoRA (the plan's own error);
- ``unload_bit_identical``: after ``unload_lora`` the kernel model's output equals, bit for bit, its
  output before loading (eager; and compiled, compiling the unloaded model afresh, unless
  ``--no-compiled-unload``);
- ``paths``: the execution paths the kernel layers took (dispatch report probe).

Models: ``tiny`` (the built-in model's UNet), ``compose`` (the built-in compose model's UNet, a
trained SDXL-architecture pipeline, ``mixprec/assets/compose``), ``sdxl`` (full size, random weights).

    python benchmarks/lora_kernels.py --models tiny,compose,sdxl --plans w4a8,w8a8 --compile-models tiny,compose \
        --out $OUT/lora_kernels.json

Without CUDA it runs on CPU (kernel layers then take the reference path, or ``--cpu-path emulate``).

``--inputs prompts`` (tiny, compose) feeds the denoiser what its own pipeline gives it on captions
(``mixprec.kernels.probing.pipeline_denoiser_inputs``): calibration on training captions at every
sampler step, the measurement on held-out captions at ``--step``. Random tensors put a trained
model's activations outside their calibrated ranges, where the quantized network is far more
chaotic than in use (compose W8A8, fp16: reference vs itself 28.7 dB on random inputs, 43.6 dB on
captions).
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import env_info, write_json  # noqa: E402
from mixprec import lora  # noqa: E402
from mixprec.kernels import BackendConfig, convert_  # noqa: E402
from mixprec.kernels.probing import (calibrate_random, cast_floating_, denoiser_inputs, perturb_latent,  # noqa: E402
                                    pipeline_denoiser_inputs, sqnr_db)
from mixprec.models import build_unet  # noqa: E402
from mixprec.quantizers import quant_layers, set_plan  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")
PLANS = {"w4a8": (4, 8), "w8a8": (8, 8), "w4a16": (4, None)}


def build(model: str, device: torch.device, dtype: torch.dtype):
    if model in ("tiny", "compose"):
        from mixprec.models import ModelSpec, load_pipeline

        unet = load_pipeline(ModelSpec.from_dict({"name": model, "source": "builtin"})).unet
        unet = unet.to(device).eval().requires_grad_(False)
    else:
        unet = build_unet(model, device=device)
    return cast_floating_(unet, dtype)


def prompt_inputs(model: str, device: torch.device, dtype: torch.dtype,
                  sets: list[tuple[str, int, int]]) -> list[list[dict]]:
    """The denoiser's inputs when the built-in ``model``'s own pipeline (loaded once) draws captions of
    its scene generator: for each (split, n, seed) of ``sets``, one dict per sampler step."""
    import importlib

    import yaml

    from mixprec.models import ModelSpec, load_pipeline
    from mixprec.prompts import PROMPT_GENERATORS

    pipe = load_pipeline(ModelSpec.from_dict({"name": model, "source": "builtin"})).to(device)
    eval_prompts = importlib.import_module(PROMPT_GENERATORS[model]).eval_prompts
    steps = yaml.safe_load((ROOT / "conf" / "model" / f"{model}.yaml").read_text())["num_inference_steps"]
    return [pipeline_denoiser_inputs(pipe, [c for c, _ in eval_prompts(n, split=split, seed=seed)],
                                     num_inference_steps=steps, seed=seed, dtype=dtype)
            for split, n, seed in sets]


def run_one(model: str, plan: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    compile_it = model in args.compile_models.split(",")
    unet = build(model, device, dtype)
    latent = args.latent or unet.config.sample_size
    if args.inputs == "prompts":
        # calibrate on training captions (every sampler step), measure on held-out ones at --step
        calib, heldout = prompt_inputs(model, device, dtype, [("train", args.batch * 4, 1), ("heldout", args.batch, 3)])
        x = heldout[args.step]
    else:
        calib = [denoiser_inputs(unet, args.batch, latent=latent, seed=s) for s in range(2)]
        x = denoiser_inputs(unet, args.batch, latent=latent, seed=9)
    w, a = PLANS[plan]
    with torch.no_grad():
        layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(w,), act_bits=(8,))
    set_plan(layers, {n: w for n in layers}, {n: a for n in layers})
    adapter = lora.random_lora_state_dict(unet, TARGETS, rank=args.rank, relative_norm=args.relative_norm, seed=1)
    fake = copy.deepcopy(unet)
    kernel = unet
    report = convert_(kernel, BackendConfig(bos="exact", cpu=args.cpu_path), example_kwargs=x)

    def out(m, inputs=x):
        with torch.no_grad():
            return m(**inputs).sample.float()

    fake_plain, kernel_before = out(fake), out(kernel)
    compiled_unload = compile_it and not args.no_compiled_unload
    compiled_before = out(torch.compile(kernel)) if compiled_unload else None
    lora.load_lora(fake, adapter, "bench")
    lora.load_lora(kernel, adapter, "bench")
    fake_lora, kernel_lora = out(fake), out(kernel)
    fp_lora = _sixteen_bit(fake, out)
    result = {
        "model": model, "plan": plan, "dtype": str(dtype), "batch": args.batch, "latent": latent,
        "rank": args.rank, "lora_layers": len(adapter) // 2, "inputs": args.inputs,
        "step": args.step if args.inputs == "prompts" else None,
        "paths": report.summary().get("paths"), "backends": report.summary().get("backends"),
        "sqnr_db": {"kernel_lora_vs_fake_lora": sqnr_db(fake_lora, kernel_lora),
                    "kernel_vs_fake": sqnr_db(fake_plain, kernel_before),
                    "lora_effect": sqnr_db(fake_lora, fake_plain),
                    "reference_stability": sqnr_db(fake_lora, out(fake, perturb_latent(x, args.stability))),
                    "fake_vs_16bit": sqnr_db(fp_lora, fake_lora)},
        "stability_relative": args.stability,
    }
    if compile_it:
        torch._dynamo.reset()
        result["sqnr_db"]["compiled_kernel_lora_vs_fake_lora"] = sqnr_db(fake_lora, out(torch.compile(kernel)))
    lora.unload_lora(kernel)
    result["unload_bit_identical"] = {"eager": bool(torch.equal(out(kernel), kernel_before))}
    if compiled_unload:
        torch._dynamo.reset()
        result["unload_bit_identical"]["compiled"] = bool(torch.equal(out(torch.compile(kernel)), compiled_before))
    return result


def _sixteen_bit(fake, out) -> torch.Tensor:
    """The output of ``fake`` with every layer switched to full precision (adapters stay), then the
    plan restored."""
    layers = quant_layers(fake)
    saved = {n: (m.w_bits, m.a_bits) for n, m in layers.items()}
    set_plan(layers, {}, {})
    try:
        return out(fake)
    finally:
        set_plan(layers, {n: b[0] for n, b in saved.items()}, {n: b[1] for n, b in saved.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,compose,sdxl", help="tiny / compose (the built-in models' UNets) and/or "
                                                                "sdxl (full size, random weights)")
    p.add_argument("--plans", default="w4a8,w8a8", help=f"comma list of {sorted(PLANS)}")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=None, help="latent size (default: the model's sample_size)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--relative-norm", type=float, default=0.05, help="||up @ down|| / ||W|| of every adapted layer")
    p.add_argument("--compile-models", default="tiny", help="models also measured under torch.compile (three "
                                                              "compilations each, one with --no-compiled-unload; the "
                                                              "full-size SDXL UNet's take minutes)")
    p.add_argument("--no-compiled-unload", action="store_true", help="compile once (kernels + LoRA), not three times")
    p.add_argument("--stability", type=float, default=1e-3, help="relative latent perturbation of the "
                                                                   "reference-stability probe")
    p.add_argument("--cpu-path", default="reference", choices=["reference", "emulate"])
    p.add_argument("--inputs", default="random", choices=["random", "prompts"],
                   help="denoiser inputs: random tensors (every model), or the built-in model's own pipeline on "
                        "captions (tiny/compose: calibration on 4x batch training captions at every sampler step "
                        "(conf/model/<model>.yaml's steps), measurement on batch held-out captions at --step)")
    p.add_argument("--step", type=int, default=0,
                   help="with --inputs prompts: the sampler step measured (0 = the first)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    results, errors = [], []
    for model in args.models.split(","):
        for plan in args.plans.split(","):
            try:
                r = run_one(model, plan, args, device, dtype)
                print(r, flush=True)
                results.append(r)
            except Exception as exc:  # one failing case must not lose the others
                traceback.print_exc()
                errors.append({"model": model, "plan": plan, "error": repr(exc)})
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # after every case: a run cut short by a time limit keeps what it measured
            write_json(args.out, {"env": env_info(), "device": str(device), "args": vars(args), "results": results,
                                  "errors": errors})


if __name__ == "__main__":
    main()
