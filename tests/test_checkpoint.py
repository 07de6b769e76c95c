"""Quantized checkpoints: save, load into a fresh model without calibration, identical outputs,
file size = weight bytes + header, and a clear error for another architecture."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mixprec.checkpoint import CheckpointMismatchError, load_quantized, read_info, save_quantized
from mixprec.kernels import BackendConfig, KernelLayer, convert_, weight_bytes
from mixprec.kernels.probing import calibrate_random, denoiser_inputs
from mixprec.models.toy import TINY_UNET, build_unet
from mixprec.quantizers import quant_layers, set_plan


@pytest.fixture(scope="module")
def calibrated_unet():
    unet = build_unet("tiny")
    calib = [denoiser_inputs(unet, 2, seed=s) for s in range(2)]
    calibrate_random(unet, lambda: [unet(**c) for c in calib])
    return unet, denoiser_inputs(unet, 2, seed=9)


def converted(unet, w8a8="int8"):
    model = copy.deepcopy(unet)
    layers = quant_layers(model)
    names = list(layers)
    wp = {n: [8, 4, 2, 8, None][i % 5] for i, n in enumerate(names)}
    ap = {n: [8, None, 8, None, 8][i % 5] for i, n in enumerate(names)}
    set_plan(layers, wp, ap)
    convert_(model, BackendConfig(cpu="emulate", w8a8=w8a8))
    return model, {n: [wp[n], ap[n]] for n in names}


@pytest.mark.parametrize("w8a8", ["int8", "fp8"])
def test_roundtrip_identical_outputs_and_size(calibrated_unet, tmp_path, w8a8):
    unet, x = calibrated_unet
    model, plan = converted(unet, w8a8)
    with torch.no_grad():
        before = model(**x).sample
    path = tmp_path / "q.safetensors"
    info = save_quantized(model, path, extra={"note": "test"})
    assert info["file_bytes"] == path.stat().st_size
    assert info["weight_bytes"] == weight_bytes(model)
    assert info["file_bytes"] == info["weight_bytes"] + info["header_bytes"]
    assert info["header_bytes"] < 0.2 * info["file_bytes"]

    fresh = build_unet("tiny", device="meta", seed=123)  # no weights at all: everything comes from the file
    report = load_quantized(fresh, path, device="cpu")
    assert weight_bytes(fresh) == info["weight_bytes"]
    assert sum(isinstance(m, KernelLayer) for m in fresh.modules()) == info["quantized_layers"]
    with torch.no_grad():
        after = fresh(**x).sample
    assert torch.equal(before, after)
    assert fresh._mixprec_plan == plan
    assert len(report) == len(plan)
    meta = read_info(path)
    assert meta["extra"] == {"note": "test"} and meta["plan"] == json.loads(json.dumps(plan))
    if w8a8 == "fp8":
        assert any(s["weight_format"] == "fp8" for s in meta["layers"])


def test_low_bit_weights_are_packed_on_disk(calibrated_unet, tmp_path):
    unet, x = calibrated_unet
    model = copy.deepcopy(unet)
    layers = quant_layers(model)
    fp16_bytes = sum(l.inner.weight.numel() * 2 for l in layers.values())
    set_plan(layers, {n: 4 for n in layers}, {})
    convert_(model, BackendConfig())
    info = save_quantized(model, tmp_path / "w4.safetensors")
    packed = sum(m.qweight.numel() for m in model.modules() if isinstance(m, KernelLayer))
    n_params = sum(m.spec.out_features * m.spec.k for m in model.modules() if isinstance(m, KernelLayer))
    assert packed <= n_params // 2 + 16 * 9 * sum(m.spec.out_features for m in model.modules() if isinstance(m, KernelLayer))
    assert info["weight_bytes"] < fp16_bytes  # plus the 16-bit norms and embeddings


def test_loading_into_another_architecture_fails_clearly(calibrated_unet, tmp_path):
    unet, _ = calibrated_unet
    model, _ = converted(unet)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    other = build_unet({**TINY_UNET, "block_out_channels": [32, 96]}, device="meta")
    with pytest.raises(CheckpointMismatchError, match=r"block_out_channels=\[32, 64\].*block_out_channels=\[32, 96\]"):
        load_quantized(other, path)


def test_loading_needs_a_fresh_model_and_a_mixprec_file(calibrated_unet, tmp_path):
    unet, _ = calibrated_unet
    model, _ = converted(unet)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    with pytest.raises(ValueError, match="freshly built"):
        load_quantized(model, path)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a mixprec quantized checkpoint"):
        load_quantized(build_unet("tiny", device="meta"), plain)
    with pytest.raises(ValueError, match="not converted"):
        save_quantized(build_unet("tiny"), tmp_path / "x.safetensors")
