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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
