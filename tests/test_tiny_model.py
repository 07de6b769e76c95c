"""The tiny model: building, the committed weights (offline load, images, adherence), training resume."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from mixprec.tiny import shapes
from mixprec.models.toy import MICRO_ARCH
from mixprec.models.toy import build_tiny_sdxl_pipeline as build_pipeline
from mixprec.tiny.build import asset_path, generate, load_pipeline
from mixprec.tiny.eval import _fake_quant_weights_, adherence
from mixprec.tiny.train import TrainConfig, train_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEPS = 8


@pytest.fixture(scope="module")
def shipped():
    return load_pipeline()


def test_build_has_sdxl_structure():
    t0 = time.perf_counter()
    pipe = build_pipeline(MICRO_ARCH, seed=0)
    assert time.perf_counter() - t0 < 2.0
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    names = [n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for part in ("attn1", "attn2", ".ff.", "add_embedding", "time_embedding", "conv_in", "mid_block"):
        assert any(part in n for n in names), part
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    # Same seed, same weights; another seed, other weights.
    a = build_pipeline(MICRO_ARCH, seed=0).unet.state_dict()
    b = build_pipeline(MICRO_ARCH, seed=1).unet.state_dict()
    assert all(torch.equal(a[k], v) for k, v in pipe.unet.state_dict().items())
    assert not all(torch.equal(b[k], v) for k, v in pipe.unet.state_dict().items())
    imgs = generate(pipe, ["a red circle on a blue background"] * 2, [0, 1], num_inference_steps=2)
    assert len(imgs) == 2 and imgs[0].size == (64, 64)


def test_shipped_model_loads_offline_and_generates(shipped):
    folder = asset_path()
    assert (folder / "model_index.json").is_file()
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights <= 20 * 2 ** 20
    t0 = time.perf_counter()
    load_pipeline()
    assert time.perf_counter() - t0 < 10.0  # docs/tiny_model.md states the measured time (< 2 s)
    # The standard diffusers API reads it too.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.tokenizer("a red circle")["input_ids"][1:-1] != [pipe.tokenizer.unk_token_id] * 3
    imgs = generate(shipped, ["a red circle on a blue background"], [0], num_inference_steps=STEPS,
                    output_type="pt")
    assert imgs[0].shape == (3, 64, 64)
    # An image depends on its (prompt, seed) only, not on the batch around it.
    one = generate(shipped, ["a cyan cross on a black background"], [7], num_inference_steps=STEPS, output_type="np")
    two = generate(shipped, ["a red circle on a blue background", "a cyan cross on a black background"], [0, 7],
                   num_inference_steps=STEPS, output_type="np")
    assert abs(one[0] - two[1]).max() < 1e-4


def test_shipped_model_follows_heldout_prompts(shipped):
    res = adherence(shipped, shapes.eval_prompts(16, split="heldout", seed=0), STEPS)
    assert res["all"] >= 0.8, {k: res[k] for k in ("all", "shape_colour", "background", "shape")}


def test_two_bit_weights_break_the_model(shipped):
    import copy

    prompts = shapes.eval_prompts(16, split="heldout", seed=0)
    original = shipped.unet
    shipped.unet = copy.deepcopy(original)
    try:
        assert _fake_quant_weights_(shipped.unet, 2) > 50
        res = adherence(shipped, prompts, STEPS)
    finally:
        shipped.unet = original
    assert res["all"] <= 0.5


def _micro_cfg(**kw) -> TrainConfig:
    base = dict(arch=MICRO_ARCH, dataset_size=64, vae_steps=4, vae_batch_size=4, unet_steps=4, unet_batch_size=4,
                warmup_steps=2, eval_prompts=0, sample_every=0, log_every=1, checkpoint_every=3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_resumed_training_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    cfg = _micro_cfg()
    logged = []
    full = train_tiny(tmp_path / "a" / "model", cfg, device="cpu", resume=False, progress=False,
                      log_fn=lambda m, s: logged.append(s))
    assert full["finished"] and logged == sorted(logged)
    # Interrupted once in the VAE phase and once in the UNet phase, then finished.
    out = tmp_path / "b" / "model"
    assert not train_tiny(out, cfg, device="cpu", progress=False, stop_after=2)["finished"]
    assert not train_tiny(out, cfg, device="cpu", progress=False, stop_after=6)["finished"]
    assert train_tiny(out, cfg, device="cpu", progress=False)["finished"]
    for sub in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):
        a, b = load_file(tmp_path / "a" / "model" / sub), load_file(out / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    sf = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    assert sf == json.loads((tmp_path / "a" / "model" / "vae" / "config.json").read_text())["scaling_factor"]
    # A checkpoint of another config is refused rather than silently mixed in.
    with pytest.raises(ValueError, match="another training config"):
        train_tiny(out, _micro_cfg(unet_lr=0.5), device="cpu", progress=False)
    # The saved folder is a working pipeline.
    pipe = load_pipeline(out)
    assert generate(pipe, ["a red circle on a blue background"], [0], num_inference_steps=2)[0].size == (64, 64)


def test_train_tiny_stage_runs_and_writes_metrics(make_cfg, tmp_path):
    from mixprec.runner import run_stage

    out = tmp_path / "trained"
    cfg = make_cfg(
        "stage=train_tiny", f"stage.output={out}", "stage.progress=false", "stage.eval_heldout_prompts=2",
        "stage.dataset_size=32", "stage.vae_steps=2", "stage.vae_batch_size=2", "stage.unet_steps=2",
        "stage.unet_batch_size=2", "stage.warmup_steps=1", "stage.eval_prompts=0", "stage.sample_every=0",
        "stage.num_inference_steps=2",
        "stage.arch={unet:{block_out_channels:[8,16],attention_head_dim:[2,2]},vae:{block_out_channels:[8,8,8]},"
        "text_encoder:{hidden_size:8,intermediate_size:16},"
        "text_encoder_2:{hidden_size:8,intermediate_size:16,projection_dim:8}}",
    )
    headline = run_stage(cfg)
    assert (out / "model_index.json").is_file() and (out.parent / "trained.work" / "checkpoint.pt").is_file()
    for split in ("heldout", "train"):
        for k in ("all", "shape_colour", "background", "shape"):
            assert 0.0 <= headline[f"adherence_{split}_{k}"] <= 1.0
    ws_files = list(tmp_path.rglob("train_tiny_metrics.json"))
    assert ws_files, "the stage writes its metrics into the workspace"
    assert list(tmp_path.rglob("train_tiny.json")), "the runner records the stage"
