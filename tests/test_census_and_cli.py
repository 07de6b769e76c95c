import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from mixprec.models import census, build_random_denoiser, measure_act_elems, layer_group
from mixprec.runner import run_stage


def test_sdxl_census_matches_the_published_numbers():
    start = time.perf_counter()
    unet = build_random_denoiser("sdxl", device="meta")
    rows = census(unet, ["attn2", "ff"], act_elems=measure_act_elems(unet, 64, 77))
    assert len(rows) == 794
    assert sum(r.type == "Linear" for r in rows) == 743
    assert sum(r.type == "Conv2d" for r in rows) == 51
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(r.group == "content" for r in rows) == 420
    by_name = {r.name: r for r in rows}
    # 512x512: 64x64 latent; the first transformer block of down_blocks.1 sees 32x32 tokens of 640 channels.
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].act_elems == 1024 * 640
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].act_elems == 77 * 2048
    assert time.perf_counter() - start < 30


def test_group_patterns_match_whole_components():
    assert layer_group("up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", ["attn2", "ff"]) == "content"
    assert layer_group("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", ["attn2", "ff"]) == "content"
    assert layer_group("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", ["attn2", "ff"]) == "quality"
    assert layer_group("diff.layer", ["attn2", "ff"]) == "quality"


def test_inspect_stage_writes_census(make_cfg):
    cfg = make_cfg("model=tiny_random", "stage=inspect", "model.exclude_patterns=[conv_in]")
    head = run_stage(cfg)
    assert head["layers"] == 85 and head["excluded"] == 1
    assert head["content"] + head["quality"] == 84


def _run(*args):
    return subprocess.run([sys.executable, "run.py", *args, "tracking=disabled", "hydra.run.dir=/tmp/mixprec_hydra"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_inspect_sdxl_random(tmp_path):
    r = _run("stage=inspect", "model=sdxl_turbo", "model.weights=random", f"paths.outputs={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "794 layers (743 Linear, 51 Conv2d)" in r.stdout
    assert (tmp_path / "sdxl_turbo" / "layers.csv").exists()


@pytest.mark.parametrize("args,message", [
    (["stage=nope"], "Could not find 'stage/nope'"),
    (["model=nope"], "Could not find 'model/nope'"),
    (["stage=sensitivity", "model=tiny_random"], "stage=calibrate"),
    (["stage=inspect", "model=sdxl_turbo", "model.weights=maybe"], "model.weights must be"),
    (["stage=calibrate", "model=tiny_random", "quant.weight_bits_by_group.content=[3]"], "does not calibrate"),
])
def test_cli_bad_input_gets_a_clear_error(tmp_path, args, message):
    r = _run(*args, f"paths.outputs={tmp_path}")
    assert r.returncode != 0
    assert message in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
