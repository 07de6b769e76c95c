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
ev = prompt_set(run, "evaluation"); P = [p for p, _ in ev]; S = [s for _, s in ev]
ref = b.sampler.generate(P, S).images
act = search.uniform_plan(names, 8, prot)
q = {l: v for l, v in search.bootstrap_metric(artifacts.read_per_prompt(ws)["weight"]["quality"], 0, 100).items()}
worst = sorted(q, key=lambda l: q[l][4])
def plan(content, quality, top8=0):
    p = {l: (content if grp[l] == "content" else quality) for l in names}
    for l in worst[:top8]: p[l] = 8
    return p
plans = {"uniform4": plan(4, 4), "content8_quality4": plan(8, 4), "content4_quality8": plan(4, 8),
         "c4_q4_worst20q@8": plan(4, 4, 20), "c4_q4_worst60q@8": plan(4, 4, 60), "c3_q4": plan(3, 4), "c4_q3": plan(4, 3),
         "c4_q5": plan(4, 5), "c5_q4": plan(5, 4)}
base = sizes.plan_bytes("weight", plans["uniform4"])
for name, p in plans.items():
    t = time.time()
    r = generate_and_score(b.sampler, b.layers, P, S, ref, b.spec.checker, p, act).scores
    set_plan(b.layers)
    print(f"{name:22s} bytes {sizes.plan_bytes('weight', p)/base:.3f} adh {r['adherence']:.3f} ssim {r['ssim']:.4f} psnr {r['psnr_db']:.2f} ({time.time()-t:.0f}s)", flush=True)
