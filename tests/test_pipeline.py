"""The whole pipeline on tiny_random: artifacts, skipping, deterministic selection, clear errors."""

import json
import shutil

import pytest
import yaml

from mixprec.runner import run_stage
from mixprec.workspace import FingerprintMismatchError, MissingArtifactError

from tests.conftest import PIPELINE_PROMPTS as PROMPTS
from tests.conftest import PIPELINE_SMALL as SMALL


@pytest.fixture(scope="module")
def pipeline_run(pipeline_copy):
    return pipeline_copy


def test_pipeline_leaves_final_plans_images_and_metrics(pipeline_run):
    out, head = pipeline_run
    ws = out / "tiny_random"
    assert set(head["stages"].values()) == {"ran"}
    weight = yaml.safe_load((ws / "final_weight_mp.yaml").read_text())
    act = yaml.safe_load((ws / "final_act_mp.yaml").read_text())
    assert weight["header"]["kind"] == "weight" and weight["header"]["target"] == 4.0
    assert weight["header"]["achieved_mean_bits"]["overall"] <= 4.0 + 1e-9
    assert set(weight["bits"].values()) <= {2, 4, 8}
    protected = yaml.safe_load((ws / "protected_layers.yaml").read_text())
    assert all(act["bits"][name] == 16 for name in protected)
    images = sorted((ws / "generated_images").glob("*.png"))
    assert len(images) == 4 and "_seed" in images[0].name
    from PIL import Image
    assert Image.open(images[0]).text["prompt"].startswith("a ")
    infer = json.loads((ws / "infer.json").read_text())["headline"]
    assert 10 < infer["psnr_db"] < 80 and 0 < infer["ssim"] <= 1
    assert infer["weights"]["compression"] > 2.5  # ~4-bit weights with fp16 scales against fp16
    applied = infer["applied_bits"]
    assert all(applied[n]["w"] == b for n, b in weight["bits"].items())
    assert all(applied[n]["a"] is None for n in protected)
    changes = infer["adherence_changes"]
    assert len(changes["full_precision"]) == len(changes["plan"]) == 4
    assert infer["adherence"] - infer["adherence_full_precision"] == pytest.approx(
        (len(changes["fixed"]) - len(changes["broke"])) / 4)
    assert all(changes["full_precision"][c["index"]] and not changes["plan"][c["index"]] for c in changes["broke"])
    import csv
    with open(ws / "select_candidates.csv") as f:
        rows = list(csv.DictReader(f))
    from mixprec.selection import sort_key

    def key(row):  # the default ranking (stage.metric=ssim: mean SSIM, then mean MSE)
        return sort_key({k: float(row[k]) for k in ("ssim", "mse")}, "ssim")
    for kind in ("weight", "act"):
        paths = [r["path"] for r in rows if r["kind"] == kind]
        # program both: K 1,2 x seeds 0,1 of the joint program and of the split one (plans/<kind>_<t>_<K>_split/),
        # the guard's uniform plan, and the refined plan when refinement improved the winner
        plans = [p for p in paths if p.startswith("plans/") and not p.endswith("+refined")]
        assert len(plans) == 8 and len([p for p in plans if "_split/" in p]) == 4
        assert f"uniform/{kind}_{4 if kind == 'weight' else 7}" in paths
        kind_rows = [r for r in rows if r["kind"] == kind]
        # the guard and both programs: the final plan is never worse than uniform or the split plans on selection
        assert all(key(kind_rows[0]) <= key(r) for r in kind_rows)
        assert [key(r) for r in kind_rows] == sorted(key(r) for r in kind_rows)
    assert weight["header"]["selected_from"] == rows[0]["path"].removesuffix("+refined")
    assert weight["header"]["refined"] == rows[0]["path"].endswith("+refined")
    select = json.loads((ws / "select.json").read_text())["headline"]
    assert select["cost"]["weight"]["selection"]["evaluations"] >= 2
    assert select["cost"]["weight"]["refinement"]["evaluations"] <= 3
    assert weight["header"]["evaluations"] == {k: v["evaluations"] for k, v in select["cost"]["weight"].items()}
    assert "wall_s" not in json.dumps(weight["header"])  # plan files hold nothing time-dependent


def test_rerun_skips_up_to_date_stages_and_selection_is_deterministic(pipeline_run, tmp_path):
    from tests.conftest import compose
    out, _ = pipeline_run
    ws = out / "tiny_random"
    before = {n: (ws / n).read_bytes() for n in ("final_weight_mp.yaml", "final_act_mp.yaml")}
    head = run_stage(compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", *SMALL]))
    assert {k: v for k, v in head["stages"].items() if k != "report"} == dict.fromkeys(
        [k for k in head["stages"] if k != "report"], "skipped")
    assert head["stages"]["report"] == "ran"  # always rerun: it reads whatever exists now
    head = run_stage(compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", *SMALL,
                              "stage.force=[select]"]))
    assert head["stages"]["select"] == "ran" and head["stages"]["infer"] == "ran"
    assert head["stages"]["sensitivity"] == "skipped"
    assert {n: (ws / n).read_bytes() for n in before} == before


def test_missing_candidates_and_foreign_plans_fail_clearly(pipeline_run, tmp_path):
    from tests.conftest import compose
    out, _ = pipeline_run
    ws = tmp_path / "tiny_random"
    shutil.copytree(out / "tiny_random", ws, ignore=shutil.ignore_patterns("plans", "final_*"))
    cfg = compose([f"paths.outputs={tmp_path}", "tracking=disabled", "device=cpu", *PROMPTS,
                   "stage=select", "stage.progress=false"])
    with pytest.raises(MissingArtifactError, match=r"no candidate weight plans .*stage=allocate"):
        run_stage(cfg)
    shutil.copytree(out / "tiny_random" / "plans", ws / "plans")
    with pytest.raises(MissingArtifactError, match=r"no candidate weight plans for target 3 .*\[4.0, 5.0\]"):
        run_stage(compose([f"paths.outputs={tmp_path}", "tracking=disabled", "device=cpu", *PROMPTS,
                           "stage=select", "stage.weight_target=3"]))
    infer = compose([f"paths.outputs={tmp_path}", "tracking=disabled", "device=cpu", *PROMPTS,
                     "stage=infer"])
    with pytest.raises(MissingArtifactError, match=r"final_weight_mp.yaml .*stage=select"):
        run_stage(infer)
    plan = yaml.safe_load((out / "tiny_random" / "final_weight_mp.yaml").read_text())
    plan["header"]["model_fingerprint"] = "0000000000000000"
    (ws / "final_weight_mp.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(FingerprintMismatchError, match="another model"):
        run_stage(infer)


def test_evaluate_ablation_table(pipeline_run):
    from tests.conftest import compose
    out, _ = pipeline_run
    head = run_stage(compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", *PROMPTS, "stage=evaluate",
                              "prompts.evaluation.n=3", "stage.seed_offsets=[0,7]", "stage.K=[1]",
                              "stage.progress=false",
                              "stage.variants=[{name: joint, program: joint}, {name: both, program: both},"
                              "{name: all, program: both, guard: true, refine: {evaluations: 3}}]",
                              "stage.points=[{name: W3A8, weight_target: 3, act: 8},"
                              "{name: W4A8, weight_target: 4, act: 8},{name: W8A5, weight: 8, act_target: 5}]"]))
    rows = {(r["point"], r["method"]): r for r in head["rows"]}
    methods = ("uniform", "sqnr_only", "decoupled", "joint", "both", "all")
    assert head["select_metric"] == "ssim"  # stage.select_metric's default
    for point in ("W4A8", "W8A5"):
        key = {m: tuple(rows[(point, m)]["cost"]["selection_key"]) for m in methods}
        # both programs' plans compete: never worse on the selection prompts than the split (published) row
        # or the joint one; the guard and the refinement only improve on that
        assert key["both"] == min(key["decoupled"], key["joint"]) and key["all"] <= min(key["both"], key["uniform"])
        assert rows[(point, "both")]["cost"]["allocation"]["program"] == "both"
    assert set(rows) == {(p, m) for p in ("W3A8", "W4A8", "W8A5") for m in methods}
    # tiny_random's quality layers hold most parameters and never go below 4 bits: W3 is out of reach.
    assert "reachable range" in rows[("W3A8", "decoupled")]["infeasible"]
    assert "reachable packed size" in rows[("W3A8", "all")]["infeasible"]
    assert rows[("W3A8", "uniform")]["weight_mean_bits"] == 3.0
    assert rows[("W4A8", "uniform")]["weight_mean_bits"] == 4.0
    for point, kind in (("W4A8", "weight"), ("W8A5", "act")):
        budget = rows[(point, "uniform")][f"{kind}_bytes"]
        for m in methods:  # equal bytes: within 1% below the uniform plan's
            assert rows[(point, m)]["equal_bytes"] and 0.99 * budget <= rows[(point, m)][f"{kind}_bytes"] <= budget
        assert "refinement" in rows[(point, "all")]["cost"] and rows[(point, "all")]["cost"]["selection"]["evaluations"] >= 2
    assert rows[("W8A5", "decoupled")]["act_mean_bits"] <= 5.0
    for r in head["rows"]:
        if "scores" in r:
            assert len(r["scores"]["ssim"]["values"]) == 2 and 0 < r["scores"]["ssim"]["mean"] <= 1
    table = (out / "tiny_random" / "evaluate.md").read_text()
    assert "| W4A8 | decoupled | " in table and "infeasible" in table and "bytes vs uniform" in table


def test_selections_for_several_budgets_run_in_parallel_jobs_without_sharing_files(pipeline_run, tmp_path):
    """sweeps/select_local.yaml: one submitit job per weight budget, each writing its own folder; the
    budget-4 selection equals the pipeline's own (same candidates, prompts and metric)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    out, _ = pipeline_run
    ws = tmp_path / "ws"
    shutil.copytree(out / "tiny_random", ws)
    r = subprocess.run([sys.executable, "run.py", "-cd", "sweeps", "-cn", "select_local", *PROMPTS,
                        f"paths.workspace={ws}", f"paths.outputs={tmp_path / 'out'}", "tracking=disabled",
                        "device=cpu", "stage.weight_target=4,5", "stage.refine.evaluations=3",
                        "hydra.launcher.gpus_per_node=0",
                        "hydra.launcher.cpus_per_task=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for target in (4, 5):
        folder = ws / "select" / f"W{target}_A7"
        weight = yaml.safe_load((folder / "final_weight_mp.yaml").read_text())
        act = yaml.safe_load((folder / "final_act_mp.yaml").read_text())
        assert weight["header"]["target"] == float(target)
        assert weight["header"]["achieved_mean_bits"]["overall"] <= target + 1e-9
        assert act["header"]["with_weight_plan"] == f"select/W{target}_A7/final_weight_mp.yaml"
        assert json.loads((folder / "select.json").read_text())["headline"]["final_plans"]["weight"] == \
            f"select/W{target}_A7/final_weight_mp.yaml"
        # per kind: 8 allocated plans (program both: 4 joint + 4 split) + the guard's uniform plan (+ the refined
        # plan when it won)
        assert 1 + 9 + 9 <= len((folder / "select_candidates.csv").read_text().splitlines()) <= 1 + 10 + 10
    assert (ws / "select" / "W4_A7" / "final_weight_mp.yaml").read_bytes() == (ws / "final_weight_mp.yaml").read_bytes()
    root_act = yaml.safe_load((ws / "final_act_mp.yaml").read_text())
    assert yaml.safe_load((ws / "select" / "W4_A7" / "final_act_mp.yaml").read_text())["bits"] == root_act["bits"]
    w5 = yaml.safe_load((ws / "select" / "W5_A7" / "final_weight_mp.yaml").read_text())
    assert w5["header"]["achieved_mean_bits"]["overall"] > 4.0  # the 5-bit budget is used, not the 4-bit one

    # infer on one of them
    from mixprec.runner import run_stage
    from tests.conftest import compose
    run_stage(compose([f"paths.workspace={ws}", f"paths.outputs={tmp_path / 'out'}", "tracking=disabled", "device=cpu",
                       *PROMPTS, "stage=infer", "stage.plan_dir=select/W5_A7"]))
    infer = json.loads((ws / "infer.json").read_text())["headline"]
    assert infer["weight_plan"]["path"] == "select/W5_A7/final_weight_mp.yaml"
    assert all(infer["applied_bits"][n]["w"] == b for n, b in w5["bits"].items())
    with pytest.raises(MissingArtifactError, match="stage.output_dir=select/W3_A7"):
        run_stage(compose([f"paths.workspace={ws}", "tracking=disabled", "device=cpu", *PROMPTS, "stage=infer",
                           "stage.plan_dir=select/W3_A7"]))


def _pixels(folder):
    import numpy as np
    from PIL import Image
    return [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(folder.glob("*.png"))]


def test_infer_on_kernel_modules_saves_a_checkpoint_that_generates_without_calibration(pipeline_run, tmp_path):
    from mixprec.artifacts import QUANT_PARAMS
    from tests.conftest import compose
    out, _ = pipeline_run
    ws = tmp_path / "ws"
    shutil.copytree(out / "tiny_random", ws)
    base = [f"paths.workspace={ws}", f"paths.outputs={tmp_path / 'out'}", "tracking=disabled", "device=cpu", *PROMPTS,
            "stage=infer"]
    fake = _pixels(ws / "generated_images")

    run_stage(compose([*base, "stage.execution=kernels", "stage.save_checkpoint=true"]))
    infer = json.loads((ws / "infer.json").read_text())["headline"]
    assert infer["execution"] == "kernels"
    dispatch = json.loads((ws / "infer_dispatch.json").read_text())
    weight = yaml.safe_load((ws / "final_weight_mp.yaml").read_text())
    assert {d["name"] for d in dispatch["layers"]} >= set(weight["bits"])
    # no CUDA here: every quantized layer runs the reference path, and the report says so
    assert set(infer["dispatch_counts"]["paths"]) <= {"reference", "dense"}
    assert sum(infer["dispatch_counts"]["paths"].values()) == len(dispatch["layers"])
    ckpt = infer["checkpoint"]
    assert ckpt["file_bytes"] == (ws / "quantized_denoiser.safetensors").stat().st_size
    assert ckpt["weight_bytes"] == infer["denoiser_weight_bytes"]
    assert ckpt["file_bytes"] == ckpt["weight_bytes"] + ckpt["header_bytes"]
    kernels = _pixels(ws / "generated_images")
    # on CPU the kernel modules run the reference path: with bos=exact (infer's default) that is the
    # fake-quant function bit for bit, so the images are the fake-quant ones
    assert len(kernels) == len(fake) == 4
    for a, b in zip(fake, kernels):
        assert (a == b).all()

    (ws / QUANT_PARAMS).unlink()  # a checkpoint needs no calibration
    for name in ("final_weight_mp.yaml", "final_act_mp.yaml"):
        (ws / name).unlink()
    run_stage(compose([*base, "stage.checkpoint=quantized_denoiser.safetensors"]))
    again = json.loads((ws / "infer.json").read_text())["headline"]
    assert again["execution"] == "checkpoint"
    assert again["denoiser_weight_bytes"] == infer["denoiser_weight_bytes"]
    assert again["dispatch_counts"]["paths"] == infer["dispatch_counts"]["paths"]
    assert {n: b["w"] for n, b in again["applied_bits"].items() if b["w"]} == \
        {n: b for n, b in weight["bits"].items() if b and b < 16}
    for a, b in zip(kernels, _pixels(ws / "generated_images")):
        assert (a == b).all()
    with pytest.raises(ValueError, match="saved from a torch.float32 denoiser, but model=tiny_random loads in "
                                         "torch.bfloat16"):
        run_stage(compose([*base, "stage.checkpoint=quantized_denoiser.safetensors", "model.dtype=bfloat16"]))
    with pytest.raises(ValueError, match="exclude each other"):
        run_stage(compose([*base, "stage.checkpoint=quantized_denoiser.safetensors", "stage.execution=kernels",
                           "stage.save_checkpoint=true"]))


def test_infer_options_are_checked(pipeline_run, tmp_path):
    from tests.conftest import compose
    out, _ = pipeline_run
    base = [f"paths.workspace={out / 'tiny_random'}", "tracking=disabled", "device=cpu", *PROMPTS, "stage=infer"]
    with pytest.raises(ValueError, match="stage.execution"):
        run_stage(compose([*base, "stage.execution=int8"]))
    with pytest.raises(ValueError, match="needs stage.execution=kernels"):
        run_stage(compose([*base, "stage.save_checkpoint=true"]))
    with pytest.raises(MissingArtifactError, match="save_checkpoint=true"):
        run_stage(compose([*base, f"stage.checkpoint={tmp_path / 'nope.safetensors'}"]))


# ------------------------------------------------------------------ issue 19: honest reports, force, hand-selected finals

def _copy(pipeline_run, tmp_path):
    out, _ = pipeline_run
    ws = tmp_path / "ws"
    shutil.copytree(out / "tiny_random", ws)
    return ws, [f"paths.workspace={ws}", f"paths.outputs={tmp_path / 'out'}", "tracking=disabled", "device=cpu"]


class _Recorder:
    """Stands in for a W&B run: keeps the tables and the summary the report logs."""

    enabled = True

    def __init__(self):
        self.tables, self.summ = {}, {}

    def log_table(self, key, columns, rows):
        self.tables[key] = (list(columns), [list(r) for r in rows])

    def summary(self, values):
        self.summ.update(values)

    def log_images(self, *a, **k):
        pass

    log_artifact = log_file_image = log = log_images


def test_report_marks_numbers_from_other_plans_after_a_manual_select(pipeline_run, tmp_path):
    from mixprec.report import load_workspace
    from mixprec.report.wandb_views import log_report
    from tests.conftest import compose
    ws, base = _copy(pipeline_run, tmp_path)
    old_infer = json.loads((ws / "infer.json").read_text())["headline"]
    run_stage(compose([*base, *PROMPTS, "stage=select", "stage.weight_target=5"]))
    run_stage(compose([*base, *PROMPTS, "stage=report", "stage.images=false"]))
    html = (ws / "report.html").read_text()
    current = load_workspace(ws).plans_digest
    assert current != old_infer["plans_digest"]
    # the old 4-bit inference numbers are on the page only under a STALE mark naming both plan digests
    block = html.split("Final inference (infer.json)</h3>")[1].split("</table>")[0]
    assert "STALE" in block and old_infer["plans_digest"] in block and current in block
    assert f"{old_infer['psnr_db']:.4g}"[:5] in block
    assert '<section id="allocation" data-artifacts' in html and 'class="stale"' in html
    images = html.split('<section id="images"')[1].split("</section>")[0]
    assert "STALE" in images  # generated_images/ are infer's, from the old plans too
    rec = _Recorder()
    log_report(rec, load_workspace(ws), {}, None, ws / "report.html")
    assert rec.summ["infer/stale"] is True and "infer" in rec.summ["report/stale"]
    cols, rows = rec.tables["report/sources"]
    assert any(r[0] == "infer" and "other final plans" in r[3] for r in rows)
    # the comparison page marks it too
    from mixprec.report import build_compare
    page = build_compare([pipeline_run[0] / "tiny_random", ws], tmp_path / "compare.html").path.read_text()
    assert "STALE: computed from other final plans" in page
    # once infer runs on the new plans, nothing is stale
    run_stage(compose([*base, *PROMPTS, "stage=infer"]))
    run_stage(compose([*base, *PROMPTS, "stage=report"]))  # comparison images for the new plans too
    html = (ws / "report.html").read_text()
    assert "STALE" not in html and f"final plans {current}" in html


def test_pipeline_keeps_hand_selected_final_plans_unless_select_is_forced(pipeline_run, tmp_path, caplog):
    from tests.conftest import compose
    ws, base = _copy(pipeline_run, tmp_path)
    run_stage(compose([*base, *PROMPTS, "stage=select", "stage.weight_target=5",
                       "stage.refine.evaluations=3"]))
    chosen = (ws / "final_weight_mp.yaml").read_bytes()
    with caplog.at_level("WARNING", logger="mixprec"):
        head = run_stage(compose([*base, *SMALL]))
    assert head["stages"]["select"] == "kept hand-selected final plans"
    assert (ws / "final_weight_mp.yaml").read_bytes() == chosen
    assert "keeping the final plans selected by hand with {'weight_target': 5}" in caplog.text
    assert "stage.force=[select]" in caplog.text
    assert head["stages"]["infer"] == "ran"  # infer.json now describes the kept plans
    head = run_stage(compose([*base, *SMALL, "stage.force=[select]"]))
    assert head["stages"]["select"] == "ran"
    assert yaml.safe_load((ws / "final_weight_mp.yaml").read_text())["header"]["target"] == 4.0


def test_force_reruns_sensitivity_measurements(pipeline_run, tmp_path, monkeypatch):
    import mixprec.sensitivity as sens
    import mixprec.runner as runner
    from tests.conftest import compose
    ws, base = _copy(pipeline_run, tmp_path)
    measured = []
    real = sens.run_tasks
    monkeypatch.setattr(sens, "run_tasks", lambda tasks, *a, **k: measured.append(len(tasks)) or real(tasks, *a, **k))
    run_stage(compose([*base, *PROMPTS, "stage=sensitivity"]))
    assert measured == []  # up to date: the stored records are reused
    # forced, the stored records are discarded: every task is pending again (one is measured, then it stops)
    head = run_stage(compose([*base, *PROMPTS, "stage=sensitivity", "stage.force=true", "stage.max_tasks=1"]))
    assert measured == [2 * 85] and head["shard_tasks_done"] == 1 and not head["merged"]
    # the pipeline's stages up to sensitivity (what comes after a rerun stage reruns too: checked by
    # test_rerun_skips_up_to_date_stages_and_selection_is_deterministic): forced, all is measured again
    head = run_stage(compose([*base, *SMALL, "stage.force=[sensitivity]", "stage.stages=[calibrate,sensitivity]"]))
    assert head["stages"] == {"calibrate": "skipped", "sensitivity": "ran"} and measured == [2 * 85] * 2
    assert json.loads((ws / "sensitivity.json").read_text())["headline"]["merged"]
    # stage.force=true: every sub-stage runs with force on (sensitivity included), none is skipped
    seen = {}
    monkeypatch.setattr(runner, "run_stage", lambda sub: seen.setdefault(sub.stage.record, sub.stage.force))
    head = run_stage(compose([*base, *SMALL, "stage.force=true"]))
    assert set(head["stages"].values()) == {"ran"} and seen and all(seen.values())


def test_truncated_calibration_is_named_with_the_stage_that_rewrites_it(pipeline_run, tmp_path, monkeypatch):
    import mixprec.context as common
    from mixprec.workspace import UnreadableArtifactError
    from tests.conftest import compose
    ws, base = _copy(pipeline_run, tmp_path)
    path = ws / "quant_params.safetensors"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # group-readable, as the umask allows
    path.write_bytes(path.read_bytes()[:1000])
    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pytest.fail("model loaded before the check"))
    for stage in ("sensitivity", "select", "infer"):
        with pytest.raises(UnreadableArtifactError, match=rf"{path} is unreadable: .*truncated\. It is written by "
                                                          r"`python run.py stage=calibrate`"):
            run_stage(compose([*base, *PROMPTS, f"stage={stage}"]))
    ckpt = ws / "quantized_denoiser.safetensors"
    ckpt.write_bytes(b"\x00" * 4)
    with pytest.raises(UnreadableArtifactError, match=r"quantized_denoiser.safetensors is unreadable: 4 bytes.*"
                                                      r"stage.save_checkpoint=true"):
        run_stage(compose([*base, *PROMPTS, "stage=infer", "stage.checkpoint=quantized_denoiser.safetensors"]))


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_stage_writes_torchao_configs_that_reproduce_the_plan(pipeline_run, tmp_path):
    from mixprec.export import apply_torchao, torchao_bits
    from mixprec.models import load_pipeline
    from mixprec.context import model_spec
    from tests.conftest import compose
    out, _ = pipeline_run
    ws = out / "tiny_random"
    cfg = compose([f"paths.workspace={ws}", "tracking=disabled", "device=cpu", *PROMPTS, "stage=export",
                   f"stage.output={tmp_path / 'torchao_plan.json'}"])
    head = run_stage(cfg)
    assert head["exported"] + head["full_precision"] + head["unsupported"] == head["layers"] > 0
    assert head["exported"] > 0
    unet = load_pipeline(model_spec(cfg)).unet
    apply_torchao(unet, head["path"])
    weight = yaml.safe_load((ws / "final_weight_mp.yaml").read_text())["bits"]
    exported = json.loads((tmp_path / "torchao_plan.json").read_text())["config"]["_data"]["fqn_to_config"]
    got = torchao_bits(unet)
    assert {n: got[n]["w"] for n in exported} == {n: weight[n] for n in exported}


def test_infer_loads_lora_beside_fake_quant_and_kernel_layers(pipeline_run, tmp_path):
    from safetensors.torch import save_file

    from mixprec import lora
    from mixprec.models import load_pipeline
    from mixprec.context import model_spec
    from tests.conftest import compose
    out, _ = pipeline_run
    ws = tmp_path / "ws"
    shutil.copytree(out / "tiny_random", ws)
    base = [f"paths.workspace={ws}", "tracking=disabled", "device=cpu", *PROMPTS, "stage=infer"]
    plain = _pixels(ws / "generated_images")
    unet = load_pipeline(model_spec(compose(base))).unet
    save_file(lora.random_lora_state_dict(unet, ("to_k", "to_v", "conv1", "proj_in"), relative_norm=0.5, seed=3),
              str(tmp_path / "style.safetensors"))
    with_lora = [*base, f"stage.lora=[{{path: '{tmp_path / 'style.safetensors'}', weight: 1.0}}]"]
    run_stage(compose(with_lora))
    assert json.loads((ws / "infer.json").read_text())["headline"]["lora"][0]["name"] == "style"
    fake = _pixels(ws / "generated_images")
    assert any((a != b).any() for a, b in zip(plain, fake))
    run_stage(compose([*with_lora, "stage.execution=kernels"]))
    for a, b in zip(fake, _pixels(ws / "generated_images")):  # CPU: the kernel layers' reference path
        assert (a == b).all()
    with pytest.raises(FileNotFoundError, match=r"stage.lora\[0\].path"):
        run_stage(compose([*base, f"stage.lora=[{{path: '{tmp_path / 'none'}'}}]"]))
