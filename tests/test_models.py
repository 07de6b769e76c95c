"""Model loading: the Python API without Hydra, offline behaviour and clear errors."""

import time

import pytest
import torch

from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.models import ModelSpec, build_random_denoiser, census, load_pipeline
from mixprec.quantizers import quantize_, set_plan


def test_api_without_hydra_load_calibrate_plan_generate():
    spec = ModelSpec.from_dict({"name": "tiny_random", "source": "tiny_random",
                                "arch": {"image_size": 32, "unet": {"block_out_channels": [8, 16],
                                         "attention_head_dim": [2, 2], "norm_num_groups": 4}}})
    pipe = load_pipeline(spec)
    layers = quantize_(pipe.unet)
    sampler = Sampler(pipe, resolution=32, num_inference_steps=2)
    prompts, seeds = ["a red circle on a blue background", "a green square on a white background"], [0, 1]
    calibrate_layers(layers, lambda: sampler.generate(prompts, seeds, decode=False), weight_bits=[2, 4, 8], act_bits=[8])
    fp = sampler.generate(prompts, seeds).images
    assert torch.equal(fp, sampler.generate(prompts, seeds).images)  # same prompt and seed, same image
    set_plan(layers, weight_bits={n: 8 for n in layers}, act_bits={n: 8 for n in layers})
    q8 = sampler.generate(prompts, seeds).images
    set_plan(layers, weight_bits={n: 2 for n in layers})
    q2 = sampler.generate(prompts, seeds).images
    err8, err2 = (q8 - fp).pow(2).mean(), (q2 - fp).pow(2).mean()
    assert 0 < err8 < err2
    assert fp.shape == (2, 3, 32, 32) and 0 <= float(fp.min()) and float(fp.max()) <= 1


def test_sd_turbo_architecture_census():
    unet = build_random_denoiser("sd", device="meta")
    rows = census(unet, ["attn2", "ff"])
    assert sum(r.group == "content" for r in rows) == 16 * 6  # 16 transformer blocks in SD 2.1
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724


def test_hub_model_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = ModelSpec.from_dict({"name": "sdxl_turbo", "source": "diffusers", "hub_id": "stabilityai/sdxl-turbo"})
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE is set.*model.path=<folder>"):
        load_pipeline(spec)


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    spec = ModelSpec.from_dict({"name": "mine", "source": "diffusers", "path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(spec)


def test_unknown_model_options_are_refused():
    with pytest.raises(ValueError, match="unknown model option"):
        ModelSpec.from_dict({"name": "x", "source": "tiny_random", "resolutoin": 64})
    with pytest.raises(ValueError, match="model.source must be one of"):
        ModelSpec.from_dict({"name": "x", "source": "somewhere"})


def _read_or_empty(reader, run_dir) -> dict:
    try:
        return reader(run_dir)
    except Exception:  # a file still being written may end in a partial record
        return {}


def test_a_failing_stage_still_finishes_its_wandb_run_as_failed(make_cfg, monkeypatch, tmp_path):
    from mixprec.report.wandb_views import read_offline_run
    from mixprec.runner import run_stage
    from mixprec.workspace import MissingArtifactError

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    cfg = make_cfg("model=tiny_random", "stage=sensitivity", "tracking=offline", "tracking.group=failing")
    with pytest.raises(MissingArtifactError):
        run_stage(cfg)
    dirs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 1
    # W&B's service process may still be writing the offline file when finish() returns on a busy
    # machine: read until its exit record is there (or give up after a minute).
    deadline = time.time() + 60
    while "exit_code" not in (run := _read_or_empty(read_offline_run, dirs[0])) and time.time() < deadline:
        time.sleep(0.5)
    assert "exit_code" in run, f"{dirs[0]} holds no finished run record after a minute"
    runs = [run]
    assert runs[0]["job_type"] == "sensitivity" and runs[0]["group"] == "failing"
    assert runs[0]["exit_code"] == 1


def test_sd_turbo_structure_runs_the_whole_pipeline(make_cfg, tmp_path):
    import json

    from mixprec.runner import run_stage

    head = run_stage(make_cfg("model=tiny_sd_random", "prompts.calibration.n=2", "prompts.sensitivity.n=2",
                              "prompts.selection.n=2", "prompts.inference.n=2", "stage.sensitivity.progress=false",
                              "stage.select.progress=false", "stage.allocate_weight.target=[4,5]",
                              "stage.allocate_weight.seed=[0]", "stage.allocate_act.seed=[0]", "stage.report.images=false",
                              "stage.select.refine.evaluations=2"))
    assert set(head["stages"].values()) == {"ran"}
    ws = tmp_path / "tiny_sd_random"
    census = (ws / "layers.csv").read_text().splitlines()
    assert any(",content," in row and ".attn2.to_k," in row for row in census)
    assert not any(row.startswith("add_embedding") for row in census)  # no SDXL added conditioning
    infer = json.loads((ws / "infer.json").read_text())["headline"]
    assert infer["images"] == 2 and infer["weights"]["compression"] > 2.5


def test_full_size_random_weights_are_identified_by_the_device_they_are_drawn_on(make_cfg):
    """The same seed draws other weights on CPU than on CUDA: a workspace calibrated on one must not
    pass for the other."""
    from mixprec.context import fingerprints

    cpu = fingerprints(make_cfg("model=sdxl_turbo", "model.weights=random"))
    cuda = fingerprints(make_cfg("model=sdxl_turbo", "model.weights=random", "device=cuda:1"))
    assert cpu["model"] != cuda["model"] and cpu["quant"] != cuda["quant"]
    # built on CPU from the seed whatever the device: one identity
    assert fingerprints(make_cfg("model=tiny_random"))["model"] == \
        fingerprints(make_cfg("model=tiny_random", "device=cuda"))["model"]
