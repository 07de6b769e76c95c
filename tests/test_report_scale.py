"""The report of an SDXL-sized census (794 layers, mixprec.search.synthetic): under 30 s, and readable —
layers grouped by block in the main view, long lists only inside collapsed <details>."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser

import pytest

from mixprec.runner import run_stage
from mixprec.search import Plan, read_plan, write_plan
from mixprec.search.synthetic import write_synthetic_workspace


@pytest.fixture(scope="module")
def sdxl_ws(tmp_path_factory):
    from tests.conftest import compose
    root = write_synthetic_workspace(tmp_path_factory.mktemp("sdxl") / "ws", n_prompts=4)
    base = [f"paths.outputs={root.parent}", "tracking=disabled", "device=cpu", f"paths.workspace={root}",
            "stage=allocate", "stage.pareto=true", "stage.time_limit_s=2"]
    run_stage(compose([*base, "stage.target=[3,4,5]", "stage.K=[1,2]", "stage.seed=[0,1]"]))
    run_stage(compose([*base, "stage.kind=act", "stage.target=[6,7]", "stage.K=[1,2]", "stage.seed=[0]"]))
    # no model to generate selection images with: stand in for the select stage by keeping one candidate per kind
    for kind, rel in (("weight", "plans/weight_4_2/seed0.yaml"), ("act", "plans/act_7_1/seed0.yaml")):
        plan = read_plan(root / rel)
        write_plan(root / f"final_{kind}_mp.yaml", Plan({**plan.header, "selected_from": rel}, plan.bits))
    return root


class _Tables(HTMLParser):
    """Rows of every table, and whether the table sits inside a <details>."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.tables: list[list] = []  # [in_details, rows]
        self.stack: list[list] = []

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.depth += 1
        elif tag == "table":
            t = [self.depth > 0, 0]
            self.tables.append(t)
            self.stack.append(t)
        elif tag == "tr" and self.stack:
            self.stack[-1][1] += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth -= 1
        elif tag == "table" and self.stack:
            self.stack.pop()


def test_794_layer_report_builds_fast_and_stays_readable(sdxl_ws, tmp_path):
    from tests.conftest import compose
    start = time.perf_counter()
    head = run_stage(compose([f"paths.outputs={tmp_path}", "tracking=disabled", "device=cpu",
                              f"paths.workspace={sdxl_ws}", "stage=report"]))
    wall = time.perf_counter() - start
    assert wall < 30, f"report of 794 layers took {wall:.1f} s"
    assert head["layers"] == 794 and head["candidates"] == 12 + 4
    assert head["sections"] == ["run", "census", "sensitivity", "candidates", "allocation"]
    # no model was calibrated here: the page says why there are no comparison images
    assert "quant_params.safetensors is missing" in head["images_note"]
    html = (sdxl_ws / "report.html").read_text()
    assert "794 quantizable layers (743 Linear, 51 Conv2d; 420 content, 374 quality)" in html
    p = _Tables()
    p.feed(html)
    main = [rows for in_details, rows in p.tables if not in_details]
    # main view: at most a block table (11 blocks) and the front / per-block tables; every layer list is collapsed
    assert max(main) <= 40, main
    collapsed = sum(rows for in_details, rows in p.tables if in_details)
    assert collapsed >= 794
    census = html.split('<section id="census"')[1].split("</section>")[0]
    assert census.count("<details>") == 2 * 11  # one per block, one layer list inside each
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 6  # census, 2 sensitivity, Pareto, 2 allocation
    assert head["bytes"] < 5 * 2 ** 20
    rec = json.loads((sdxl_ws / "report.json").read_text())
    assert rec["headline"]["build_s"] < 30
    print(f"794-layer report: {wall:.2f} s wall (page build {rec['headline']['build_s']:.2f} s), "
          f"{head['bytes'] / 2 ** 20:.2f} MiB")
