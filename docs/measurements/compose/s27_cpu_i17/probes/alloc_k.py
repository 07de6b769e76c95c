import sys
from collections import Counter
from mixprec import artifacts
from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget
from mixprec.workspace import Workspace
ws = Workspace(sys.argv[1]); target = float(sys.argv[2])
census = artifacts.read_census(ws); pp = artifacts.read_per_prompt(ws)
groups = {c.name: c.group for c in census}
bits = {"content": [2, 4, 8], "quality": [4, 8]}
for cm in ("ssim", "ssim_db"):
    for K in (1, 4, 16, 64, 256, 1024):
        r = AllocationRequest(kind="weight", budget=Budget(target), K=K, bits=bits, program="joint", content_metric=cm)
        plan, sol = allocate(r, census, pp["weight"])
        c = {g: dict(sorted(Counter(plan.bits[l] for l in plan.bits if groups[l] == g).items())) for g in ("content", "quality")}
        print(cm, K, c, flush=True)
