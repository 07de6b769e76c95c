"""Shared fixtures: compose the real Hydra config with overrides, in a temporary workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# One thread: the tiny models are too small to gain from more, and CI shares its two cores.
torch.set_num_threads(1)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides) -> composed config writing into tmp_path, tracking off, on CPU."""

    def _make(*overrides: str, outputs: Path | None = None):
        base = [f"paths.outputs={outputs or tmp_path}", "tracking=disabled", "device=cpu"]
        return compose(base + list(overrides))

    return _make


# The small tiny_random pipeline that tests/test_pipeline.py and tests/test_report.py read: run once per
# session; each module works on its own copy (a copied workspace is up to date: its stages skip).
PIPELINE_PROMPTS = ["model=tiny_random", "prompts.calibration.n=3", "prompts.sensitivity.n=3",
                    "prompts.selection.n=4", "prompts.inference.n=4"]
PIPELINE_SMALL = [*PIPELINE_PROMPTS, "stage.sensitivity.progress=false", "stage.select.progress=false",
                  "stage.allocate_weight.target=[4,5]", "stage.allocate_weight.seed=[0,1]",
                  "stage.allocate_act.target=[7]", "stage.allocate_act.seed=[0,1]",
                  "stage.select.refine.evaluations=3"]


@pytest.fixture(scope="session")
def _pristine_pipeline(tmp_path_factory):
    from mixprec.runner import run_stage

    out = tmp_path_factory.mktemp("pipeline_pristine")
    head = run_stage(compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", *PIPELINE_SMALL]))
    return out / "tiny_random", head


@pytest.fixture(scope="module")
def pipeline_copy(_pristine_pipeline, tmp_path_factory):
    """(outputs folder holding tiny_random/, the pipeline's head record): this module's own copy of the
    session's pipeline run, so a module that writes into it changes nothing another module reads."""
    import copy
    import shutil

    ws, head = _pristine_pipeline
    out = tmp_path_factory.mktemp("pipe")
    shutil.copytree(ws, out / "tiny_random")
    return out, copy.deepcopy(head)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def calibrated_tiny_unet(w_bits: int, a_bits: int, **calibrate_kwargs):
    """(unet, layers, probe input): the tiny UNet built under seed 0, calibrated on two random batch-1
    inputs (``calibrate_kwargs`` go to ``calibrate_random``, e.g. ``weight_bits=(4,)``), a uniform
    W{w_bits}A{a_bits} plan set on every layer, and a batch-1 input of seed 5 - the set-up the
    kernel-path tests share."""
    import torch

    from mixprec.kernels.probing import calibrate_random, denoiser_inputs, uniform_plan
    from mixprec.models.toy import build_unet
    from mixprec.quantizers import set_plan

    torch.manual_seed(0)
    unet = build_unet("tiny")
    calib = [denoiser_inputs(unet, 1, seed=s) for s in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], **calibrate_kwargs)
    set_plan(layers, *uniform_plan(layers, w_bits, a_bits))
    return unet, layers, denoiser_inputs(unet, 1, seed=5)
