"""Issue 21, latency budgets on the GPU: does a plan chosen under a measured latency budget run at the
latency the table predicts (within 5%) and within the budget?

In one process (or two: ``--table-only`` then ``--table``): the full-size SDXL UNet with random
weights, calibrated on random inputs (``issue21_matrix.build``), then

1. the per-layer latency table (``mixprec.kernels.latency_table.measure_latency_table``) for
   ``--choices`` on ``--kernels``, each layer compiled by inductor behind a fusable producer and the
   16-bit denoiser compiled per repeated block (``regions``: as ``stage=benchmark
   stage.compile=regional`` and ``issue21_compiled.py`` time plans), written to ``latency_table.json``;
2. for each budget (``--budgets``: fractions of the table's 16-bit time, or ``auto``: between the
   fastest plan the table allows and the 16-bit time), the plan of
   ``mixprec.search.latency.solve_latency`` (HiGHS) with a stand-in quality score per layer (the
   weight's quantization SQNR in dB at each width; activations score alike at every layer): random
   weights have no image quality to rank by, and what is checked here is the latency, not the score;
3. bf16 and every plan converted from the same calibrated UNet, compiled per region, timed as median
   and p10-p90 of CUDA-graph replays, bf16 replayed again after each plan; recorded per plan: predicted
   and measured ms, the error, whether it is within the budget, its SQNR vs bf16, and its layer counts.

    python3 benchmarks/latency_budget_check.py --out $OUT/latency_budget.json           # on the device
    python3 benchmarks/latency_budget_check.py --model tiny --res 64 --compile-backend eager \\
        --kernels '{"w8a8": "int8"}' --choices w16a16,w8a8,w4a16 --out /tmp/lb.json       # CPU dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Clock, write_json  # noqa: E402
from benchmarks.issue21_compiled import Graph, compiled_call, device_info, log  # noqa: E402
from benchmarks.issue21_matrix import build, inputs_for  # noqa: E402
from mixprec.kernels import BackendConfig, convert_, weight_bytes  # noqa: E402
from mixprec.kernels.latency_table import (  # noqa: E402
    LatencyTable, calibrate_overhead, measure_latency_table, parse_choice)
from mixprec.kernels.probing import sqnr_db  # noqa: E402
from mixprec.kernels.regional import UNET_REGIONS  # noqa: E402
from mixprec.quantizers import dequantize_weight, quant_layers, set_plan  # noqa: E402
from mixprec.search.latency import solve_latency  # noqa: E402

MIB = 2 ** 20
DEFAULT_KERNELS = {"w8a8": "fp8", "fp8_weight": "tensor", "fp8_act": "tensor", "low_bit": "fbgemm"}


def weight_score(layers, bits: list[int]) -> dict:
    """``{group: {layer: {bits: dB}}}``: SQNR of each layer's quantized weight (a stand-in score)."""
    from mixprec.search.synthetic import sdxl_census

    try:
        groups = {r.name: r.group for r in sdxl_census()}
    except Exception:  # not an SDXL UNet (dry runs): one group
        groups = {}
    out: dict = {"content": {}, "quality": {}}
    for name, layer in layers.items():
        w = layer.inner.weight.detach().float()
        row = {}
        for b in bits:
            layer.set_bits(b, None)
            codes, scale = layer.weight_codes()
            deq = dequantize_weight(codes.to(w.device), scale.to(w.device), torch.float32).reshape(w.shape)
            row[b] = sqnr_db(w, deq)
        layer.set_bits(None, None)
        layer.drop_cache()
        out[groups.get(name, "quality")][name] = row
    return out


def budget_fractions(table: LatencyTable, choices: list[str], spec: str, headroom: float = 0.0) -> list[float]:
    """``spec``: comma-separated fractions of the table's 16-bit time, or ``auto``: a quarter, half and
    three quarters of the way from the smallest budget the table allows (each layer at its fastest
    choice, plus the headroom) to the 16-bit time, so each budget is feasible and binds."""
    if spec != "auto":
        return [float(f) for f in spec.split(",")]
    lo = table.fastest_ms(choices) / (1.0 - headroom) / table.model_ms
    return [round(lo + (1.0 - lo) * q, 4) for q in (0.75, 0.5, 0.25)]


def choose_plans(table: LatencyTable, layers, args) -> list[dict]:
    keys = [c for c in args.choices.split(",") if c != "w16a16"]
    wbits = sorted({w for w, _ in map(parse_choice, keys) if w})
    abits = sorted({a for _, a in map(parse_choice, keys) if a})
    score = weight_score(layers, wbits)
    groups = {l: g for g, rows in score.items() for l in rows}
    act = {g: {l: {b: 40.0 for b in abits} for l in rows} for g, rows in score.items()} if abits else None
    bits = {g: tuple(wbits) for g in ("content", "quality")}
    abit = {g: tuple(abits) for g in ("content", "quality")} if abits else None
    plans = []
    for frac in budget_fractions(table, keys, args.budgets, args.headroom):
        budget = frac * table.model_ms
        rec = {"budget_fraction": frac, "budget_ms": budget}
        try:
            sol = solve_latency(score, act, groups, table.plan_ms, table.rest_ms, budget, weight_bits=bits, act_bits=abit,
                                solver=args.solver, time_limit_s=20, headroom=args.headroom)
            rec.update(predicted_ms=sol.predicted_ms, headroom=args.headroom, weight_bits=sol.weight_bits, act_bits=sol.act_bits,
                       choices=dict(Counter(f"w{sol.weight_bits[l]}a{sol.act_bits[l]}" for l in groups)))
        except Exception as exc:  # infeasible budget: recorded, the others go on
            rec["error"] = repr(exc)[:400]
        plans.append(rec)
    return plans


def write_plan_yamls(folder: Path, plans: list[dict], table_ms: float) -> None:
    """Each solved plan as the weight + activation YAML pair ``stage=allocate stage.budget=latency``
    writes (kind ``latency``), so ``stage=benchmark stage.plans=[<weight YAML>]`` runs it."""
    from mixprec.search.plan import Plan, write_plan

    for plan in (p for p in plans if "weight_bits" in p):
        header = {"kind": "latency", "budget": "latency", "budget_ms": plan["budget_ms"], "target": plan["budget_ms"],
                  "predicted_ms": plan["predicted_ms"], "headroom": plan.get("headroom", 0.0),
                  "latency_table": {"model_ms": table_ms}, "source": "benchmarks/latency_budget_check.py"}
        name = f"latency_{plan['budget_ms']:.3f}ms"
        write_plan(folder / f"{name}_act.yaml", Plan(header=dict(header, part="act"), bits=dict(plan["act_bits"])))
        write_plan(folder / f"{name}.yaml", Plan(header=dict(header, part="weight", act_plan=f"{name}_act.yaml"),
                                                 bits=dict(plan["weight_bits"])))


def time_plan(name: str, unet, x: dict, plan: dict | None, cfg: BackendConfig, state: dict, args, clock) -> dict:
    """Convert a copy of ``unet`` to ``plan`` (None: bf16), compile per region, time; vs bf16."""
    rec: dict = {}
    model = copy.deepcopy(unet)
    qlayers = quant_layers(model)
    if plan is None:
        set_plan(qlayers)
        report = convert_(model, cfg)
    else:
        w = {l: (None if b >= 16 else b) for l, b in plan["weight_bits"].items()}
        a = {l: (None if b >= 16 else b) for l, b in plan["act_bits"].items()}
        set_plan(qlayers, w, a)
        report = convert_(model, cfg)
    rec["dispatch"] = report.summary()
    rec["weight_mib"] = weight_bytes(model) / MIB
    model = model.to(memory_format=torch.channels_last).requires_grad_(False)
    call, y, rec["compile_s"] = compiled_call(model, x, "regional", args.compile_backend, list(UNET_REGIONS))
    graph = Graph(call)
    rec["timing"] = graph.time(args.iters, args.warmup)
    if plan is None:
        state["graph"], state["y"] = graph, y
    else:
        rec["sqnr_vs_bf16_db"] = sqnr_db(state["y"], y)
        rec["bf16_again"] = state["graph"].time(args.iters, args.warmup)
        measured = rec["timing"]["median_ms"]
        rec["predicted_ms"] = plan["predicted_ms"]
        rec["error_pct"] = 100.0 * (measured - plan["predicted_ms"]) / plan["predicted_ms"]
        rec["within_5pct"] = abs(rec["error_pct"]) <= 5.0
        rec["within_budget"] = measured <= plan["budget_ms"]
        rec["speedup_vs_bf16"] = state["bf16_ms"] / measured
    log(f"{name}: {rec['timing']['median_ms']:.3f} ms (p10 {rec['timing']['p10_ms']:.3f}, p90 "
        f"{rec['timing']['p90_ms']:.3f})" + ("" if plan is None else
        f", predicted {plan['predicted_ms']:.3f} ms ({rec['error_pct']:+.1f}%), budget {plan['budget_ms']:.3f} ms, "
        f"SQNR vs bf16 {rec['sqnr_vs_bf16_db']:.2f} dB"), clock)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sdxl")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--choices", default="w16a16,w8a8,w4a8")
    ap.add_argument("--kernels", default=json.dumps(DEFAULT_KERNELS), help="BackendConfig options (JSON)")
    ap.add_argument("--budgets", default="auto", help="fractions of the table's 16-bit time, or auto "
                    "(1/4, 1/2, 3/4 of the way from the fastest plan the table allows to the 16-bit time)")
    ap.add_argument("--solver", default="highs")
    ap.add_argument("--headroom", type=float, default=None, help="fraction of each budget the prediction keeps "
                    "free (default: 0.01 with a calibrated table, else 0.03: LatencyTable.default_headroom)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--table-iters", type=int, default=20)
    ap.add_argument("--table", default=None, help="a latency_table.json written earlier (skips step 1)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="time the table's fastest plan as a whole first and predict with the overhead per "
                         "quantized layer it shows (LatencyTable.quantized_layer_ms; stage=latency_table's "
                         "default too); --no-calibrate predicts from the layers alone")
    ap.add_argument("--partial", default=None, help="latency_table.partial.json of a cut call: resume the table")
    ap.add_argument("--budget", type=float, default=540, help="seconds: plans start while they fit")
    ap.add_argument("--write-plans", default=None, help="folder for each plan's weight + activation YAML")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    clock = Clock(args.budget)
    out: dict = {"env": device_info(), "args": vars(args), "status": "running"}
    cfg = BackendConfig.from_mapping({**json.loads(args.kernels), "cpu": "emulate"})
    try:
        unet, layers = build(args.model, args.res)
        x = inputs_for(unet, args.res, args.batch)
        log("built", clock)
        if args.table:
            table = LatencyTable.from_json(json.loads(Path(args.table).read_text()), args.table)
        else:
            tmodel = copy.deepcopy(unet)  # compiled per region in place by the table: not the one plans copy
            tl = quant_layers(tmodel)
            set_plan(tl)
            # resumable: every measured geometry goes to the partial file (a cut call leaves it in $OUT;
            # pass it back with --partial and the next call measures only what is missing)
            part_out = Path(args.out).with_name("latency_table.partial.json") if args.out else None
            done = json.loads(Path(args.partial).read_text()) if args.partial else {}
            if done:
                log(f"resuming the table: {len(done)} measurements from {args.partial}", clock)

            def measured(d):
                write_json(part_out, d)
                if len(d) % 10 == 0:
                    log(f"table: {len(d)} geometry x choice measurements", clock)

            table = measure_latency_table(tmodel, tl, x, args.choices.split(","), cfg, args.table_iters, 3,
                                          meta={"res": args.res, "batch": args.batch},
                                          compile_backend=args.compile_backend, regions=UNET_REGIONS,
                                          done=done, on_measured=measured, calibrate=args.calibrate)
            del tmodel, tl
            torch._dynamo.reset()
            if args.out:
                write_json(Path(args.out).with_name("latency_table.json"), table.to_json())
        if args.calibrate and "calibration" not in table.meta:  # a table read from a file
            table = calibrate_overhead(table, copy.deepcopy(unet), x, cfg, args.table_iters, 3, args.compile_backend,
                                       UNET_REGIONS)
            torch._dynamo.reset()
        if "calibration" in table.meta:
            log(f"calibration: {table.meta['calibration']}", clock)
        if args.headroom is None:
            args.headroom = table.default_headroom
        out["table"] = {"model_ms": table.model_ms, "rest_ms": table.rest_ms, "layers": len(table.ms),
                        "quantized_layer_ms": table.quantized_layer_ms, "calibration": table.meta.get("calibration"),
                        "measure_s": table.meta.get("measure_s"), "uniform_predicted_ms": table.uniform_ms()}
        log(f"table: 16-bit {table.model_ms:.3f} ms, {table.rest_ms:.3f} outside the layers, "
            f"{out['table']['uniform_predicted_ms']}", clock)
        write_json(args.out, out)
        if args.table_only:
            out["status"] = "done"
            return
        out["plans"] = choose_plans(table, layers, args)
        if args.write_plans:
            write_plan_yamls(Path(args.write_plans), out["plans"], table.model_ms)
        write_json(args.out, out)
        state: dict = {}
        out["bf16"] = time_plan("bf16", unet, x, None, cfg, state, args, clock)
        state["bf16_ms"] = out["bf16"]["timing"]["median_ms"]
        out["table"]["bf16_measured_vs_table_pct"] = 100 * (state["bf16_ms"] - table.model_ms) / table.model_ms
        write_json(args.out, out)
        per_plan = max(60.0, out["bf16"]["compile_s"] * 2 + 20)
        for i, plan in enumerate(out["plans"]):
            if "error" in plan:
                continue
            if clock.left() < per_plan:
                plan["skipped"] = f"time budget: {clock.left():.0f}s left, ~{per_plan:.0f}s predicted"
                continue
            try:
                plan["measured"] = time_plan(f"budget {plan['budget_ms']:.3f} ms", unet, x, plan, cfg, state, args,
                                             clock)
            except Exception as exc:
                traceback.print_exc()
                plan["error"] = repr(exc)[:400]
            write_json(args.out, out)
        out["status"] = "done"
    finally:
        out["elapsed_s"] = clock.elapsed()
        write_json(args.out, out)


if __name__ == "__main__":
    main()
