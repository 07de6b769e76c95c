"""stage=report on the tiny_random pipeline: sections, comparison images, caching, compare mode, and
the page rendered by a real headless browser (skipped where no Chromium is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mixprec.report import build_compare, build_report, load_workspace
from mixprec.runner import run_stage
from tests.conftest import PIPELINE_PROMPTS as PROMPTS

SECTIONS = ["run", "census", "sensitivity", "candidates", "allocation", "images"]
VARIANTS = ["full_precision", "mixed_w", "uniform_w4", "mixed_wa", "uniform_w4a7"]


def _base(out) -> list[str]:
    return [f"paths.outputs={out}", "tracking=disabled", "device=cpu"]


@pytest.fixture(scope="module")
def tiny(pipeline_copy):
    out, head = pipeline_copy
    return out, out / "tiny_random", head


def _sections(html: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)"', html)


def test_pipeline_ends_with_a_self_contained_report(tiny):
    _, ws, head = tiny
    assert head["stages"]["report"] == "ran"
    rec = json.loads((ws / "report.json").read_text())["headline"]
    assert rec["sections"] == SECTIONS and rec["build_s"] < 30
    html = (ws / "report.html").read_text()
    assert _sections(html) == SECTIONS
    # opens offline: every src/href is embedded data or an in-page anchor, no scripts
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html) and "<script" not in html
    assert len(re.findall(r'src="data:image/(?:png|jpeg);base64,', html)) >= 5 * 4 + 5
    data = load_workspace(ws)
    # the census is grouped: one row per block in the main table, the layers inside <details>
    assert f"{len(data.quantizable)} quantizable layers" in html
    n_plans = len(list(ws.glob("plans/*/seed*.yaml")))
    assert f"all {n_plans} candidates" in html
    # the two kept plans are highlighted in the front table
    chosen = {k: yaml.safe_load((ws / f"final_{k}_mp.yaml").read_text())["header"]["selected_from"]
              for k in ("weight", "act")}
    front_table = html.split("<h3>Front and selected plans</h3>")[1].split("</table>")[0]
    assert re.findall(r'<tr class="hl">.*?<td class="">(plans/[^<]+)</td>', front_table) == \
        [chosen["weight"], chosen["act"]]


def test_comparison_images_are_uniform_at_the_same_budget(tiny):
    _, ws, _ = tiny
    m = json.loads((ws / "report" / "images.json").read_text())
    assert [v["key"] for v in m["variants"]] == VARIANTS
    assert len(m["prompts"]) == 4 and all(len(v["files"]) == 4 for v in m["variants"])
    assert all((ws / f).exists() for v in m["variants"] for f in v["files"])
    v = {x["key"]: x for x in m["variants"]}
    weight = yaml.safe_load((ws / "final_weight_mp.yaml").read_text())
    act = yaml.safe_load((ws / "final_act_mp.yaml").read_text())
    # the mixed variants are the final plans: their mean bits are what the plan headers say
    assert v["mixed_w"]["weight_mean_bits"] == pytest.approx(weight["header"]["achieved_mean_bits"]["overall"], abs=1e-6)
    assert v["mixed_wa"]["act_mean_bits"] == pytest.approx(act["header"]["achieved_mean_bits"]["overall"], abs=1e-6)
    # uniform at the target, same protected layers in full precision, and no bigger than the plan's budget allows
    assert v["uniform_w4"]["weight_mean_bits"] == 4.0 and v["uniform_w4a7"]["act_mean_bits"] == 7.0
    assert v["uniform_w4a7"]["act_fp_layers"] == v["mixed_wa"]["act_fp_layers"] == sum(
        b == 16 for b in act["bits"].values())
    assert v["uniform_w4"]["weight_mib"] == pytest.approx(v["mixed_w"]["weight_mib"], rel=0.05)
    assert v["full_precision"]["weight_mean_bits"] is None  # nothing quantized
    for key in VARIANTS[1:]:
        s = v[key]["scores"]
        assert 10 < s["psnr_db"] < 100 and 0 < s["ssim"] <= 1 and s["mse"] > 0
        assert len(v[key]["per_image"]["psnr_db"]) == 4
    # the page shows the measured per-image PSNR under each image
    html = (ws / "report.html").read_text()
    first = v["uniform_w4a7"]["per_image"]["psnr_db"][0]
    assert f"PSNR {first:.3g} dB" in html


def test_images_are_reused_until_a_plan_changes(tiny, tmp_path):
    from tests.conftest import compose
    out, ws, _ = tiny
    manifest = (ws / "report" / "images.json").read_bytes()
    head = run_stage(compose([*_base(out), *PROMPTS, "stage=report"]))
    assert (ws / "report" / "images.json").read_bytes() == manifest
    assert head["images_s"] < 1.0 and head["sections"] == SECTIONS
    # another final weight plan -> the images of every variant that uses it are made again
    copy = tmp_path / "tiny_random"
    shutil.copytree(ws, copy)
    plan = yaml.safe_load((copy / "final_weight_mp.yaml").read_text())
    name = next(n for n, b in plan["bits"].items() if b == 4)
    plan["bits"][name] = 8
    (copy / "final_weight_mp.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    run_stage(compose([*_base(tmp_path), *PROMPTS, "stage=report"]))
    m = json.loads((copy / "report" / "images.json").read_text())
    assert m["key"] != json.loads(manifest)["key"]
    assert {x["key"]: x for x in m["variants"]}["mixed_w"]["weight_mean_bits"] > \
        {x["key"]: x for x in json.loads(manifest)["variants"]}["mixed_w"]["weight_mean_bits"]


def test_sections_appear_only_with_their_artifacts(tiny, tmp_path):
    _, ws, _ = tiny
    part = tmp_path / "part"
    part.mkdir()
    for name in ("layers.csv", "sensitivity_w_content.yaml", "sensitivity_w_quality.yaml", "sensitivity.json"):
        shutil.copy(ws / name, part / name)
    r = build_report(part)
    assert r.sections == ["run", "census", "sensitivity"]
    html = r.path.read_text()
    assert "Weights" in html and "<h3>Activations</h3>" not in html  # only weight tables were copied
    # evaluate.json and benchmark.json in the layouts their stages write: the ablation and benchmark sections
    from mixprec.stages.evaluate import markdown
    rows = [{"point": "W4A8", "method": m, "weight_mean_bits": 4.0, "act_mean_bits": 8.0, "candidates": 1,
             "scores": {"ssim": {"mean": s, "std": 0.01, "values": [s]}, "psnr_db": {"mean": p, "std": 0.5,
                                                                                      "values": [p]}}}
            for m, s, p in (("uniform", 0.91, 24.0), ("decoupled", 0.93, 25.5))]
    (part / "evaluate.json").write_text(json.dumps({"stage": "evaluate", "wall_time_s": 1.0, "headline": {
        "rows": rows, "full_precision_adherence": None, "seed_sets": 1, "evaluation_images_per_seed_set": 4}}))
    (part / "evaluate.md").write_text(markdown(rows, None))
    (part / "benchmark.json").write_text(json.dumps({"stage": "benchmark", "wall_time_s": 1.0, "headline": {
        "device": "test", "results": [{"variant": "bf16", "median_ms": 10.0}, {"variant": "mixed", "median_ms": 7.5}]}}))
    r = build_report(part)
    assert r.sections == ["run", "census", "sensitivity", "ablation", "benchmark"]
    html = r.path.read_text()
    assert "0.93 ± 0.01" in html and "decoupled" in html and ">7.5<" in html and ">mixed<" in html
    # without the report's own comparison images, the infer stage's images (full precision vs final plans)
    shutil.copytree(ws / "generated_images", part / "generated_images")
    shutil.copy(ws / "infer.json", part / "infer.json")
    r = build_report(part, images_note="comparison images off")
    assert "images" in r.sections
    images = r.path.read_text().split('<section id="images"')[1].split("</section>")[0]
    n = len(list((ws / "generated_images").glob("*.png")))
    assert images.count('alt="full precision"') == images.count('alt="final plans"') == n
    psnr = json.loads((ws / "infer.json").read_text())["headline"]["per_image"]["psnr_db"][0]
    assert f"PSNR {psnr:.3g} dB" in images and "comparison images off" in r.path.read_text()


def test_compare_mode_puts_two_workspaces_on_one_page(tiny, tmp_path):
    from tests.conftest import compose
    out, ws, _ = tiny
    other = tmp_path / "b" / "tiny_random"
    shutil.copytree(ws, other)
    for p in other.glob("plans/weight_5_*"):
        shutil.rmtree(p)  # a sweep over fewer targets: pareto.csv no longer lists every plan, so the front is recomputed
    cmp_ws = tmp_path / "cmp"
    head = run_stage(compose([*_base(tmp_path), *PROMPTS, "stage=report", f"paths.workspace={cmp_ws}",
                              f"stage.compare=[{ws},{other}]"]))
    assert head["sections"][:3] == ["workspaces", "fronts", "finals"]
    html = (cmp_ws / "compare.html").read_text()
    a, b = load_workspace(ws), load_workspace(other)
    wa = [c for c in a.candidates if c["kind"] == "weight"]
    wb = [c for c in b.candidates if c["kind"] == "weight"]
    assert len(wb) < len(wa)
    assert f"{len(wa)} / {sum(c['pareto'] for c in wa)}" in html and f"{len(wb)} / {sum(c['pareto'] for c in wb)}" in html
    # the finals are the same files: every layer agrees
    assert re.search(r"weight</td><td class=\"num\">\d+</td><td class=\"num\">1</td>", html)
    with pytest.raises(ValueError, match="at least two"):
        build_compare([ws], tmp_path / "x.html")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_compare([ws, tmp_path / "nowhere"], tmp_path / "x.html")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = {images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    sections: [...document.querySelectorAll('section')].map(s => ({id: s.id, images: s.querySelectorAll('img').length,
      height: s.getBoundingClientRect().height}))};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(tiny, tmp_path):
    _, ws, _ = tiny
    # the report has no scripts of its own: a copy gets one that reports what the browser laid out and decoded
    probe = tmp_path / "probe.html"
    probe.write_text((ws / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    r = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">([^<]*)</pre>', r.stdout)
    assert found, r.stderr[-2000:]
    got = json.loads(found.group(1))
    assert [s["id"] for s in got["sections"]] == SECTIONS
    assert got["images"] == got["decoded"] >= 5 * 4 + 5  # every embedded image decoded
    assert all(s["height"] > 100 for s in got["sections"])
    per = {s["id"]: s["images"] for s in got["sections"]}
    assert per["images"] == 5 * 4 and per["sensitivity"] == 2 and per["allocation"] == 2
    # and a screenshot of the page itself is not blank
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1400,4000",
              (ws / "report.html").as_uri())
    from PIL import Image, ImageStat
    im = Image.open(shot).convert("L")
    assert im.size == (1400, 4000) and ImageStat.Stat(im).stddev[0] > 20


def test_final_plans_are_priced_by_the_latency_table(tiny, tmp_path):
    from mixprec.report.data import final_plan_latency
    from mixprec.report.html import _latency_table_note, allocation_section

    _, ws, _ = tiny
    part = tmp_path / "ws"
    shutil.copytree(ws, part, ignore=shutil.ignore_patterns("generated_images", "report*"))
    d = load_workspace(part)
    assert final_plan_latency(d) is None  # no latency table: nothing to say
    weight, act = d.finals["weight"].bits, d.finals["act"].bits
    keys = [f"w{w}a{a}" for w in range(2, 17) for a in range(2, 17)]
    # every quantized choice at 0.9 of the layer's 16-bit time: the plan is predicted faster
    table = {"model_ms": 10.0, "meta": {"settings": {"resolution": 32, "batch_size": 1}},
             "ms": {n: {k: 0.01 if k == "w16a16" else 0.009 for k in keys} for n in weight}}
    (part / "layer_latency.json").write_text(json.dumps(table))
    quantized = sum(1 for n in weight if weight[n] < 16 or act.get(n, 16) < 16)
    lat = final_plan_latency(load_workspace(part))
    assert lat["predicted_ms"] == pytest.approx(10.0 - 0.001 * quantized) and not lat["slower_than_16bit"]
    html = allocation_section(load_workspace(part), {})
    assert "Latency table at 32x1 (uncalibrated): the final plans predicted" in html and "not slower than 16 bit" in html
    # quantized choices slower than 16 bit: the report says so, and what keeps a plan under it
    table["ms"] = {n: {k: 0.01 if k == "w16a16" else 0.02 for k in keys} for n in weight}
    (part / "layer_latency.json").write_text(json.dumps(table))
    html = allocation_section(load_workspace(part), {})
    assert "<strong>slower than 16 bit</strong>" in html and "stage.budget=latency" in html
    # a table without the plan's bit-widths cannot price it, and says which is missing
    table["ms"] = {n: {"w16a16": 0.01, "w8a8": 0.009} for n in weight}
    (part / "layer_latency.json").write_text(json.dumps(table))
    assert "rerun stage=latency_table" in final_plan_latency(load_workspace(part))["error"]
    assert "cannot predict the final plans" in allocation_section(load_workspace(part), {})
    # a table file that is not JSON (a cut write): the final plans are unpriced with the parser's reason,
    # and the latency section's note is left out instead of failing the report
    (part / "layer_latency.json").write_text('{"model_ms": 10.0, "ms": {')
    d = load_workspace(part)
    assert "Expecting" in final_plan_latency(d)["error"]
    assert _latency_table_note(d) == ""
