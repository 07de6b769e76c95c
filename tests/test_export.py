"""The plan outside mixprec: torchao per-layer configs applied with torchao's quantize_, and the
from_pretrained-style loader with its plan, fingerprint and weight checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mixprec
from mixprec import lora
from mixprec.checkpoint import CheckpointMismatchError, save_quantized
from mixprec.kernels import BackendConfig, convert_
from mixprec.kernels.probing import calibrate_random, denoiser_inputs
from mixprec.models import ModelSpec, load_pipeline
from mixprec.quantizers import set_plan
from mixprec.workspace import fingerprint

TINY = {"name": "tiny", "source": "builtin"}
W_CYCLE = [2, 3, 4, 5, 6, 8, None, 8]
A_CYCLE = [None, 8, None, 8, 4, None, None, 8]


@pytest.fixture(scope="module")
def tiny_pipe():
    return load_pipeline(ModelSpec.from_dict(TINY))


def mixed_plan(names):
    return ({n: W_CYCLE[i % len(W_CYCLE)] for i, n in enumerate(names)},
            {n: A_CYCLE[i % len(A_CYCLE)] for i, n in enumerate(names)})


def test_torchao_export_reproduces_the_plan_bit_widths(tiny_pipe, tmp_path):
    from mixprec.export import apply_torchao, layer_kinds, torchao_bits, torchao_export, write_torchao_export

    unet = copy.deepcopy(tiny_pipe.unet)
    kinds = layer_kinds(unet)
    wp, ap = mixed_plan(list(kinds))
    export = torchao_export(wp, ap, kinds)
    assert export.configs and export.unsupported and export.full_precision
    # every layer is accounted for exactly once
    assert set(export.configs) | set(export.unsupported) | set(export.full_precision) == set(kinds)
    assert all("convolution" in why or "4-bit activations" in why or "activation-only" in why
               for why in export.unsupported.values())
    path = write_torchao_export(tmp_path / "torchao_plan.json", export)
    assert json.loads(path.read_text())["format"] == "mixprec-torchao-export"
    x = denoiser_inputs(unet, 1, seed=2)
    with torch.no_grad():
        full = unet(**x).sample
    apply_torchao(unet, path)  # torchao's own quantize_, from the file alone
    got = torchao_bits(unet)
    for name, config in export.configs.items():
        want_a = 8 if type(config).__name__.startswith("Int8Dynamic") else None
        assert got[name] == {"w": wp[name], "a": want_a}, name
        assert want_a == (ap[name] if kinds[name] == "linear" else None)
    for name in export.unsupported.keys() | set(export.full_precision):
        assert got[name] == {"w": None, "a": None}
    with torch.no_grad():
        quantized = unet(**x).sample
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, full)


def test_weight_only_export_takes_every_weight_quantized_layer(tiny_pipe):
    from mixprec.export import layer_kinds, torchao_export

    kinds = layer_kinds(tiny_pipe.unet)
    wp, ap = mixed_plan(list(kinds))
    export = torchao_export(wp, ap, kinds, activations="weight_only")
    assert set(export.configs) == {n for n in kinds if wp[n] is not None}
    with pytest.raises(KeyError, match="does not have"):
        torchao_export({"nope": 4}, None, kinds)


@pytest.fixture(scope="module")
def checkpoint(tiny_pipe, tmp_path_factory):
    """A W4/W8 A8 checkpoint of the built-in tiny model, as stage=infer writes it."""
    pipe = copy.deepcopy(tiny_pipe)
    unet = pipe.unet
    calib = [denoiser_inputs(unet, 2, seed=s) for s in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(4, 8), act_bits=(8,))
    names = list(layers)
    wp = {n: 4 if i % 2 else 8 for i, n in enumerate(names)}
    set_plan(layers, wp, {n: 8 for n in names})
    convert_(unet, BackendConfig(bos="exact"))
    path = tmp_path_factory.mktemp("ckpt") / "quantized_denoiser.safetensors"
    spec = ModelSpec.from_dict(TINY)
    save_quantized(unet, path, extra={"model_fingerprint": fingerprint(spec.fingerprint_data(device_type="cpu")),
                                      "model": {**TINY, "lora": []}, "device_type": "cpu"})
    return pipe, path, wp


def generate(pipe):
    return pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=0.0, height=64,
                width=64, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_loader_gives_the_quantized_pipeline(checkpoint):
    pipe, path, wp = checkpoint
    from mixprec.models import ASSETS_DIR

    for base in (TINY, ASSETS_DIR / "tiny"):
        loaded = mixprec.load_quantized_pipeline(base, path, plan=wp)
        assert torch.equal(generate(loaded), generate(pipe))
        assert len(loaded.mixprec_report) == len(wp)


def test_loader_refuses_another_plan_model_or_weights(checkpoint, tiny_pipe, tmp_path):
    _, path, wp = checkpoint
    from mixprec.models import ASSETS_DIR

    other_plan = dict(wp)
    first = next(iter(other_plan))
    other_plan[first] = 2
    with pytest.raises(CheckpointMismatchError, match="does not implement the given plan"):
        mixprec.load_quantized_pipeline(TINY, path, plan=other_plan)
    adapter = tmp_path / "a.safetensors"
    from safetensors.torch import save_file

    save_file(lora.random_lora_state_dict(tiny_pipe.unet, ("to_k", "to_v", "conv1"), relative_norm=0.2, seed=5), str(adapter))
    with pytest.raises(CheckpointMismatchError, match="LoRA a.safetensors"):
        mixprec.load_quantized_pipeline({**TINY, "lora": [{"path": str(adapter), "scale": 1.0}]}, path)
    with pytest.raises(CheckpointMismatchError, match="not made from these weights"):
        mixprec.load_quantized_pipeline(ASSETS_DIR / "tiny", path, lora=[{"path": str(adapter)}])
    other = {"name": "tiny_random", "source": "tiny_random"}
    with pytest.raises(CheckpointMismatchError, match="was made for model 'tiny'"):
        mixprec.load_quantized_pipeline(other, path)
    # a pipeline object (no spec to compare): same architecture, other weights
    with pytest.raises(CheckpointMismatchError, match="not made from these weights"):
        mixprec.load_quantized_pipeline(load_pipeline(ModelSpec.from_dict(other)), path)
    sd = load_pipeline(ModelSpec.from_dict({"name": "tiny_sd", "source": "tiny_random", "family": "sd"}))
    with pytest.raises(CheckpointMismatchError, match="architecture fingerprint"):
        mixprec.load_quantized_pipeline(sd, path)
    with pytest.raises(FileNotFoundError, match="save_checkpoint"):
        mixprec.load_quantized_pipeline(TINY, tmp_path / "missing.safetensors")
