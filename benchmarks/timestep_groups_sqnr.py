"""Does timestep-aware activation quantization help? SQNR of the denoiser output over all sampler
steps against full precision, with every layer's input activations quantized (weights in full
precision), one range per layer (G=1) vs one per step group (G>1).

    python benchmarks/timestep_groups_sqnr.py --model tiny_sdxl_multistep_random --groups 1 4
    python benchmarks/timestep_groups_sqnr.py --model tiny --groups 1 2 4 8

Calibration and evaluation use disjoint prompt sets (the model's prompts config: calibration vs
evaluation seeds), so the number is not measured on the prompts that set the ranges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.metrics import sqnr_db_per_sample
from mixprec.models import ModelSpec, denoiser_of, load_pipeline
from mixprec.prompts import resolve_prompt_set
from mixprec.quantizers import quantize_, set_plan
from mixprec.timestep_groups import StepGroups, remove

CONF = Path(__file__).resolve().parents[1] / "conf"


def measure(model: str, groups: list[int], act_bits: list[int], calib_n: int, eval_n: int) -> dict:
    spec = ModelSpec.from_dict(yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text()))
    pipe = load_pipeline(spec)
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, spec.resolution, spec.num_inference_steps, spec.guidance_scale, batch_size=8)
    calib = resolve_prompt_set({"split": "train", "n": calib_n, "seed": 1})
    held = resolve_prompt_set({"split": "heldout", "n": eval_n, "seed": 3})
    prompts, seeds = [p for p, _ in held], [s for _, s in held]
    set_plan(layers)
    ref = sampler.generate(prompts, seeds, decode=False, capture_denoiser=True).denoiser
    out: dict = {"model": model, "steps": spec.num_inference_steps, "timesteps": sampler.timesteps(),
                 "guidance_scale": spec.guidance_scale, "sqnr_db": {}}
    for g in groups:
        remove(denoiser_of(pipe))
        for layer in layers.values():
            layer.step_groups = None
        step_groups = None
        if g > 1:
            step_groups = StepGroups(sampler.timesteps(), g)
            step_groups.install(denoiser_of(pipe), layers.values())
        calibrate_layers(layers, lambda: sampler.generate([p for p, _ in calib], [s for _, s in calib], decode=False),
                         weight_bits=[8], act_bits=act_bits, step_groups=step_groups)
        for b in act_bits:
            set_plan(layers, act_bits={n: b for n in layers})
            den = sampler.generate(prompts, seeds, decode=False, capture_denoiser=True).denoiser
            per_step = [float(sqnr_db_per_sample(ref[:, i], den[:, i]).mean()) for i in range(ref.shape[1])]
            out["sqnr_db"][f"G{g}_A{b}"] = {"all_steps": float(sqnr_db_per_sample(ref, den).mean()),
                                            "per_step": per_step}
            set_plan(layers)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_sdxl_multistep_random")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--act-bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--calib-n", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.model, args.groups, args.act_bits, args.calib_n, args.eval_n), indent=1))


if __name__ == "__main__":
    main()
