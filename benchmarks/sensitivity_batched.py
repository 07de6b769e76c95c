"""Seconds per sensitivity evaluation against perturbations per batched generation (CPU or GPU).

Runs the sensitivity library's own sweep (``mixprec.sensitivity.run_tasks``) on a fixed slice of a
calibrated workspace's layers (the first ``--tasks`` content and quality weight tasks, so both
metrics count) once per ``--per-batch`` value, into throw-away record files, and writes per value:
wall seconds and process CPU seconds per (layer, bits) evaluation, the machine's 1-minute load
average before and after (other work on a shared machine stretches wall time, not CPU time), and
the largest difference of the metrics from the one-at-a-time values (``--per-batch`` must start at 1).

    python run.py model=compose stage=calibrate            # the workspace it reads
    OMP_NUM_THREADS=1 python benchmarks/sensitivity_batched.py --out docs/measurements/x.json \\
        --per-batch 1 8 16 -- model=compose prompts.sensitivity.n=1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["stage=sensitivity", "tracking=disabled", *overrides])


def largest_difference(a: dict, b: dict) -> dict:
    worst = {"content": 0.0, "quality_relative": 0.0}
    for key, rec in a.items():
        for bits, values in rec["values"].items():
            for x, y in zip(values, b[key]["values"][bits]):
                if rec["group"] == "content":
                    worst["content"] = max(worst["content"], abs(x - y))
                else:
                    worst["quality_relative"] = max(worst["quality_relative"], abs(x - y) / abs(x))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", type=int, default=4, help="content tasks and quality tasks (each) in the slice")
    ap.add_argument("--per-batch", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("overrides", nargs="*", help="run.py overrides (after --)")
    args = ap.parse_args()

    from mixprec import sensitivity as sens
    from mixprec.context import load_calibrated, prompt_set, workspace
    from mixprec.models import layer_group

    cfg = compose(args.overrides)
    bundle = load_calibrated(cfg, workspace(cfg), batch_size=int(cfg.stage.batch_size))
    pairs = prompt_set(cfg, "sensitivity")
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    groups = {n: layer_group(n, bundle.spec.content_patterns) for n in bundle.layers}
    tasks = sens.make_tasks(groups, list(cfg.quant.weight_bits), list(cfg.quant.act_bits), kinds=["w"])
    tasks = [t for t in tasks if t.group == "content"][:args.tasks] + [t for t in tasks if t.group == "quality"][:args.tasks]
    ref = sens.compute_reference(bundle.sampler, prompts, seeds, True, True)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "prompts": len(prompts), "tasks": [t.key for t in tasks], "evaluations": sum(len(t.bits) for t in tasks),
           "runs": []}
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, per_batch in enumerate(args.per_batch):
            load_before = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            records = sens.run_tasks(tasks, bundle.layers, bundle.sampler, ref, prompts, seeds,
                                     sens.RecordFile(Path(tmp) / f"{i}.jsonl"), progress=False,
                                     perturbations_per_batch=per_batch)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            first = first or records
            run = {"perturbations_per_batch": per_batch, "wall_s_per_eval": wall / out["evaluations"],
                   "cpu_s_per_eval": cpu / out["evaluations"], "load_1min_before": load_before,
                   "load_1min_after": os.getloadavg()[0], "largest_difference_from_first": largest_difference(first, records)}
            print(json.dumps(run), flush=True)
            out["runs"].append(run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
