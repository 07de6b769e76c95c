"""The per-layer latency table (measured on the tiny model, CPU) and allocation under a latency budget
(the integer program on an SDXL-sized synthetic workspace)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from mixprec import artifacts
from mixprec.kernels import BackendConfig, convert_
from mixprec.kernels.latency_table import (FULL, LatencyTable, _module_for, calibrate_overhead, measure_latency_table,
                                          measure_layers, model_latency_ms, parse_choice, time_module)
from mixprec.kernels.probing import calibrate_random, denoiser_inputs
from mixprec.models.toy import build_unet
from mixprec.quantizers import LayerQuantParams, QuantLayer, act_qparams, set_plan, weight_scales
from mixprec.runner import run_stage
from mixprec.search import AllocationError, InfeasibleBudgetError, read_plan
from mixprec.search.latency import solve_latency
from mixprec.search.synthetic import sdxl_census, write_synthetic_workspace
from mixprec.artifacts import collect_candidates, read_layers
from tests.conftest import calibrated_tiny_unet

CHOICES = ["w16a16", "w8a8", "w4a16", "w4a8"]


def synthetic_table(census_rows, seed: int = 0) -> dict:
    """Layer times shaped like the H100's: 8-bit faster than 16-bit on big layers, 4-bit weights slower."""
    g = torch.Generator().manual_seed(seed)
    ms = {}
    for r in census_rows:
        base = 0.002 + r["params"] * 2e-9
        jitter = 1 + 0.1 * torch.rand(4, generator=g)
        ms[r["name"]] = {"w16a16": base * float(jitter[0]), "w8a8": 0.75 * base * float(jitter[1]) + 0.001,
                         "w4a16": 2.5 * base * float(jitter[2]), "w4a8": 1.9 * base * float(jitter[3])}
    return {"meta": {"choices": CHOICES, "settings": {"resolution": 512, "batch_size": 1}}, "model_ms": 9.5, "ms": ms}


def test_latency_table_on_the_tiny_model_predicts_the_plans_it_times():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    calib = [denoiser_inputs(unet, 1, seed=s) for s in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(4, 8), act_bits=(8,))
    x = denoiser_inputs(unet, 1, seed=3)
    set_plan(layers)
    table = measure_latency_table(unet, layers, x, ["w8a8", "w4a16"], BackendConfig(w8a8="int8"), iters=3, warmup=1)
    assert table.choices == ["w16a16", "w8a8", "w4a16"] and set(table.ms) == set(layers)
    assert all(v > 0 for row in table.ms.values() for v in row.values())
    assert table.meta["paths"]["conv_in"] == {"w16a16": "fp", "w8a8": "int8", "w4a16": "wonly"}
    again = LatencyTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again.ms == table.ms and again.rest_ms == pytest.approx(table.rest_ms)
    # the 16-bit plan is predicted at the measured whole-model time, by construction
    assert table.predict_ms({}, {}) == pytest.approx(table.model_ms)
    uniform = table.uniform_ms()
    assert uniform["w16a16"] == pytest.approx(table.model_ms)
    assert uniform["w8a8"] == pytest.approx(table.predict_ms({n: 8 for n in layers}, {n: 8 for n in layers}))
    with pytest.raises(KeyError, match="rerun stage=latency_table with w4a8"):
        table.predict_ms({n: 4 for n in layers}, {n: 8 for n in layers})
    assert parse_choice("w16a16") == (None, None) and parse_choice("W4a16") == (4, None)
    with pytest.raises(ValueError, match="wXaY"):
        parse_choice("int8")
    # a converted plan is measured the way the table is (host clock on CPU: loose)
    set_plan(layers, {n: 8 for n in layers}, {n: 8 for n in layers})
    convert_(unet, BackendConfig(w8a8="int8"))
    measured = model_latency_ms(unet, x, iters=3, warmup=1)
    predicted = table.predict_ms({n: 8 for n in layers}, {n: 8 for n in layers})
    assert 0.2 < measured / predicted < 5


def test_overhead_calibration_makes_the_fastest_plan_predict_its_whole_model_time():
    unet, layers, x = calibrated_tiny_unet(8, 8, weight_bits=(8,), act_bits=(8,))
    set_plan(layers)  # calibrate_overhead sets the plan it times
    names = sorted(layers)
    # a table in which every other layer is faster at w8a8 (on the CPU the emulated kernels are not)
    ms = {n: {FULL: 0.02, "w8a8": 0.01 if i % 2 else 0.03} for i, n in enumerate(names)}
    table = LatencyTable(ms=ms, model_ms=1.0, meta={"choices": [FULL, "w8a8"]})
    fast = {n for i, n in enumerate(names) if i % 2}
    assert {n for n, k in table.fastest_plan().items() if k != FULL} == fast
    cal = calibrate_overhead(table, copy.deepcopy(unet), x, BackendConfig(w8a8="int8"), iters=3, warmup=1)
    info = cal.meta["calibration"]
    assert info["quantized_layers"] == len(fast) and info["predicted_ms"] == pytest.approx(1.0 - 0.01 * len(fast))
    assert cal.quantized_layer_ms == pytest.approx((info["measured_ms"] - info["predicted_ms"]) / len(fast))
    # the calibrated table predicts the plan it was calibrated on at its measured time; 16 bit is untouched
    plan = {n: 8 for n in fast}
    assert cal.predict_ms(plan, plan) == pytest.approx(info["measured_ms"])
    assert cal.predict_ms({}, {}) == pytest.approx(table.model_ms) and cal.rest_ms == pytest.approx(table.rest_ms)
    n = names[1]
    assert cal.plan_ms[n][FULL] == ms[n][FULL] and cal.plan_ms[n]["w8a8"] == max(0.0, ms[n]["w8a8"] + cal.quantized_layer_ms)
    again = LatencyTable.from_json(json.loads(json.dumps(cal.to_json())))
    assert again.quantized_layer_ms == cal.quantized_layer_ms and again.predict_ms(plan, plan) == pytest.approx(
        info["measured_ms"])
    # no layer faster quantized: nothing to calibrate, and the table says so
    slow = LatencyTable(ms={n: {FULL: 0.01, "w8a8": 0.02} for n in names}, model_ms=1.0)
    skipped = calibrate_overhead(slow, copy.deepcopy(unet), x, BackendConfig(w8a8="int8"), iters=3, warmup=1)
    assert skipped.quantized_layer_ms == 0.0 and "no layer is faster" in skipped.meta["calibration"]["skipped"]
    # a table of another model
    other = LatencyTable(ms={"mid_block.nope": {FULL: 0.02, "w8a8": 0.01}}, model_ms=1.0)
    with pytest.raises(ValueError, match="has no layer 'mid_block.nope' of the table"):
        calibrate_overhead(other, copy.deepcopy(unet), x, BackendConfig(w8a8="int8"))
    with pytest.raises(ValueError, match="quantized_layer_ms is nan"):
        LatencyTable.from_json({**cal.to_json(), "quantized_layer_ms": float("nan")})


def test_compiled_layer_timing_subtracts_its_producer():
    torch.manual_seed(0)
    mod = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    ms = time_module(mod, x, iters=3, warmup=1, compile_backend="eager")
    assert ms >= 0 and time_module(mod, x, iters=3, warmup=1) > 0
    # a quantized layer compiles with its buffers as graph inputs; the producer alone is timed once per
    # input shape
    layer = QuantLayer("blocks.0.ff.net.2", torch.nn.Linear(64, 32))
    layers = {"l": layer}
    lo, hi = float(x.min()), float(x.max())
    layer.params = LayerQuantParams({8: weight_scales(layer.inner.weight, 8)}, (lo, hi), {8: act_qparams(lo, hi, 8)})
    cache: dict = {}
    ms, paths = measure_layers(layers, {"l": (4, 64)}, ["w16a16", "w8a8"], BackendConfig(w8a8="fp8"), iters=2,
                               warmup=1, compile_backend="eager")
    assert set(ms["l"]) == {"w16a16", "w8a8"} and paths["l"] == {"w16a16": "fp", "w8a8": "fp8"}
    kl = _module_for(layer, 8, 8, BackendConfig(w8a8="fp8"))
    assert time_module(kl, x, 2, 1, "eager", cache) >= 0 and len(cache) == 1
    time_module(kl, x, 2, 1, "eager", cache)
    assert len(cache) == 1
    torch._dynamo.reset()


def test_latency_program_stays_within_budget_and_uses_it():
    census = [{"name": r.name, "group": r.group, "params": r.params, "act_elems": r.act_elems,
               "out_channels": r.out_channels} for r in sdxl_census()]
    table = LatencyTable.from_json(synthetic_table(census))
    groups = {r["name"]: r["group"] for r in census}
    metric = {g: {l: {b: 6.0 * b + (i % 7) for b in (2, 4, 8)} for i, l in enumerate(groups) if groups[l] == g}
              for g in ("content", "quality")}
    bits = {"content": (2, 4, 8), "quality": (4, 8)}
    full = table.predict_ms({}, {})
    fastest = table.fastest_ms(table.choices)  # the solver's own bound, checked below
    last_score = -1.0
    for budget in (fastest + 0.01, (fastest + full) / 2, full + 0.001):  # + the rounding up to ns
        sol = solve_latency(metric, metric, groups, table.ms, table.rest_ms, budget, weight_bits=bits, act_bits=bits,
                            act_protected=["conv_in"], time_limit_s=5)
        assert sol.predicted_ms <= budget + 1e-9
        assert sol.predicted_ms == pytest.approx(table.predict_ms(sol.weight_bits, sol.act_bits))
        assert sol.act_bits["conv_in"] == 16
        assert sol.objective >= last_score - 1e-9  # a looser budget never scores lower
        last_score = sol.objective
    # at the 16-bit time every layer can stay unquantized: the best score there is (1 per part and group)
    assert sol.objective == pytest.approx(4.0)
    with pytest.raises(InfeasibleBudgetError, match="below the fastest plan"):
        solve_latency(metric, metric, groups, table.ms, table.rest_ms, fastest - 0.1, weight_bits=bits, act_bits=bits)
    # headroom: the prediction keeps that fraction of the budget free; a budget feasible only without
    # it says so; a headroom outside [0, 1) is refused
    roomy = solve_latency(metric, metric, groups, table.ms, table.rest_ms, (fastest + 0.01) / 0.97, weight_bits=bits,
                          act_bits=bits, headroom=0.03)
    assert roomy.predicted_ms <= fastest + 0.01 + 1e-9
    with pytest.raises(InfeasibleBudgetError, match="minus the 3% headroom"):
        solve_latency(metric, metric, groups, table.ms, table.rest_ms, fastest + 1e-3, weight_bits=bits, act_bits=bits,
                      headroom=0.03)
    with pytest.raises(AllocationError, match="headroom must be a fraction"):
        solve_latency(metric, metric, groups, table.ms, table.rest_ms, fastest, weight_bits=bits, act_bits=bits,
                      headroom=1.5)


def test_allocate_stage_with_latency_budgets_writes_both_plans_and_the_front(make_cfg, tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    table = synthetic_table([{"name": c.name, "params": c.params} for c in read_layers(ws / "layers.csv")])
    (ws / "layer_latency.json").write_text(json.dumps(table))
    lt = LatencyTable.from_json(table)
    full, fastest = lt.model_ms, lt.fastest_ms(lt.choices)
    least = fastest / 0.97 + 1e-3  # the smallest budget the default 3% headroom allows
    budgets = [round(least + f * (full - least), 3) for f in (0.2, 0.5, 0.8)]
    head = run_stage(make_cfg("stage=allocate", f"paths.workspace={ws}", "stage.budget=latency",
                              f"stage.budget_ms=[{','.join(map(str, budgets))}]", "stage.time_limit_s=5"))
    assert len(head["plans"]) == 3
    for row, budget in zip(head["plans"], budgets):
        wplan = read_plan(ws / row["plan"])
        aplan = read_plan(ws / row["plan"]).header["act_plan"]
        acts = read_plan((ws / row["plan"]).parent / aplan).bits
        # the default 3% headroom: the prediction stays 3% under the budget
        assert wplan.header["kind"] == "latency" and wplan.header["predicted_ms"] <= budget * 0.97 + 1e-9
        assert wplan.header["headroom"] == 0.03
        assert wplan.header["predicted_ms"] == pytest.approx(lt.predict_ms(wplan.bits, acts))
        protected = (ws / "protected_layers.yaml").read_text().split()
        assert all(acts[l] == 16 for l in acts if f"{l}" in protected)
    rows = list(csv.DictReader(open(ws / "pareto_latency.csv")))
    assert len(rows) == 3 and any(r["pareto"] == "True" for r in rows) and (ws / "pareto_latency.png").exists()
    # the report shows the front; the mean-bit Pareto family leaves these plans out
    from mixprec.report import load_workspace
    from mixprec.report.html import latency_section

    html = latency_section(load_workspace(ws))
    assert "pareto_latency.csv" in html and "<img" in html and str(budgets[0]) in html
    assert "overhead per quantized layer not calibrated" in html
    assert not any(r["path"].startswith("plans/latency_") for r in collect_candidates(ws))
    # plans that stage=benchmark timed get their measured latency beside the prediction, and a front
    # of score vs measured latency
    from mixprec.artifacts import read_pareto_latency_csv
    from mixprec.report.data import measured_latency

    rows = read_pareto_latency_csv(ws)
    slow = {r["path"]: 1.5 if i == 0 else 0.98 for i, r in enumerate(rows)}  # the first one misses its budget
    bench = {"plans": {"bf16": {"timing": {"64x1": {"median_ms": full}}}} | {
        str(ws / r["path"]): {"timing": {"64x1": {"median_ms": r["predicted_ms"] * slow[r["path"]]}}} for r in rows}}
    got = measured_latency(rows, ws, bench, "64x1")
    assert [g["error_pct"] for g in got] == pytest.approx([100 * (slow[r["path"]] - 1) for r in rows])
    assert [g["within_budget"] for g in got] == [r["predicted_ms"] * slow[r["path"]] <= r["budget_ms"] for r in rows]
    assert got[0]["within_budget"] is False and any(g["pareto_measured"] for g in got)
    (ws / "benchmark.json").write_text(json.dumps(bench))
    html = latency_section(load_workspace(ws))
    assert "measured_ms" in html and "error_pct" in html
    from mixprec.report.wandb_views import _log_latency  # the same rows go to W&B

    class Tables:
        enabled, logged = False, {}

        def log_table(self, key, cols, table_rows):
            self.logged[key] = [dict(zip(cols, r)) for r in table_rows]

    summary, track = {}, Tables()
    _log_latency(track, load_workspace(ws), summary)
    assert summary == {"latency/plans": 3, "latency/measured": 3, "latency/max_abs_error_pct": pytest.approx(50.0),
                       "latency/within_budget": 2}
    assert [r["measured_ms"] for r in track.logged["latency/plans"]] == [g["measured_ms"] for g in got]
    # the same request gives the same files
    before = (ws / head["plans"][0]["plan"]).read_text()
    run_stage(make_cfg("stage=allocate", f"paths.workspace={ws}", "stage.budget=latency",
                       f"stage.budget_ms={budgets[0]}", "stage.time_limit_s=5"))
    assert (ws / head["plans"][0]["plan"]).read_text() == before


def test_latency_table_stage_writes_and_reuses_its_file(make_cfg, tmp_path):
    args = ("model=tiny_random", "stage=latency_table", "stage.calibration=random", "stage.dtype=float32",
            "stage.iters=2", "stage.warmup=0", "stage.choices=[w8a8]")
    head = run_stage(make_cfg(*args))
    assert head["layers"] > 0 and head["choices"] == [FULL, "w8a8"] and not head["reused"]
    assert run_stage(make_cfg(*args))["reused"]
    assert not run_stage(make_cfg(*args, "stage.choices=[w4a16]"))["reused"]


def test_regional_compile_choice_times_the_model_per_block():
    from mixprec.kernels.regional import DEFAULT_REGIONS
    from mixprec.stages.latency_table import compile_choice

    assert compile_choice("none") == (None, None) and compile_choice("inductor") == ("inductor", None)
    assert compile_choice("regional") == ("inductor", DEFAULT_REGIONS)
    torch.manual_seed(0)
    unet = build_unet("tiny")
    x = denoiser_inputs(unet, 1, seed=3)
    assert model_latency_ms(unet, x, iters=2, warmup=1, compile_backend="eager", regions=DEFAULT_REGIONS) > 0
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and all(type(m).__name__ in DEFAULT_REGIONS for m in compiled)
    torch._dynamo.reset()


def test_interrupted_latency_table_resumes_from_its_partial_file(make_cfg, tmp_path, monkeypatch):
    import mixprec.kernels.latency_table as lt

    args = ("model=tiny_random", "stage=latency_table", "stage.calibration=random", "stage.dtype=float32",
            "stage.iters=1", "stage.warmup=0", "stage.choices=[w8a8]")
    real, calls = lt.time_module, []

    def cut_after_five(*a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt("cut")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lt, "time_module", cut_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_stage(make_cfg(*args))
    ws = next(tmp_path.rglob(artifacts.LAYER_LATENCY_PARTIAL)).parent
    assert not (ws / artifacts.LAYER_LATENCY).exists()  # a cut run leaves no table that looks finished
    assert len(json.loads((ws / artifacts.LAYER_LATENCY_PARTIAL).read_text())["done"]) == 5

    resumed = []
    monkeypatch.setattr(lt, "time_module", lambda *a, **k: resumed.append(1) or real(*a, **k))
    head = run_stage(make_cfg(*args))
    assert head["layers"] > 0 and not head["reused"]
    assert len(resumed) > 0 and not (ws / artifacts.LAYER_LATENCY_PARTIAL).exists()
    # only what the cut run had not measured was measured again: 5 fewer than a fresh run
    fresh = []
    monkeypatch.setattr(lt, "time_module", lambda *a, **k: fresh.append(1) or real(*a, **k))
    run_stage(make_cfg(*args, "stage.force=true"))
    assert len(resumed) == len(fresh) - 5


def test_default_latency_headroom_follows_the_tables_calibration(make_cfg, tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    table = synthetic_table([{"name": c.name, "params": c.params} for c in read_layers(ws / "layers.csv")])
    lt = LatencyTable.from_json(table)
    assert not lt.calibrated and lt.default_headroom == 0.03
    budget = round(lt.model_ms, 3)  # feasible with 5% headroom too
    calibrated = {**table, "quantized_layer_ms": 0.0005,
                  "meta": {**table.get("meta", {}), "calibration": {"measured_ms": 1.0, "predicted_ms": 0.9}}}
    for extra, headroom in [([], 0.01), (["stage.latency_headroom=0.05"], 0.05)]:
        (ws / "layer_latency.json").write_text(json.dumps(calibrated))
        assert LatencyTable.from_json(calibrated).default_headroom == 0.01
        head = run_stage(make_cfg("stage=allocate", f"paths.workspace={ws}", "stage.budget=latency",
                                  f"stage.budget_ms=[{budget}]", "stage.time_limit_s=5", "stage.force=true", *extra))
        wplan = read_plan(ws / head["plans"][0]["plan"])
        assert wplan.header["headroom"] == headroom
        assert wplan.header["predicted_ms"] <= budget * (1 - headroom) + 1e-9
    from mixprec.report import load_workspace
    from mixprec.report.html import latency_section

    html = latency_section(load_workspace(ws))  # the report says how the predictions were made
    assert "overhead per quantized layer calibrated" in html and "each quantized layer adds 0.5 us" in html


def test_latency_budget_as_a_multiple_of_the_16_bit_time(make_cfg, tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    table = synthetic_table([{"name": c.name, "params": c.params} for c in read_layers(ws / "layers.csv")])
    (ws / "layer_latency.json").write_text(json.dumps(table))
    full = LatencyTable.from_json(table).model_ms
    head = run_stage(make_cfg("stage=allocate", f"paths.workspace={ws}", "stage.budget=latency",
                              "stage.budget_ms=[1x,0.97x]", "stage.time_limit_s=5"))
    assert [row["budget_ms"] for row in head["plans"]] == [round(full, 3), round(0.97 * full, 3)]
    for row in head["plans"]:  # "1x": not slower than 16 bit, by the table (with the default 3% headroom)
        assert read_plan(ws / row["plan"]).header["predicted_ms"] <= row["budget_ms"] * 0.97 + 1e-9 <= full
    with pytest.raises(ValueError, match=r"stage.budget_ms: 'fastx' is neither milliseconds nor a multiple"):
        run_stage(make_cfg("stage=allocate", f"paths.workspace={ws}", "stage.budget=latency",
                           "stage.budget_ms=fastx", "stage.time_limit_s=5"))


@pytest.mark.parametrize("solver", ["highs", "cp-sat"])
def test_latency_budget_with_a_weight_byte_cap(make_cfg, tmp_path, solver):
    if solver == "cp-sat":
        pytest.importorskip("ortools")
    from mixprec.search.budget import LayerSizes

    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    census = read_layers(ws / "layers.csv")
    table = synthetic_table([{"name": c.name, "params": c.params} for c in census])
    (ws / "layer_latency.json").write_text(json.dumps(table))
    sizes = LayerSizes.of(census)
    full_mib = sizes.plan_bytes("weight", {c.name: 16 for c in census}) / 2 ** 20
    base = ["stage=allocate", f"paths.workspace={ws}", "stage.budget=latency", "stage.time_limit_s=5",
            f"stage.solver={solver}", "stage.budget_ms=1x"]
    alone = run_stage(make_cfg(*base))["plans"][0]  # the latency budget alone keeps most layers at 16 bits
    alone_mib = sizes.plan_bytes("weight", read_plan(ws / alone["plan"]).bits) / 2 ** 20
    cap = round(0.6 * full_mib, 1)
    assert alone_mib > cap
    head = run_stage(make_cfg(*base, f"stage.budget_mib={cap}"))
    row = head["plans"][0]
    plan = read_plan(ws / row["plan"])
    assert f"ms_{cap:g}mib_" in row["plan"] and row["budget_mib"] == cap
    # both hold: the weights fit the cap (by the one byte count), the prediction the latency budget
    mib = sizes.plan_bytes("weight", plan.bits) / 2 ** 20
    assert mib == pytest.approx(plan.header["mib"]) and mib <= cap
    assert plan.header["predicted_ms"] <= plan.header["budget_ms"] * (1 - plan.header["headroom"]) + 1e-9
    assert plan.header["score"] <= read_plan(ws / alone["plan"]).header["score"] + 1e-9  # a second row costs
    from mixprec.artifacts import read_pareto_latency_csv
    from mixprec.report import load_workspace
    from mixprec.report.html import latency_section

    capped = [r for r in read_pareto_latency_csv(ws) if r["budget_mib"] is not None]
    assert len(capped) == 1 and capped[0]["mib"] == pytest.approx(mib) and capped[0]["path"] == row["plan"]
    assert "budget_mib" in latency_section(load_workspace(ws))
    # a cap below the smallest plan the bit-widths allow, and two caps that cannot hold together
    with pytest.raises(InfeasibleBudgetError, match="is below the smallest plan the allowed bit-widths give"):
        run_stage(make_cfg(*base, "stage.budget_mib=0.01"))
    least_mib = sizes.plan_bytes("weight", {c.name: 4 for c in census}) / 2 ** 20  # the table's narrowest: 4 bits
    with pytest.raises(InfeasibleBudgetError, match=r"and [\d.]+ MiB of weights .*raise stage.budget_ms or stage.budget_mib"):
        run_stage(make_cfg(*base[:-1], "stage.budget_ms=0.97x", f"stage.budget_mib={round(least_mib * 1.01, 2)}"))
