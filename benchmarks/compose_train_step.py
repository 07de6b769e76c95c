"""Seconds per training step of the compose model's denoiser phase (UNet + both text encoders:
forward under bf16 autocast, backward, clipping, AdamW, EMA) for each launch path
(`ComposeTrainConfig.accelerate`) and batch size, measured through the trainer itself on random
latents, written as JSON (milliseconds per single synchronised step: median, p10-p90, spread).

    python benchmarks/compose_train_step.py --out step_time.json [--modes none,cuda_graph,compile] [--batches 256,1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mixprec.compose import scenes
from mixprec.compose.train import ComposeTrainConfig, _DenoiserTrainer, _EMA, _Run
from mixprec.kernels.timing import env_info, summarize


def measure(mode: str, batch: int, steps: int, device: torch.device, work: Path) -> dict:
    cfg = ComposeTrainConfig(unet_batch_size=batch, accelerate=mode, eval_prompts=0)
    run = _Run(cfg, device, work / f"{mode}_{batch}.pt")
    run.phase = "unet"
    run.ema = _EMA(run.modules, cfg.ema_decay)
    captions = [c for c, _ in scenes.eval_prompts(4096, "train", seed=1)]
    latents = torch.randn(len(captions), 4, 32, 32, device=device)
    trainer = _DenoiserTrainer(run, latents, captions)
    for m in run.modules.values():
        m.train()
    times, first = [], None
    for i in range(steps + 5):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        trainer.step()
        torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= 5:  # warm-up steps, the capture (cuda_graph) and the compile (compile) excluded
            times.append(dt)
    return {"mode": mode, "batch": batch, "first_step_s": first, **summarize([1000 * t for t in times]),
            "samples_per_s": batch / statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="none,cuda_graph,compile")
    ap.add_argument("--batches", default="256,1024")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default="/tmp/compose_step_bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {**env_info(), "steps": args.steps, "runs": []}
    for mode in args.modes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                row = measure(mode, batch, args.steps, device, work)
            except Exception as e:  # a launch path that fails is a result too
                row = {"mode": mode, "batch": batch, "error": f"{type(e).__name__}: {e}"[:2000]}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
