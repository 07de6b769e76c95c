"""The workspace file contract (mixprec.artifacts): names, typed plan headers, the selection table."""

import csv

import pytest

from mixprec import artifacts
from mixprec.artifacts import Budget, PlanHeader
from mixprec.models import LayerInfo
from mixprec.search import Plan
from mixprec.selection import Candidate, load_candidates
from mixprec.workspace import MissingArtifactError, Workspace

BYTES_HEADER = {"kind": "weight", "budget": "bytes", "target": None, "budget_mib": 1.5, "K": 1.0, "seed": 0,
                "achieved_mean_bits": {"overall": 4.25}, "mib": 1.49}
MEAN_HEADER = {"kind": "act", "budget": "mean_bits", "target": 7.0, "budget_mib": None, "K": 2.0, "seed": 1,
               "achieved_mean_bits": {"overall": 6.9}, "mib": 0.2}


def test_plan_header_has_one_budget_and_one_kind_code():
    b = PlanHeader(BYTES_HEADER)
    assert b.budget == Budget(1.5, "MiB") and b.budget.mode == "bytes" and b.budget_value == 1.5
    assert b.kind == "weight" and b.code == "w" and b.mean_bits == 4.25
    m = PlanHeader(MEAN_HEADER)
    assert m.budget == Budget(7.0, "mean_bits") and m.code == "a"
    assert PlanHeader({"kind": "weight"}).budget is None
    with pytest.raises(ValueError, match="unit is one of"):
        Budget(4.0, "bits")
    with pytest.raises(ValueError, match="stage.budget must be mean_bits or bytes"):
        Budget.of("watts", 3)


def test_header_fields_keep_the_stored_layout():
    assert artifacts.plan_header_fields("weight", Budget(1.5, "MiB"), 1, 0) == {
        "kind": "weight", "budget": "bytes", "target": None, "budget_mib": 1.5, "K": 1.0, "seed": 0}
    assert artifacts.plan_path("weight", Budget(1400, "MiB"), 1.5, 2) == "plans/weight_1400MiB_1.5/seed2.yaml"
    assert artifacts.plan_path("act", Budget(7), 1, 0) == "plans/act_7_1/seed0.yaml"


def test_selection_table_names_the_byte_budget(tmp_path):
    """select_candidates.csv used to say target=None for plans allocated under a MiB budget."""
    ws = Workspace(tmp_path)
    rows = [artifacts.selection_row("weight", 1, "plans/weight_1.5MiB_1/seed0.yaml", BYTES_HEADER, {"mse": 0.1}, None),
            artifacts.selection_row("act", 1, "plans/act_7_2/seed1.yaml", MEAN_HEADER, {"mse": 0.2}, None)]
    artifacts.write_selection(ws, artifacts.SELECT_CANDIDATES_CSV, rows)
    with open(ws.path(artifacts.SELECT_CANDIDATES_CSV), newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["target"] for r in written] == ["1.5", "7.0"]
    assert [r["target"] for r in artifacts.read_selection(tmp_path)] == [1.5, 7.0]


def test_candidates_are_filtered_by_their_one_budget(tmp_path):
    ws = Workspace(tmp_path)
    for header in (BYTES_HEADER, {**BYTES_HEADER, "budget_mib": 2.0}):
        rel = artifacts.plan_path("weight", PlanHeader(header).budget, 1, 0)
        artifacts.write_plan_file(ws, rel, Plan(dict(header), {"a": 4}))
    cands = load_candidates(ws, "weight", 2.0)
    assert [c.path for c in cands] == ["plans/weight_2MiB_1/seed0.yaml"] and isinstance(cands[0], Candidate)
    with pytest.raises(MissingArtifactError, match=r"the workspace has targets \[1.5, 2.0\]"):
        load_candidates(ws, "weight", 3.0)
    rows = artifacts.collect_candidates(tmp_path)
    assert [r["target"] for r in rows] == [1.5, 2.0] and {r["budget"] for r in rows} == {"bytes"}


def test_census_columns_are_layer_info_fields():
    assert list(LayerInfo.__dataclass_fields__) == artifacts.CENSUS_COLUMNS


def test_kind_codes_round_trip():
    for kind, code in artifacts.KIND_CODES.items():
        assert artifacts.kind_code(kind) == code and artifacts.kind_name(code) == kind
        assert artifacts.kind_code(code) == code and artifacts.kind_name(kind) == kind
