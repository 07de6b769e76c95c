"""LoRA before the search (model.lora): fused at load, part of the model fingerprint, a calibration
made without the adapter refused; and a colour-swapping adapter on the tiny model that changes
caption adherence the same way in full precision and quantized."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mixprec import lora
from mixprec.calibration import calibrate_layers
from mixprec.models import ModelSpec, load_pipeline
from mixprec.quantizers import quantize_, set_plan
from mixprec.runner import run_stage
from mixprec.context import fingerprints, read_calibration, workspace
from mixprec.tiny.adherence import check_batch
from mixprec.tiny.lora import colour_swap_lora, swap_words
from mixprec.tiny.shapes import iter_captions
from mixprec.workspace import FingerprintMismatchError

TINY = {"name": "tiny", "source": "builtin"}


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    pipe = load_pipeline(ModelSpec.from_dict(TINY))
    path = tmp_path_factory.mktemp("adapter") / "swap.safetensors"
    save_file(lora.random_lora_state_dict(pipe.unet, ("to_k", "to_v", "conv1"), rank=4, relative_norm=0.2, seed=7), str(path))
    return path


def test_model_lora_is_fused_at_load_and_fingerprinted(adapter_file, make_cfg):
    base = load_pipeline(ModelSpec.from_dict(TINY))
    fused = load_pipeline(ModelSpec.from_dict({**TINY, "lora": [{"path": str(adapter_file), "scale": 0.5}]}))
    expected = load_pipeline(ModelSpec.from_dict(TINY))
    lora.fuse_lora(expected, adapter_file, scale=0.5)
    changed = [n for n, p in fused.unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))]
    targeted = lora.read_lora(adapter_file)["unet"]
    assert sorted(changed) == sorted(f"{n}.weight" for n in targeted)  # every targeted layer, nothing else
    for name, p in fused.unet.named_parameters():
        assert torch.equal(p, expected.unet.get_parameter(name))
    plain = fingerprints(make_cfg())
    with_lora = fingerprints(make_cfg(f"model.lora=[{{path: '{adapter_file}', scale: 0.5}}]"))
    other_scale = fingerprints(make_cfg(f"model.lora=[{{path: '{adapter_file}', scale: 1.0}}]"))
    assert len({plain["model"], with_lora["model"], other_scale["model"]}) == 3
    assert plain == fingerprints(make_cfg("model.lora=[]"))


def test_bad_model_lora_entries_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.lora\[0\].path"):
        ModelSpec.from_dict({**TINY, "lora": [{"path": str(tmp_path / "none.safetensors")}]})
    with pytest.raises(ValueError, match="unknown keys"):
        ModelSpec.from_dict({**TINY, "lora": [{"path": str(tmp_path), "weight": 1}]})


def test_calibration_without_the_adapter_is_refused(adapter_file, make_cfg):
    small = ["prompts.calibration.n=2", "model.num_inference_steps=2"]
    cfg = make_cfg("stage=calibrate", *small)
    run_stage(cfg)
    fused_cfg = make_cfg("stage=calibrate", *small, f"model.lora=[{{path: '{adapter_file}', scale: 1.0}}]")
    with pytest.raises(FingerprintMismatchError, match="calibrated on the model with no LoRA adapters fused, but this "
                                                       "run fuses LoRA swap.safetensors"):
        read_calibration(fused_cfg, workspace(fused_cfg))


def _generate(pipe, captions):
    return pipe(captions, num_inference_steps=8, guidance_scale=0.0, height=64, width=64, output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(len(captions))]).images


def test_colour_swap_adapter_moves_adherence_alike_in_full_precision_and_w8a8():
    pipe = load_pipeline(ModelSpec.from_dict(TINY))
    adapter = colour_swap_lora(pipe, "red", "blue", rank=8)
    captions = [c for c in iter_captions("heldout") if {"red", "blue"} & set(c.split())][:8]
    swapped = [swap_words(c, "red", "blue") for c in captions]
    base = _generate(pipe, captions)
    lora.load_lora(pipe, adapter, "swap")
    fp = _generate(pipe, captions)
    lora.unload_lora(pipe)
    layers = quantize_(pipe.unet)
    calib = list(iter_captions("train"))[:4]
    calibrate_layers(layers, lambda: _generate(pipe, calib), (8,), (8,))
    set_plan(layers, {n: 8 for n in layers}, {n: 8 for n in layers})
    lora.load_lora(pipe, adapter, "swap")
    quant = _generate(pipe, captions)
    assert check_batch(base, captions)["all"] >= 0.75 and check_batch(base, swapped)["all"] <= 0.25
    fp_swapped, q_swapped = check_batch(fp, swapped)["all"], check_batch(quant, swapped)["all"]
    assert fp_swapped >= 0.75
    assert abs(fp_swapped - q_swapped) <= 1 / 8
