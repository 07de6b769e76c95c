"""kernels.low_bit=fbgemm: 4-bit Linear layers on fbgemm-gpu-genai's CUTLASS kernels (W4A16 with bf16
activations, W4A8 with fp8 activations). On CPU: the dispatch, the fp8 activation format of the W4A8
reference, the derived epilogue (few-row path), checkpoints. On a Hopper GPU with fbgemm installed:
the real kernels against the reference, eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.kernels import BackendConfig, KernelLayer, convert_, reference_path
from mixprec.kernels import fbgemm
from mixprec.kernels import triton_gemm as tg
from mixprec.kernels.convert import choose_backend
from mixprec.kernels.probing import sqnr_db
from mixprec.models.toy import build_unet
from mixprec.quantizers import LayerQuantParams, QuantLayer, act_qparams, weight_scales
from tests.conftest import calibrated_tiny_unet


def _w4a8(mod: nn.Module, x: torch.Tensor, w_bits: int = 4, a_bits: int | None = 8) -> QuantLayer:
    layer = QuantLayer("blocks.0.ff.net.2", mod)
    lo, hi = float(x.min()), float(x.max())
    layer.params = LayerQuantParams({w_bits: weight_scales(mod.weight, w_bits)}, (lo, hi),
                                    {8: act_qparams(lo, hi, 8)})
    layer.set_bits(w_bits, a_bits)
    return layer


def test_fbgemm_option_dispatches_4bit_linear_layers_only():
    cfg = BackendConfig(low_bit="fbgemm")
    lin, conv = nn.Linear(256, 64), nn.Conv2d(32, 32, 3, padding=1)
    assert choose_backend(lin, 4, 8, cfg) == ("fp8", "")      # int4 x fp8
    assert choose_backend(lin, 3, 8, cfg) == ("fp8", "")      # 3-bit codes in the 4-bit container
    assert choose_backend(lin, 4, None, cfg) == ("wonly", "")
    assert choose_backend(lin, 4, 6, cfg) == ("int8", "")     # fp8 is the only 8-bit activation format here
    assert choose_backend(lin, 2, 8, cfg) == ("int8", "")     # 2-bit storage: Triton
    assert choose_backend(conv, 4, 8, cfg) == ("int8", "")    # no int4 conv in fbgemm
    assert choose_backend(lin, 8, 8, cfg) == ("int8", "")     # W8A8 follows kernels.w8a8
    assert choose_backend(lin, 4, 8, BackendConfig()) == ("int8", "")
    assert BackendConfig(low_bit="fbgemm").layer_kwargs()["low_bit_impl"] == "fbgemm"
    with pytest.raises(ValueError, match="low_bit"):
        BackendConfig(low_bit="cutlass")


def test_fbgemm_load_errors_say_why_and_what_to_do(monkeypatch):
    import sys

    fbgemm.load_error.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(RuntimeError, match=r"^kernels.low_bit=fbgemm: no CUDA device$"):
            fbgemm.check_loads()
        fbgemm.load_error.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
        assert fbgemm.load_error() == "fbgemm's mixed-input kernels need sm90 (Hopper), this GPU is sm80"
        fbgemm.load_error.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)  # not installed (or built for another torch)
        with pytest.raises(RuntimeError, match=r"fbgemm-gpu-genai did not load \(.*\); install the build matching "
                                               r"torch .* or use kernels.low_bit=triton"):
            fbgemm.check_loads()
        assert not fbgemm.available()
    finally:
        fbgemm.load_error.cache_clear()


@pytest.mark.parametrize("act", ["tensor", "token"])
def test_w4a8_reference_is_fp8_activations_times_the_4bit_weight(act):
    """The W4A8 layer's function: F.linear(fp8 fake-quant(x), q * s) + bias, not the int8 grid; the
    few-row path (derived scales) computes it too."""
    torch.manual_seed(0)
    mod = nn.Linear(256, 48)
    x = torch.randn(3, 256) * 2
    kl = KernelLayer.from_quant_layer(_w4a8(mod, x), "fp8", fp8_act=act)
    assert kl.spec.weight_format == "int" and kl.spec.storage_bits == 4 and kl.spec.backend == "fp8"
    assert kl.route(3, False) == "reference" and not hasattr(kl, "fb_wq")  # no CUDA: no fbgemm buffers
    w = kl.dequantized_weight(torch.float32)
    codes = kl.decode_codes()
    assert codes.abs().max() <= 8 and torch.equal(w, codes.float() * kl.wscale[:, None])
    if act == "token":
        xc, sa = tg.quant_act_fp8_token(x)
        xq = xc.float() * sa
    else:
        xq = tg.quant_act_fp8(x, 1 / kl.spec.act_scale).float() * kl.spec.act_scale
    ref = kl(x)
    assert torch.equal(ref, F.linear(xq, w, mod.bias))
    int8_ref = KernelLayer.from_quant_layer(_w4a8(mod, x), "int8")(x)
    assert not torch.equal(ref, int8_ref)  # the format really changed
    mma = kl._mma()
    few = kl._fp8_token(x, "gemv", mma) if act == "token" else kl.gemv(x, mma)
    assert sqnr_db(ref, few) > 100


def test_fp8_layer_on_the_reference_backend_keeps_fp8_activations():
    """A checkpoint of fp8 layers loaded with kernels.w8a8=reference runs them on the reference backend:
    still the fp8 function (the activation format follows the stored codes, not the backend name)."""
    torch.manual_seed(0)
    mod = nn.Linear(256, 48)
    x = torch.randn(3, 256) * 2
    kl = KernelLayer.from_quant_layer(_w4a8(mod, x, w_bits=8), "fp8")
    ref = kl(x)
    kl.spec.backend = "reference"
    assert kl.fp8_activations and torch.equal(kl(x), ref)


def test_converted_unet_keeps_fp8_activation_format_through_a_checkpoint(tmp_path):
    from mixprec.checkpoint import load_quantized, save_quantized

    unet, _, x = calibrated_tiny_unet(4, 8, weight_bits=(4,), act_bits=(8,))
    report = convert_(unet, BackendConfig(low_bit="fbgemm"))
    kinds = {(d.kind, d.backend) for d in report}
    assert ("linear", "fp8") in kinds and ("conv", "int8") in kinds
    with torch.no_grad():
        out = unet(**x).sample
    path = tmp_path / "q.safetensors"
    save_quantized(unet, path)
    fresh = build_unet("tiny")
    load_quantized(fresh, path, config=BackendConfig())  # other options: the stored fp8 scales still decide
    got = {m.name: m.spec.backend for m in fresh.modules() if isinstance(m, KernelLayer)}
    assert got == {m.name: m.spec.backend for m in unet.modules() if isinstance(m, KernelLayer)}
    with torch.no_grad(), reference_path(fresh):
        assert torch.equal(fresh(**x).sample, out)


needs_fbgemm = pytest.mark.skipif(not fbgemm.available(), reason=f"fbgemm kernels: {fbgemm.load_error()}")


@pytest.mark.gpu
@needs_fbgemm
@pytest.mark.parametrize("a_bits,act", [(8, "tensor"), (8, "token"), (None, "tensor")])
def test_fbgemm_kernels_compute_the_reference(a_bits, act):
    """The CUTLASS kernels against the layer's reference (same codes, same fp8 activations), eager and
    compiled (the custom ops trace as extern kernels)."""
    torch.manual_seed(0)
    mod = nn.Linear(1280, 640).cuda().bfloat16()
    x = torch.randn(2, 128, 1280, device="cuda", dtype=torch.bfloat16)
    backend = "fp8" if a_bits else "wonly"
    kl = KernelLayer.from_quant_layer(_w4a8(mod, x.float(), a_bits=a_bits), backend, fp8_act=act,
                                      low_bit_impl="fbgemm")
    assert kl.route(256, True) == "fbgemm"
    ref = kl.reference_forward(x)
    assert sqnr_db(ref, kl(x)) > 35
    assert sqnr_db(ref, torch.compile(kl, fullgraph=True)(x)) > 35
