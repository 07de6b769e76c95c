"""Sharded sensitivity on a multi-GPU host against one GPU: same files, wall-time speedup, seconds per eval.

For the full-size SDXL-Turbo architecture (random weights, 512x512, one step, 32 prompts) by default:
  1. ``stage=calibrate`` once (every layer), copied to a second workspace;
  2. ``benchmarks/sensitivity_profile.py`` on GPU 0: where one evaluation's time goes; its
     seconds per evaluation size the slice (``--work-s`` of single-GPU evaluation work);
  3. the slice (the first layers of ``down_blocks.1`` in module order: content and quality
     layers, weights at 2/4/8 and activations at 4/8) with ``stage=sensitivity`` on GPU 0;
  4. the same slice through ``sweeps/sensitivity_local.yaml`` (submitit local launcher, one job
     and one GPU per shard, ``--shards`` of them), GPU use sampled with nvidia-smi;
  5. the merged files compared byte for byte, and the times.
Workspaces live under ``--work``; ``--out`` gets at most 6 files (summary.json, profile.json,
profile.profiler.txt, gpu_use.csv, log.txt).

    python benchmarks/sensitivity_scale_out.py --out $OUT --shards 2 --work-s 90
    python benchmarks/sensitivity_scale_out.py --out /tmp/o --tiny     # the same steps on CPU, tiny_random
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import hashlib
import subprocess
import sys
import tarfile

import torch
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [f"sensitivity_{k}_{g}.yaml" for k in ("w", "a") for g in ("content", "quality")] + [
    "sensitivity_per_prompt.csv", "protected_layers.yaml"]
PROMPTS = ["~prompts.sensitivity", "+prompts.sensitivity={file:sweeps/prompts/sdxl32.txt,seed:1000}"]
SDXL = ["model=sdxl_turbo", "model.weights=random", "model.dtype=bfloat16", "prompts=coco", *PROMPTS,
        "tracking=disabled"]
TINY = ["model=tiny_random", "device=cpu", "prompts.sensitivity.n=2", "tracking=disabled"]


class Runner:
    def __init__(self, work: Path, log: Path):
        self.work, self.log = work, log

    def __call__(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
        start = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = 124, (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        wall = time.perf_counter() - start
        with open(self.log, "a") as f:
            f.write(f"\n===== {name}: rc={rc} wall={wall:.1f}s\n$ {' '.join(cmd)}\n")
            f.write("\n".join(l for l in text.splitlines() if "truncated because CLIP" not in l)[-20000:] + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={rc} in {wall:.1f} s", flush=True)
        return {"rc": rc, "wall_s": wall}


def read_records(ws: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((ws / "sensitivity").glob("shard*of*.jsonl")):
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            out[f"{rec['kind']}:{rec['layer']}"] = rec
    return out


def per_eval(records) -> dict:
    """Seconds per evaluation (one layer, one bit) by group and kind, measured by the stage."""
    acc: dict[str, list[float]] = {}
    for rec in records:
        for key in (rec["group"], f"{rec['group']}_{rec['kind']}"):
            acc.setdefault(key, []).append(rec["seconds"] / len(rec["values"]))
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def choose_slice(layers_csv: Path, sec: dict[str, float], work_s: float, prefix: str,
                 n_min: int = 8) -> tuple[list[str], float, dict[str, int]]:
    """The first layers from ``prefix`` on (module order) whose estimated evaluation time reaches ``work_s``."""
    rows = [r for r in csv.DictReader(open(layers_csv)) if r.get("excluded", "False") != "True"]
    start = next(i for i, r in enumerate(rows) if r["name"].startswith(prefix))
    chosen, cost, groups = [], 0.0, {"content": 0, "quality": 0}
    for r in rows[start:]:
        chosen.append(r["name"])
        groups[r["group"]] += 1
        cost += 5 * sec[r["group"]]  # weights at 2/4/8, activations at 4/8
        if cost >= work_s and len(chosen) >= n_min:
            break
    return chosen, cost, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "scale_out_out"))
    ap.add_argument("--work", default="/tmp/mixprec_scale_out")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--work-s", type=float, default=90.0, help="single-GPU evaluation seconds of the slice")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prefix", default="down_blocks.1.", help="the slice starts at the first layer named so")
    ap.add_argument("--tiny", action="store_true", help="tiny_random on CPU (a rehearsal of the device run)")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions of each profiled part")
    ap.add_argument("--sec", default="", help="seconds per content,quality evaluation that size the slice "
                                              "when the profile is skipped, e.g. 0.39,0.17")
    ap.add_argument("--phase", choices=("both", "single", "sharded"), default="both",
                    help="run both halves in one process, or in two calls (a device call has a time limit): "
                         "'single' leaves single.tar.gz in --out; 'sharded' takes it back with --handoff")
    ap.add_argument("--handoff", default="", help="single.tar.gz of an earlier --phase single")
    args = ap.parse_args()
    if args.phase == "sharded":
        return sharded_phase(args)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = Runner(work, out / "log.txt")
    base = TINY if args.tiny else SDXL
    py = sys.executable
    ws1, ws2 = work / "ws_1gpu", work / f"ws_{args.shards}gpu"
    summary: dict = {"base_overrides": base, "shards": args.shards, "batch_size": args.batch_size}
    t0 = time.perf_counter()

    def done(**kw):
        summary.update(kw)
        summary["total_s"] = time.perf_counter() - t0
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "no nvidia-smi"
    info = subprocess.run([py, "-c", "import torch, diffusers; print(torch.__version__, torch.version.cuda, "
                                     "diffusers.__version__)"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    summary.update(gpus=smi.splitlines(), torch_cuda_diffusers=info)
    print(smi, "\n", info, flush=True)

    # CPU float results depend on the thread count: the rehearsal runs every process on one thread.
    gpu0 = {"OMP_NUM_THREADS": "1"} if args.tiny else {"CUDA_VISIBLE_DEVICES": "0"}
    cal = run("calibrate", [py, "run.py", "stage=calibrate", f"paths.workspace={ws1}", *base], 300, gpu0)
    summary["calibrate"] = cal
    if cal["rc"] != 0:
        return done(error="calibrate failed (log.txt)")
    ws2.mkdir()
    for name in ("quant_params.safetensors", "layers.csv", "calibrate.json"):
        shutil.copy(ws1 / name, ws2 / name)

    sens = ["stage=sensitivity", f"stage.batch_size={args.batch_size}", "stage.progress=false", *base]
    sec = None
    if not args.skip_profile:
        prof = run("profile", [py, "benchmarks/sensitivity_profile.py", "--out", str(out / "profile.json"), "--reps",
                               str(args.reps), "--", f"paths.workspace={ws1}", *sens], 300, gpu0)
        summary["profile_run"] = prof
        if prof["rc"] == 0:
            p = json.loads((out / "profile.json").read_text())
            sec = p["seconds_per_eval"]
            summary["profile"] = {k: p[k] for k in ("load_model_and_calibration_s", "reference_s", "seconds_per_eval",
                                                    "projected_full_sweep_s", "projected_full_sweep_s_bf16_vae",
                                                    "content_eval_breakdown_s", "peak_gpu_mem_gib", "layers")}
    if sec is None and args.sec:
        sec = dict(zip(("content", "quality"), map(float, args.sec.split(","))))
    if sec is None:
        sec = {"content": 1.0, "quality": 0.3}  # only sizes the slice when the profile is missing
    layers, est, groups = choose_slice(ws1 / "layers.csv", sec, args.work_s, args.prefix)
    slice_arg = "stage.layers=[" + ",".join(layers) + "]"
    summary["slice"] = {"layers": len(layers), "by_group": groups, "first": layers[0], "last": layers[-1],
                        "estimated_single_gpu_eval_s": est}
    done()

    one = run("sensitivity_1gpu", [py, "run.py", *sens, f"paths.workspace={ws1}", slice_arg], 560, gpu0)
    summary["single_gpu"] = one
    summary["slice_arg"] = slice_arg
    summary["quant_params_sha256"] = sha256(ws1 / "quant_params.safetensors")
    done()
    if one["rc"] != 0:
        return done(error="single-GPU sensitivity failed (log.txt)")
    if args.phase == "single":
        # what the sharded half compares against, small enough to come back from a device call
        with tarfile.open(out / "single.tar.gz", "w:gz") as tar:
            for p in sorted(ws1.rglob("*")):
                if p.is_file() and p.name != "quant_params.safetensors" and not p.name.endswith(".png"):
                    tar.add(p, arcname=str(p.relative_to(ws1)))
            tar.add(out / "summary.json", arcname="bench_summary.json")
        return
    sharded(args, summary, run, base, sens, ws1, ws2, work, out, one, slice_arg, done)


def sha256(path: Path) -> str:
    """Digest of a safetensors file's content: its header's metadata order varies between processes."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            h.update(key.encode())
            h.update(f.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sharded_phase(args) -> None:
    """The sharded half in a fresh process: the single-GPU results come from --handoff; the
    calibration is recomputed (or reused from --work) and must hash equal to the single run's."""
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(work, out / "log.txt")
    base = TINY if args.tiny else SDXL
    py = sys.executable
    ws1, ws2 = work / "ws_1gpu", work / f"ws_{args.shards}gpu"
    prev = None
    if args.handoff:
        shutil.rmtree(ws1, ignore_errors=True)
        ws1.mkdir(parents=True)
        with tarfile.open(args.handoff) as tar:
            tar.extractall(ws1, filter="data")
        prev = json.loads((ws1 / "bench_summary.json").read_text())
    elif (out / "summary.json").exists():
        prev = json.loads((out / "summary.json").read_text())
    if prev is None or "slice_arg" not in prev:
        raise SystemExit("--phase sharded needs the summary of a --phase single run (--handoff single.tar.gz)")
    summary = dict(prev)
    t0 = time.perf_counter()

    def done(**kw):
        summary.update(kw)
        summary["sharded_phase_total_s"] = time.perf_counter() - t0
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    gpu0 = {"OMP_NUM_THREADS": "1"} if args.tiny else {"CUDA_VISIBLE_DEVICES": "0"}
    shutil.rmtree(ws2, ignore_errors=True)
    cal_ws = work / "ws_calibration"
    if not (cal_ws / "quant_params.safetensors").exists():
        cal = run("calibrate_again", [py, "run.py", "stage=calibrate", f"paths.workspace={cal_ws}", *base], 300, gpu0)
        if cal["rc"] != 0:
            return done(error="calibrate failed (log.txt)")
    ws2.mkdir(parents=True)
    for name in ("quant_params.safetensors", "layers.csv", "calibrate.json"):
        shutil.copy(cal_ws / name, ws2 / name)
    same_calibration = sha256(ws2 / "quant_params.safetensors") == prev["quant_params_sha256"]
    summary["calibration_identical_to_single_run"] = same_calibration
    if not same_calibration:
        return done(error="the recomputed calibration differs from the single-GPU run's: not comparable")
    sens = ["stage=sensitivity", f"stage.batch_size={args.batch_size}", "stage.progress=false", *base]
    one = prev["single_gpu"]
    sharded(args, summary, run, base, sens, ws1, ws2, work, out, one, prev["slice_arg"], done)


def sharded(args, summary, run, base, sens, ws1, ws2, work, out, one, slice_arg, done) -> None:
    py = sys.executable

    smi_log = out / "gpu_use.csv"
    sampler = None
    if not args.tiny:
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                                    "--format=csv,noheader", "-lms", "1000"], stdout=open(smi_log, "w"),
                                   stderr=subprocess.DEVNULL)
    sweep_dir = work / "multirun"
    extra = ["hydra.launcher.cpus_per_task=1"] if args.tiny else []
    many = run("sensitivity_sharded", [py, "run.py", "-cd", "sweeps", "-cn", "sensitivity_local", *sens,
                                       f"paths.workspace={ws2}", slice_arg, f"stage.num_shards={args.shards}",
                                       f"stage.shard=range({args.shards})", f"hydra.sweep.dir={sweep_dir}", *extra],
               400, {"CUDA_VISIBLE_DEVICES": None})
    if sampler is not None:
        sampler.terminate()
    summary["sharded"] = many
    with open(out / "log.txt", "a") as f:
        for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")):
            f.write(f"\n===== {p.relative_to(work)}\n")
            f.write("\n".join(l for l in p.read_text(errors="replace").splitlines()
                              if "truncated because CLIP" not in l)[-6000:] + "\n")
    if many["rc"] != 0:
        return done(error="sharded sweep failed (log.txt)")

    same = {name: (ws1 / name).read_bytes() == (ws2 / name).read_bytes() for name in OUTPUTS}
    r1, r2 = read_records(ws1), read_records(ws2)
    same_values = r1.keys() == r2.keys() and all(r1[k]["values"] == r2[k]["values"] for k in r1)
    head1 = json.loads((ws1 / "sensitivity.json").read_text())
    head2 = json.loads((ws2 / "sensitivity.json").read_text())
    shard_runs = [json.loads((ws2 / "sensitivity" / f"run_shard{i}of{args.shards}.json").read_text())
                  for i in range(args.shards)]
    shard_eval = []
    for i in range(args.shards):
        recs = [json.loads(l) for l in (ws2 / "sensitivity" / f"shard{i}of{args.shards}.jsonl").read_text().splitlines()]
        shard_eval.append(sum(r["seconds"] for r in recs))
    eval1 = sum(r["seconds"] for r in r1.values())
    speed = {
        "end_to_end": one["wall_s"] / many["wall_s"],
        "stage": head1["wall_time_s"] / max(r["wall_time_s"] for r in shard_runs),
        "evaluations": eval1 / max(shard_eval),
    }
    gpu_use = {}
    if smi_log.exists():
        for row in csv.reader(open(smi_log)):
            if len(row) >= 4:
                g = gpu_use.setdefault(row[1].strip(), {"max_util_pct": 0, "max_mem_mib": 0, "busy_samples": 0})
                util, mem = int(row[2].split()[0]), int(row[3].split()[0])
                g["max_util_pct"] = max(g["max_util_pct"], util)
                g["max_mem_mib"] = max(g["max_mem_mib"], mem)
                g["busy_samples"] += util > 50
    done(files_identical=same, all_identical=all(same.values()), record_values_identical=same_values,
         tasks=len(r1), evals=sum(len(r["values"]) for r in r1.values()),
         single_gpu_wall_s=one["wall_s"], sharded_wall_s=many["wall_s"],
         single_gpu_stage_s=head1["wall_time_s"], shard_stage_s=[r["wall_time_s"] for r in shard_runs],
         single_gpu_eval_s=eval1, shard_eval_s=shard_eval, speedup=speed,
         speedup_goal=0.85 * args.shards, seconds_per_eval_measured=per_eval(r1.values()),
         stage_headline_single={k: head1["headline"].get(k) for k in ("seconds_per_eval", "evals",
                                                                      "projected_sweep_s", "tasks")},
         stage_headline_sharded={k: head2["headline"].get(k) for k in ("seconds_per_eval", "projected_sweep_s")},
         sweep_record=json.loads((ws2 / "sensitivity_sweep.json").read_text()).get("merged_by"),
         gpu_use_during_sweep=gpu_use)
    s = summary
    print("\n| | 1 GPU | %d GPUs | speedup |" % args.shards)
    print("|---|---|---|---|")
    print(f"| process wall (s) | {s['single_gpu_wall_s']:.1f} | {s['sharded_wall_s']:.1f} | {speed['end_to_end']:.2f} |")
    print(f"| stage wall (s) | {s['single_gpu_stage_s']:.1f} | {max(s['shard_stage_s']):.1f} | {speed['stage']:.2f} |")
    print(f"| evaluation s | {eval1:.1f} | {max(shard_eval):.1f} | {speed['evaluations']:.2f} |")
    print(f"files identical: {s['all_identical']} {same}; record values identical: {same_values}")
    print("seconds per eval:", json.dumps(s["seconds_per_eval_measured"]))
    print("stage projection (all layers):", json.dumps(s["stage_headline_single"]))


if __name__ == "__main__":
    main()
