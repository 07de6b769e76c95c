"""An offline W&B sweep: every stage run of a small pipeline in one group, and the report run's tables,
images, charts and artifacts, read back from the run files (WANDB_MODE=offline, no network)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixprec.report.wandb_views import read_offline_run
from mixprec.runner import run_stage


SMALL = ["model=tiny_random", "prompts.calibration.n=2", "prompts.sensitivity.n=2", "prompts.selection.n=3",
         "prompts.inference.n=3", "stage.sensitivity.progress=false", "stage.select.progress=false",
         "stage.allocate_weight.target=[4]", "stage.allocate_weight.K=[1,2]", "stage.allocate_weight.seed=[0,1]",
         "stage.allocate_act.target=[7]", "stage.allocate_act.K=[1]", "stage.allocate_act.seed=[0,1]",
         "stage.select.refine.evaluations=2"]
STAGES = ["calibrate", "sensitivity", "allocate_weight", "allocate_act", "select", "infer", "report"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from tests.conftest import compose
    out = tmp_path_factory.mktemp("wb")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    # keep wandb's artifact staging (table images) inside the test folder, not in ~/.local/share
    mp.setenv("WANDB_DATA_DIR", str(out / "wandb_data"))
    mp.setenv("WANDB_SILENT", "true")
    # no system-metrics sampler or console capture: they compete with the stages for the two CPU cores
    mp.setenv("WANDB__DISABLE_STATS", "true")
    mp.setenv("WANDB_CONSOLE", "off")
    try:
        run_stage(compose([f"paths.outputs={out}", "tracking=offline", "tracking.group=sweep-a", "device=cpu",
                           *SMALL]))
    finally:
        mp.undo()
    runs = [read_offline_run(d) for d in sorted((out / "wandb" / "wandb").glob("offline-run-*"))]
    return out, out / "tiny_random", runs


def test_every_stage_run_of_the_sweep_shares_its_group(sweep):
    _, _, runs = sweep
    assert sorted(r["job_type"] for r in runs) == sorted(STAGES)
    assert {r["group"] for r in runs} == {"sweep-a"} and {r["project"] for r in runs} == {"mixprec"}
    report = next(r for r in runs if r["job_type"] == "report")
    assert report["config"]["tracking"]["group"] == "sweep-a" and report["config"]["stage"]["name"] == "report"


def test_report_run_holds_the_tables_images_and_artifacts(sweep):
    _, ws, runs = sweep
    r = next(r for r in runs if r["job_type"] == "report")
    h = {k: v[-1] for k, v in r["history"].items()}
    tables = {k: v for k, v in h.items() if isinstance(v, dict) and v.get("_type") == "table-file"}
    n_plans = len(list(ws.glob("plans/*/seed*.yaml")))
    census = list(csv_rows(ws / "layers.csv"))
    blocks = {row["block"] for row in census}
    content = sum(row["group"] == "content" for row in census)
    assert tables["candidates"]["nrows"] == n_plans and tables["candidates"]["ncols"] == 14
    assert tables["census/by_block"]["nrows"] == len(blocks)
    assert tables["sensitivity/w_content"]["nrows"] == content
    assert tables["sensitivity/a_quality"]["nrows"] == len(census) - content
    assert tables["images/by_prompt"]["nrows"] == 3 and tables["images/by_variant"]["nrows"] == 5
    assert tables["allocation/by_block"]["nrows"] == 2 * len(blocks)
    # the native charts: scatter per kind and line series per sensitivity table, each backed by a table
    assert {"pareto/weight_table", "pareto/act_table", "sensitivity/w_content_by_depth_table"} <= set(tables)
    # the table files are in the run folder
    files = Path(r["dir"]) / "files"
    for key in ("candidates", "images/by_prompt", "sensitivity/w_quality"):
        t = json.loads((files / tables[key]["path"]).read_text())
        assert len(t["data"]) == tables[key]["nrows"]
    cand = json.loads((files / tables["candidates"]["path"]).read_text())
    assert cand["columns"][-1] == "images"
    # images as media: one list per variant, and the charts
    images = {k: v for k, v in h.items() if isinstance(v, dict) and v.get("_type", "").startswith("images")}
    assert {"images/full_precision", "images/mixed_w", "images/uniform_w4", "images/mixed_wa",
            "images/uniform_w4a7", "charts/pareto", "charts/sensitivity_w", "charts/allocation"} <= set(images)
    assert images["images/mixed_wa"]["count"] == 3
    assert len(r["images"]) >= 5 * 3 + 6 and all((files / p).stat().st_size > 0 for p in r["images"])
    # tables with image cells travel as run-table artifacts whose PNGs are staged for `wandb sync`
    art = {a["name"]: a for a in r["artifacts"]}
    cand_art = next(a for n, a in art.items() if n.endswith("-candidates"))
    pngs = {p: lp for p, lp in cand_art["files"].items() if p.endswith(".png")}
    assert pngs and all(Path(lp).exists() for lp in pngs.values())
    assert set(art["final_plans"]["files"]) == {"final_weight_mp.yaml", "final_act_mp.yaml"}
    assert set(art["report"]["files"]) == {"report.html"}
    # summary scalars for the dashboard's run comparison are the workspace's numbers
    weight = yaml.safe_load((ws / "final_weight_mp.yaml").read_text())["header"]
    assert r["summary"]["final/weight_mib"] == pytest.approx(weight["mib"])
    assert r["summary"]["pareto/weight_candidates"] == sum(1 for _ in ws.glob("plans/weight_*/seed*.yaml"))
    manifest = json.loads((ws / "report" / "images.json").read_text())
    psnr = {v["key"]: v["scores"]["psnr_db"] for v in manifest["variants"][1:]}
    assert r["summary"]["images/uniform_w4_psnr_db"] == pytest.approx(psnr["uniform_w4"])


def test_offline_runs_are_ready_for_wandb_sync(sweep):
    out, _, runs = sweep
    wandb_cli = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    dirs = [r["dir"] for r in runs]
    res = subprocess.run([wandb_cli, "sync", "--dry-run", *dirs], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Would sync {len(runs)} run(s)" in res.stdout + res.stderr


def csv_rows(path):
    import csv
    with open(path, newline="") as f:
        yield from csv.DictReader(f)
