"""Named plan families and stage=benchmark's end-to-end breakdown, on the tiny SDXL-architecture model."""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

from mixprec.kernels.named_plans import SCOPES, parse_plan_name
from mixprec.models.toy import build_unet
from mixprec.quantizers import quantize_
from mixprec.runner import run_stage


def test_plan_names_parse_and_pick_their_layers():
    layers = quantize_(build_unet("tiny"))
    assert parse_plan_name("final") is None and parse_plan_name("plans/x.yaml") is None
    p = parse_plan_name("linear:w8a8:fp8")
    assert (p.scope, p.w_bits, p.a_bits, p.kernel_overrides()) == ("linear", 8, 8, {"w8a8": "fp8"})
    assert parse_plan_name("uniform:w4a16").a_bits is None and parse_plan_name("uniform:w4a16").kernel_overrides() == {}
    assert parse_plan_name("fused:w4a8:fbgemm").kernel_overrides() == {"low_bit": "fbgemm"}
    with pytest.raises(ValueError, match="unknown scope"):
        parse_plan_name("every:w8a8")
    with pytest.raises(ValueError, match="unknown format"):
        parse_plan_name("uniform:w8a8:fp4")
    picked = {s: set(parse_plan_name(f"{s}:w8a8").bits(layers)[0]) for s in SCOPES}
    convs = {n for n, m in layers.items() if isinstance(m.inner, nn.Conv2d)}
    assert picked["uniform"] == set(layers) and picked["conv"] == convs
    assert picked["linear"] == set(layers) - convs
    assert picked["ff"] and all(".ff." in n for n in picked["ff"])
    assert picked["attn"] and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in picked["attn"])
    assert picked["inner"] == set(layers) - {"conv_in", "conv_out"}


def test_benchmark_names_plans_and_splits_the_pipeline_time(make_cfg, tmp_path):
    head = run_stage(make_cfg("model=tiny_random", "prompts.inference.n=2", "stage=benchmark",
                              "stage.calibration=random", "stage.resolutions=[32]", "stage.batch_sizes=[1]",
                              "stage.compile=none", "stage.iters=2", "stage.warmup=0", "stage.end_to_end_repeats=2",
                              "stage.end_to_end_host_profile=5", "stage.end_to_end_trace=true",
                              "stage.plans=[linear:w8a8:fp8,inner:w8a8:int8,fused:w4a8:fbgemm]"))
    plans = head["plans"]
    fp8, int8 = plans["linear:w8a8:fp8"], plans["inner:w8a8:int8"]
    assert fp8["kernels"] == {"w8a8": "fp8"} and set(fp8["dispatch"]["backends"]) == {"fp", "fp8"}
    assert int8["dispatch"]["backends"] == {"fp": 2, "int8": int8["dispatch"]["layers"] - 2}
    w4 = plans["fused:w4a8:fbgemm"]  # 4-bit codes x fp8 activations; on CPU its fp8 reference path
    assert w4["kernels"] == {"low_bit": "fbgemm"} and set(w4["dispatch"]["backends"]) == {"fp", "fp8"}
    assert w4["sqnr_vs_fake_quant_db"] > 100
    # on CPU the kernels run their reference path: the same function as the fake-quant reference
    assert fp8["sqnr_vs_fake_quant_db"] > 100
    e2e = fp8["end_to_end"]
    parts = e2e["breakdown_ms"]
    assert set(parts) == {"total", "text_encoder", "text_encoder_2", "denoiser", "vae_decode", "other"}
    assert all(parts[k]["median_ms"] > 0 for k in ("text_encoder", "text_encoder_2", "denoiser", "vae_decode"))
    for i in range(2):  # each run's components and the rest add up to its wall time
        runs = e2e["runs_ms"]
        assert abs(sum(runs[k][i] for k in parts if k != "total") - runs["total"][i]) < 1e-6
    assert e2e["p10_s"] <= e2e["median_s"] <= e2e["p90_s"] and e2e["steps"] == 2
    profile = e2e["host_profile"]  # one more run under cProfile: the 5 functions with most own time
    assert len(profile) == 5 and profile[0]["own_ms"] >= profile[-1]["own_ms"] > 0
    assert all(p["cumulative_ms"] >= p["own_ms"] and p["calls"] >= 1 for p in profile)
    assert e2e["cuda_graphs"] == {}  # no CUDA here: every component ran eagerly
    # one more run under torch.profiler: its timeline in the workspace, named after the plan
    trace = e2e["trace"]
    assert trace["file"] == "benchmark_traces/linear_w8a8_fp8.json" and trace["wall_ms"] > 0
    assert trace["gpu_busy_ms"] is None  # no GPU here
    events = json.loads((tmp_path / "tiny_random" / trace["file"]).read_text())["traceEvents"]
    assert any(e.get("ph") == "X" and str(e.get("name", "")).startswith("aten::") for e in events)
    assert sorted(p.name for p in (tmp_path / "tiny_random" / "benchmark_traces").iterdir()) == sorted(
        f"{n}.json" for n in (next(iter(plans)), "linear_w8a8_fp8", "inner_w8a8_int8", "fused_w4a8_fbgemm"))
    saved = json.loads((tmp_path / "tiny_random" / "benchmark.json").read_text()) \
        if (tmp_path / "tiny_random" / "benchmark.json").exists() else None
    if saved is not None:
        assert saved["headline"]["settings"]["compile"] == "none"
    assert head["settings"]["plans"] == ["linear:w8a8:fp8", "inner:w8a8:int8", "fused:w4a8:fbgemm"]
    assert head["env"]["torch"]
    # the report's benchmark table: one row per plan, the timing, speedup and end-to-end split
    from mixprec.report import load_workspace
    from mixprec.report.data import benchmark_plan_rows
    from mixprec.report.html import benchmark_section

    rows = benchmark_plan_rows(head)
    assert [r["plan"] for r in rows] == [next(iter(plans)), "linear:w8a8:fp8", "inner:w8a8:int8", "fused:w4a8:fbgemm"]
    assert rows[0]["32x1_speedup"] == 1.0 and rows[1]["32x1_speedup"] == fp8["speedup"]["32x1"]
    assert rows[1]["32x1_ms"] == fp8["timing"]["32x1"]["median_ms"] and rows[1]["weight_mib"] == fp8["weight_mib"]
    assert rows[1]["e2e_denoiser_ms"] == parts["denoiser"]["median_ms"] and "e2e_other_ms" in rows[1]
    html = benchmark_section(load_workspace(tmp_path / "tiny_random"))
    assert "<h3>plans</h3>" in html and "e2e_vae_decode_ms" in html and "fused:w4a8:fbgemm" in html


def test_benchmark_shapes_are_explicit_pairs_or_the_product():
    from dataclasses import replace

    from mixprec.settings import BenchmarkSettings
    from mixprec.stages.benchmark import benchmark_shapes

    product = BenchmarkSettings(name="benchmark", resolutions=[512, 1024], batch_sizes=[1, 4], shapes=None)
    assert benchmark_shapes(product, 64) == [(512, 1), (512, 4), (1024, 1), (1024, 4)]
    assert benchmark_shapes(BenchmarkSettings(name="benchmark", batch_sizes=[2]), 64) == [(64, 2)]
    explicit = replace(product, shapes=["512x1", "1024x1", " 512 x 4 "])
    assert benchmark_shapes(explicit, 64) == [(512, 1), (1024, 1), (512, 4)]
    with pytest.raises(ValueError, match="stage.shapes: '512' is not RESOLUTIONxBATCH"):
        benchmark_shapes(replace(product, shapes=["512"]), 64)


def test_gpu_busy_time_is_the_union_of_kernel_intervals():
    from mixprec.kernels.pipeline_timing import busy_ms

    assert busy_ms([]) == 0.0
    assert busy_ms([(0, 1000)]) == 1.0
    # overlapping kernels on two streams count once; a nested one adds nothing; a gap is idle
    assert busy_ms([(500, 2000), (0, 1000), (600, 700), (3000, 3500)]) == 2.5
    assert busy_ms([(0, 1000), (1000, 1500)]) == 1.5  # touching intervals
