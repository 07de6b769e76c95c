"""fp8 W8A8 with per-token (row-wise, dynamic) activation scales and per-output-channel weight scales
(``kernels.fp8_act=token``): the quantization math, the reference path, the emulated kernel
arithmetic, torch's real ``_scaled_mm`` (its CPU kernel here, cuBLASLt on a GPU), the few-row path,
compile, conversion and checkpoints. GPU checks are marked ``gpu``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.kernels import BackendConfig, KernelLayer, convert_, reference_path
from mixprec.kernels import triton_gemm as tg
from mixprec.kernels.probing import sqnr_db
from mixprec.models.toy import build_unet
from mixprec.quantizers import LayerQuantParams, QuantLayer, act_qparams, weight_scales
from tests.conftest import calibrated_tiny_unet

E4M3_STEP = 2.0 ** -3  # e4m3 keeps 3 mantissa bits: relative rounding error <= half a step


def _layer(mod: nn.Module, x: torch.Tensor, name: str = "blocks.0.attn2.to_k", skip_first_token: bool = False):
    layer = QuantLayer(name, mod, skip_first_token=skip_first_token)
    xr = x[:, 1:] if skip_first_token else x
    lo, hi = float(xr.min()), float(xr.max())
    layer.params = LayerQuantParams({8: weight_scales(mod.weight, 8)}, (lo, hi), {8: act_qparams(lo, hi, 8)})
    layer.set_bits(8, 8)
    return layer


def _rows_over_decades(m: int = 16, k: int = 128) -> torch.Tensor:
    """Activations whose rows differ in size by 8 decades (a static scale sized for the largest row
    pushes the smallest under e4m3's subnormals)."""
    return torch.randn(m, k) * torch.logspace(-8, 0, m)[:, None]


def test_token_scales_are_row_max_over_448_and_codes_round_to_e4m3():
    torch.manual_seed(0)
    x = _rows_over_decades()
    x[3] = 0  # an all-zero row stays zero, with a finite scale
    codes, scale = tg.quant_act_fp8_token(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (16, 1) and scale.dtype == torch.float32
    assert scale.is_contiguous()  # what _scaled_mm's row-wise kernel requires of scale_a
    amax = x.abs().amax(dim=1, keepdim=True)
    expected = (amax / tg.FP8_MAX).clamp_min(tg.TOKEN_SCALE_MIN)
    assert torch.equal(scale, expected)
    assert torch.equal(codes.float(), (x / scale).to(torch.float8_e4m3fn).float())
    assert codes.float().abs().amax(dim=1)[amax[:, 0] > 0].eq(tg.FP8_MAX).all()  # every row spans e4m3
    deq = codes.float() * scale
    assert torch.all(deq[3] == 0)
    nonzero = x.abs() > amax * 2.0 ** -6  # normal e4m3 range of each row
    rel = ((deq - x).abs() / x.abs())[nonzero]
    assert rel.max() <= E4M3_STEP / 2 + 1e-6


def test_token_scales_keep_every_row_where_a_static_scale_loses_small_rows():
    torch.manual_seed(0)
    mod = nn.Linear(128, 32, bias=False)  # a bias would hide the small rows' outputs
    x = _rows_over_decades()
    layer = _layer(mod, x, "mid.ff.net.2")
    fp = mod(x).detach()
    static = KernelLayer.from_quant_layer(layer, "fp8", fp8_weight="channel", fp8_act="tensor")
    token = KernelLayer.from_quant_layer(layer, "fp8", fp8_weight="channel", fp8_act="token")
    assert token.spec.fp8_act == "token" and static.spec.fp8_act == "tensor"
    per_row = {name: [sqnr_db(fp[i], kl(x)[i]) for i in range(16)] for name, kl in
               (("static", static), ("token", token))}
    assert min(per_row["token"]) > 25  # e4m3 activations and weights: ~30 dB on every row
    assert min(per_row["static"]) < 10  # the smallest rows fall under e4m3's subnormals


@pytest.mark.parametrize("gran", ["tensor", "channel", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_paths_compute_the_reference_function(gran, dtype):
    """Reference (fake quant), float64 emulation, real torch._scaled_mm and the few-row path agree."""
    torch.manual_seed(0)
    mod = nn.Linear(256, 48).to(dtype)
    with torch.no_grad():
        mod.weight.mul_(torch.logspace(-2, 0, 48, dtype=dtype)[:, None])
    x = torch.randn(2, 24, 256, dtype=dtype)
    x[:, 0] *= 30  # the BOS row of a cross-attention K/V layer: computed apart, in 16 bit
    layer = _layer(mod, x, skip_first_token=True)
    ref_l = KernelLayer.from_quant_layer(layer, "fp8", fp8_weight=gran, fp8_act="token", bos="exact")
    emu = KernelLayer.from_quant_layer(layer, "fp8", fp8_weight=gran, fp8_act="token", bos="exact",
                                       cpu_path="emulate")
    ref = ref_l(x)
    # the reference is F.linear of the fake-quantized activation rows and the dequantized weight
    codes, sa = tg.quant_act_fp8_token(x[:, 1:].reshape(-1, 256))
    xq = (codes.float() * sa).to(dtype).reshape(2, 23, 256)
    assert torch.equal(ref[:, 1:], F.linear(xq, ref_l.dequantized_weight(dtype), mod.bias))
    floor = 100 if dtype == torch.float32 else 40  # bf16: one output rounding apart
    assert sqnr_db(ref, emu(x)) > floor
    assert sqnr_db(ref[:, 1:], ref_l._scaled_mm(x[:, 1:])) > floor  # the real call (CPU kernel)
    few = ref_l._fp8_token(x[:, 1:3], "gemv", tg.MMA_FP8)  # 4 rows: the GEMV path
    assert sqnr_db(ref[:, 1:3], few) > floor


def test_token_tensorwise_gemm_keeps_float16_in_range():
    """The tensor-wise GEMM's 16-bit output must not overflow float16 at large K (codes up to 448
    per operand: with unit scales |acc| reaches ~1e5-1e6 here; float16 ends at 65504)."""
    torch.manual_seed(0)
    mod = nn.Linear(2560, 64).to(torch.float16)
    x = torch.randn(32, 2560, dtype=torch.float16)
    kl = KernelLayer.from_quant_layer(_layer(mod, x), "fp8", fp8_weight="channel", fp8_act="token")
    unit = torch._scaled_mm(tg.quant_act_fp8_token(x)[0], kl.qweight.t(), scale_a=torch.tensor(1.0),
                            scale_b=torch.tensor(1.0), out_dtype=torch.float32)
    assert unit.abs().max() > 65504  # what unit scales would have written in float16
    out = kl._scaled_mm(x)
    assert torch.isfinite(out).all()
    assert sqnr_db(kl.reference_forward(x), out) > 40


@pytest.mark.parametrize("gran", ["channel", "rowwise"])
def test_token_scaled_mm_gets_what_cublaslt_requires(gran, monkeypatch):
    """A strided input (channels-last producers, transposed views) still reaches _scaled_mm as a
    row-major A with a column-major B and float32 scales: tensor-wise 0-d, or row-wise [M, 1] and
    [1, N], contiguous (the CPU kernel accepts more than cuBLASLt does, so the call is checked here)."""
    torch.manual_seed(0)
    mod = nn.Linear(64, 48)
    x = torch.randn(64, 2, 20).permute(1, 2, 0)  # [2, 20, 64], last dim strided
    assert not x.reshape(-1, 64).is_contiguous()
    kl = KernelLayer.from_quant_layer(_layer(mod, x), "fp8", fp8_weight=gran, fp8_act="token")
    real = torch._scaled_mm
    calls = []

    def checked(a, b, scale_a, scale_b, **kwargs):
        assert a.is_contiguous() and b.t().is_contiguous()
        assert scale_a.dtype == scale_b.dtype == torch.float32
        if gran == "rowwise":
            assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
            assert scale_a.is_contiguous() and scale_b.is_contiguous()
        else:
            assert scale_a.numel() == scale_b.numel() == 1
        calls.append(a.shape)
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    out = kl._scaled_mm(x)
    assert calls == [(40, 64)]
    assert sqnr_db(kl.reference_forward(x), out) > 100


def test_token_layer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    mod = nn.Linear(64, 32)
    x = torch.randn(3, 10, 64)
    kl = KernelLayer.from_quant_layer(_layer(mod, x), "fp8", fp8_weight="channel", fp8_act="token")
    for fn in (kl._scaled_mm, lambda t: kl._fp8_token(t, "gemv", tg.MMA_FP8)):
        traced = torch.compile(fn, backend="aot_eager", fullgraph=True)
        assert sqnr_db(fn(x), traced(x)) > 100


def test_converted_unet_takes_token_scales_on_linear_layers_only(tmp_path):
    """convert_ gives Linear layers per-token scales (the default) and convs the calibrated static
    scale; the emulated kernels compute the reference; a checkpoint keeps the choice."""
    from mixprec.checkpoint import load_quantized, save_quantized

    assert BackendConfig().fp8_act == "tensor"  # opt-in until measured on a GPU
    with pytest.raises(ValueError, match="fp8_act"):
        BackendConfig(fp8_act="row")
    unet, _, x = calibrated_tiny_unet(8, 8, weight_bits=(8,), act_bits=(8,))
    convert_(unet, BackendConfig(w8a8="fp8", fp8_act="token", cpu="emulate", bos="exact"))
    kernels = [m for m in unet.modules() if isinstance(m, KernelLayer)]
    assert {m.spec.fp8_act for m in kernels if m.spec.kind == "linear"} == {"token"}
    assert {m.spec.fp8_act for m in kernels if m.spec.kind == "conv"} == {"tensor"}
    with torch.no_grad():
        emulated = unet(**x).sample
        with reference_path(unet):
            ref = unet(**x).sample
    assert sqnr_db(ref, emulated) > 60
    path = tmp_path / "q.safetensors"
    save_quantized(unet, path)
    fresh = build_unet("tiny")
    load_quantized(fresh, path)
    loaded = [m for m in fresh.modules() if isinstance(m, KernelLayer)]
    assert [m.spec.fp8_act for m in loaded] == [m.spec.fp8_act for m in kernels]
    with torch.no_grad(), reference_path(fresh):
        assert torch.equal(fresh(**x).sample, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("gran,dtype", [("channel", torch.bfloat16), ("rowwise", torch.bfloat16),
                                        ("channel", torch.float16)])
def test_token_scaled_mm_on_gpu(gran, dtype):
    """cuBLASLt's tensor-wise GEMM + epilogue (channel) and the row-wise kernel (scale_a [M, 1],
    scale_b [1, N]) compute the reference function in 16 bit, eager and compiled by inductor."""
    torch.manual_seed(0)
    mod = nn.Linear(1280, 640).cuda().to(dtype)
    x = torch.randn(2, 128, 1280, device="cuda", dtype=dtype)
    kl = KernelLayer.from_quant_layer(_layer(mod, x), "fp8", fp8_weight=gran, fp8_act="token")
    assert kl.route(256, True) == "scaled_mm"
    ref = kl.reference_forward(x)
    out = kl(x)
    assert sqnr_db(ref, out) > 40
    assert sqnr_db(ref, torch.compile(kl, fullgraph=True)(x)) > 40
    assert sqnr_db(mod(x), out) > 25
