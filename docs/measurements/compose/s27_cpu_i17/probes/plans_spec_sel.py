"""Diagnostic: held-out adherence of hand-made weight plans on the compose model (W?A8), 1 seed set."""
import sys, time, statistics
from hydra import compose, initialize_config_dir
from mixprec import artifacts, search
from mixprec.context import load_calibrated, prompt_set, workspace, run_settings
from mixprec.calibration import extend_params
from mixprec.selection import generate_and_score
from mixprec.quantizers import set_plan
import os
ws_dir = sys.argv[1]; n = int(sys.argv[2])
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base=None):
    cfg = compose("config", overrides=["model=compose", "tracking=disabled", f"paths.workspace={ws_dir}",
                                       f"prompts.evaluation.n={n}", "threads=1"] + sys.argv[3:])
ws = workspace(cfg); run = run_settings(cfg)
b = load_calibrated(run, ws, batch_size=16)
extend_params(b.layers, [2, 3, 4, 5, 6, 8], [8], weight_clip=b.quant.weight_clip)
census = artifacts.read_census(ws); prot = artifacts.read_protected(ws)
names = [c.name for c in census]; grp = {c.name: c.group for c in census}
sizes = search.LayerSizes.of(census)
ev = prompt_set(run, os.environ.get("SET", "evaluation")); P = [p for p, _ in ev]; S = [s for _, s in ev]
ref = b.sampler.generate(P, S).images
act = search.uniform_plan(names, 8, prot)
q = {l: v for l, v in search.bootstrap_metric(artifacts.read_per_prompt(ws)["weight"]["quality"], 0, 100).items()}
worst = sorted(q, key=lambda l: q[l][4])
def plan(content, quality, top8=0):
    p = {l: (content if grp[l] == "content" else quality) for l in names}
    for l in worst[:top8]: p[l] = 8
    return p
from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget
from collections import Counter
pp = artifacts.read_per_prompt(ws)["weight"]
plans = {"uniform4": plan(4, 4)}
for K in []:# [float(k) for k in os.environ.get("KS", "0.5,0.75").split(",")]:
    r = AllocationRequest(kind="weight", budget=Budget(4.0), K=K, bits={"content": [2, 4, 8], "quality": [4, 8]},
                          program="split", tolerance=0.04)
    p, _ = allocate(r, census, pp)
    plans[f"split K={K}"] = p.bits
    print(K, {g: dict(sorted(Counter(p.bits[l] for l in p.bits if grp[l] == g).items())) for g in ("content", "quality")}, flush=True)
for spec in os.environ["SPECS"].split(";"):
    prog, K, cm, qm, cb = spec.split(",")
    r = AllocationRequest(kind="weight", budget=Budget(float(os.environ.get("T", "4"))), K=float(K), bits={"content": [int(x) for x in cb.split("/")], "quality": [4, 8]},
                          program=prog, tolerance=0.04, content_metric=cm, quality_metric=qm)
    p, _ = allocate(r, census, pp)
    plans[spec] = p.bits
    print(spec, {g: dict(sorted(Counter(p.bits[l] for l in p.bits if grp[l] == g).items())) for g in ("content", "quality")}, flush=True)
base = sizes.plan_bytes("weight", plans["uniform4"])
for name, p in list(plans.items())[int(os.environ.get("SKIP", "0")):]:
    t = time.time()
    r = generate_and_score(b.sampler, b.layers, P, S, ref, b.spec.checker, p, act).scores
    set_plan(b.layers)
    print(f"{name:34s} bytes {sizes.plan_bytes('weight', p)/base:.4f} adh {r['adherence']:.3f} ssim {r['ssim']:.4f} psnr {r['psnr_db']:.2f} mse {r['mse']:.5f} per-image adh {r.get('adherence_per_image', r.get('adherence_detail'))}", flush=True)
