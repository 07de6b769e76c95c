"""Session-27 CPU probes on the compose model (W4A8 unless T is set): held-out (or selection) scores of
hand-made and allocated weight plans, activations uniform A8 with the workspace's protected layers.

    PYTHONPATH=. python docs/measurements/compose/s27_cpu_i17/probes/plans_probe.py WORKSPACE N [overrides]

WORKSPACE: a calibrated compose workspace with the default recipe's sensitivity (a copy of outputs/ws_default);
N: prompts of the set. Environment (each adds plans; all of them may be combined):
  HAND=1                      uniform 4, content 8 / quality 4, content 4 / quality 8, content 3 / quality 4, ...
  FILL=10,20,30               the N quality layers of lowest 4-bit SQNR at 8 bits, the content layers of highest
                              2-bit SSIM at 2 bits until the bytes fit the uniform plan's
  SPECS="prog,K,content_metric,quality_metric,content widths;..."   e.g. joint,2,ssim,noise_power,2/4/8
  ALLOC_ONLY=1                print the allocated plans' widths, generate nothing
  SET=selection               score on the selection prompts (prompts.selection.n=N) instead of the evaluation set
The logs beside this file are its output (the earlier runs used one script per family: same code paths).
"""
import os
import sys
import time
from collections import Counter

from hydra import compose, initialize_config_dir

from mixprec import artifacts, search
from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget
from mixprec.calibration import extend_params
from mixprec.context import load_calibrated, prompt_set, run_settings, workspace
from mixprec.quantizers import set_plan
from mixprec.selection import generate_and_score

ws_dir, n = sys.argv[1], int(sys.argv[2])
which = os.environ.get("SET", "evaluation")
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base=None):
    cfg = compose("config", overrides=["model=compose", "tracking=disabled", f"paths.workspace={ws_dir}",
                                       f"prompts.{which}.n={n}", "threads=1"] + sys.argv[3:])
ws = workspace(cfg)
census, prot = artifacts.read_census(ws), artifacts.read_protected(ws)
names, grp = [c.name for c in census], {c.name: c.group for c in census}
sizes = search.LayerSizes.of(census)
pp = artifacts.read_per_prompt(ws)["weight"]
quality = search.bootstrap_metric(pp["quality"], 0, 100)
content = search.bootstrap_metric(pp["content"], 0, 100)
worst_quality = sorted(quality, key=lambda l: quality[l][4])
calm_content = sorted(content, key=lambda l: -content[l][2])  # least sensitive at 2 bits first


def plan(content_bits, quality_bits, top8=0):
    p = {l: (content_bits if grp[l] == "content" else quality_bits) for l in names}
    p.update({l: 8 for l in worst_quality[:top8]})
    return p


def widths(p):
    return {g: dict(sorted(Counter(p[l] for l in p if grp[l] == g).items())) for g in ("content", "quality")}


plans = {"uniform4": plan(4, 4)}
budget = sizes.plan_bytes("weight", plans["uniform4"])
if os.environ.get("HAND"):
    plans.update({"content8_quality4": plan(8, 4), "content4_quality8": plan(4, 8), "c4_q4_worst20q@8": plan(4, 4, 20),
                  "c4_q4_worst60q@8": plan(4, 4, 60), "c3_q4": plan(3, 4), "c4_q3": plan(4, 3), "c4_q5": plan(4, 5),
                  "c5_q4": plan(5, 4)})
for top in [int(x) for x in os.environ.get("FILL", "").split(",") if x]:
    p = plan(4, 4, top)
    for layer in calm_content:
        if sizes.plan_bytes("weight", p) <= budget:
            break
        p[layer] = 2
    plans[f"q worst{top}@8 + content@2 fill"] = p
for spec in [x for x in os.environ.get("SPECS", "").split(";") if x]:
    prog, K, cm, qm, cb = spec.split(",")
    request = AllocationRequest(kind="weight", budget=Budget(float(os.environ.get("T", "4"))), K=float(K),
                                bits={"content": [int(b) for b in cb.split("/")], "quality": [4, 8]}, program=prog,
                                tolerance=0.04, content_metric=cm, quality_metric=qm)
    plans[spec] = allocate(request, census, pp)[0].bits
for name, p in plans.items():
    print(name, widths(p), flush=True)
if os.environ.get("ALLOC_ONLY"):
    sys.exit()
b = load_calibrated(run_settings(cfg), ws, batch_size=16)
extend_params(b.layers, [2, 3, 4, 5, 6, 8], [8], weight_clip=b.quant.weight_clip)
pairs = prompt_set(run_settings(cfg), which)
prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
ref = b.sampler.generate(prompts, seeds).images
act = search.uniform_plan(names, 8, prot)
for name, p in plans.items():
    t = time.time()
    r = generate_and_score(b.sampler, b.layers, prompts, seeds, ref, b.spec.checker, p, act).scores
    set_plan(b.layers)
    print(f"{name:34s} bytes {sizes.plan_bytes('weight', p) / budget:.4f} adh {r['adherence']:.3f} ssim {r['ssim']:.4f} "
          f"psnr {r['psnr_db']:.2f} mse {r['mse']:.5f} ({time.time() - t:.0f}s)", flush=True)
