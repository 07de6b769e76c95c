"""stage=allocate on an SDXL-sized synthetic workspace, and the multirun sweep with its Pareto callback."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from mixprec.runner import run_stage
from mixprec.search import MIB, InfeasibleBudgetError, read_plan
from mixprec.search.synthetic import write_synthetic_workspace
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def synth_ws(tmp_path_factory):
    return write_synthetic_workspace(tmp_path_factory.mktemp("ws"), n_prompts=4, seed=0)


def _cfg(make_cfg, ws, *overrides):
    return make_cfg("stage=allocate", f"paths.workspace={ws}", *overrides)


def test_weight_plan_meets_its_budget_and_is_reproducible(make_cfg, synth_ws):
    head = run_stage(_cfg(make_cfg, synth_ws, "stage.target=4.5", "stage.K=2", "stage.seed=1"))
    path = synth_ws / "plans/weight_4.5_2/seed1.yaml"
    assert [p["plan"] for p in head["plans"]] == ["plans/weight_4.5_2/seed1.yaml"]
    first = path.read_bytes()
    plan = read_plan(path)
    h = plan.header
    assert len(plan.bits) == 794 and set(plan.bits.values()) <= {2, 4, 8}
    assert h["status"] == "OPTIMAL" and h["K"] == 2.0 and h["seed"] == 1
    assert h["targets"]["content"] >= h["targets"]["quality"]
    for g in ("content", "quality"):
        assert h["targets"][g] - 0.1 - 1e-9 <= h["achieved_mean_bits"][g] <= h["targets"][g] + 1e-9
    assert h["achieved_mean_bits"]["overall"] <= 4.5 + 1e-9
    assert "solve_time" not in path.read_text()
    assert json.loads((synth_ws / "allocate.json").read_text())["headline"]["plans"][0]["solve_time_s"] > 0
    run_stage(_cfg(make_cfg, synth_ws, "stage.target=4.5", "stage.K=2", "stage.seed=1"))
    assert path.read_bytes() == first


def test_act_plan_keeps_protected_layers_at_16(make_cfg, synth_ws):
    run_stage(_cfg(make_cfg, synth_ws, "stage.kind=act", "stage.target=6", "stage.solver=scip"))
    plan = read_plan(synth_ws / "plans/act_6_1/seed0.yaml")
    protected = yaml.safe_load((synth_ws / "protected_layers.yaml").read_text())
    assert protected and all(plan.bits[l] == 16 for l in protected)
    assert {b for l, b in plan.bits.items() if l not in protected} <= {4, 8}
    assert plan.header["protected"] == len(protected) and plan.header["solver"] == "scip"


def test_byte_budget_plan_within_one_percent(make_cfg, synth_ws):
    run_stage(_cfg(make_cfg, synth_ws, "stage.budget=bytes", "stage.budget_mib=1300", "stage.K=3"))
    h = read_plan(synth_ws / "plans/weight_1300MiB_3/seed0.yaml").header
    assert 0.99 * 1300 * MIB <= h["bytes"] <= 1300 * MIB


def test_infeasible_request_fails_with_the_reachable_range_or_is_skipped(make_cfg, synth_ws):
    with pytest.raises(InfeasibleBudgetError, match=r"reachable range \["):
        run_stage(_cfg(make_cfg, synth_ws, "stage.target=2.5"))
    head = run_stage(_cfg(make_cfg, synth_ws, "stage.target=2.5", "stage.on_infeasible=skip"))
    assert head["plans"] == [] and "reachable range" in head["skipped"][0]["error"]


def test_joint_program_meets_the_targets_bytes_and_unreachable_targets_are_said_once(make_cfg, synth_ws, caplog):
    from mixprec.artifacts import read_census
    from mixprec.search import LayerSizes, uniform_plan
    from mixprec.workspace import Workspace
    head = run_stage(_cfg(make_cfg, synth_ws, "stage.program=joint", "stage.target=[2.5,4]", "stage.K=[1,2]",
                          "stage.on_infeasible=skip", "stage.solver=highs"))
    census = read_census(Workspace(synth_ws))
    sizes, names = LayerSizes.of(census), [c.name for c in census]
    budget = sizes.plan_bytes("weight", uniform_plan(names, 4))
    for K in (1, 2):
        plan = read_plan(synth_ws / f"plans/weight_4_{K}/seed0.yaml")
        assert plan.header["program"] == "joint" and plan.header["solver"] == "highs"
        assert 0.99 * budget <= plan.header["bytes"] == sizes.plan_bytes("weight", plan.bits) <= budget
    assert len(head["plans"]) == 2 and head["skipped"] == [head["skipped"][0]]
    assert head["skipped"][0]["plans"] == 2 and "reachable range" in head["skipped"][0]["error"]
    said = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert len(said) == 1 and "2 plan(s)" in said[0].getMessage()


def test_program_both_writes_the_joint_and_the_split_plans_as_candidates(make_cfg, tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    head = run_stage(_cfg(make_cfg, ws, "stage.program=both", "stage.target=4", "stage.K=[1,2]", "stage.solver=highs"))
    assert sorted(p["plan"] for p in head["plans"]) == [
        "plans/weight_4_1/seed0.yaml", "plans/weight_4_1_split/seed0.yaml",
        "plans/weight_4_2/seed0.yaml", "plans/weight_4_2_split/seed0.yaml"]
    split_both = read_plan(ws / "plans/weight_4_2_split/seed0.yaml")
    assert read_plan(ws / "plans/weight_4_2/seed0.yaml").header["program"] == "joint"
    assert split_both.header["program"] == "split"
    # the split plan is the one stage.program=split writes at the usual path
    run_stage(_cfg(make_cfg, ws, "stage.program=split", "stage.target=4", "stage.K=2", "stage.solver=highs"))
    assert read_plan(ws / "plans/weight_4_2/seed0.yaml").bits == split_both.bits
    with pytest.raises(Exception, match=r"stage.program='all': expected 'split' \| 'joint' \| 'both'"):
        run_stage(_cfg(make_cfg, ws, "stage.program=all"))
    from mixprec.allocation import programs_of
    with pytest.raises(ValueError, match=r"stage.program must be one of \('split', 'joint', 'both'\), got 'x'"):
        programs_of("x")


def test_lists_solve_the_product_and_write_the_pareto_table(make_cfg, tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    head = run_stage(_cfg(make_cfg, ws, "stage.target=[4,6]", "stage.K=[1,3]", "stage.seed=[0,1]"))
    assert len(head["plans"]) == 8 and head["pareto"]["candidates"] == 8
    rows = list(csv.DictReader(open(ws / "pareto.csv")))
    assert len(rows) == 8 and any(r["pareto"] == "True" for r in rows)
    assert (ws / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_config_runs_a_multirun_and_the_callback_writes_the_front(tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    r = subprocess.run([sys.executable, "run.py", "-cd", "sweeps", "-cn", "allocate", f"paths.workspace={ws}",
                        f"paths.outputs={tmp_path / 'out'}", "tracking=disabled", "stage.target=4,5", "stage.K=1,2",
                        "stage.seed=0,1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(ws / "pareto.csv")))
    assert len(rows) == 8
    assert {(float(r["target"]), float(r["K"]), int(r["seed"])) for r in rows} == {
        (t, k, s) for t in (4.0, 5.0) for k in (1.0, 2.0) for s in (0, 1)}
    sweep = json.loads((ws / "allocate_sweep.json").read_text())
    assert sweep["candidates"] == 8 and sweep["wall_time_s"] > 0 and (ws / "pareto.png").exists()
