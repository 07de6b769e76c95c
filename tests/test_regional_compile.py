"""Regional compilation (``mixprec.kernels.regional``), the ``fused`` plan scope, and the KernelLayer
activation scales held as buffers so that repeated blocks of a quantized model share one compiled
graph. CPU: Dynamo only (``backend="eager"``), the kernels emulated; the inductor check is marked ``gpu``."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from mixprec.kernels import BackendConfig, KernelLayer, convert_
from mixprec.kernels import triton_gemm as tg
from mixprec.kernels.named_plans import parse_plan_name
from mixprec.kernels.probing import calibrate_random, denoiser_inputs, sqnr_db
from mixprec.kernels.regional import UNET_REGIONS, compile_regions, region_names
from mixprec.models.toy import build_unet
from mixprec.quantizers import quant_layers, set_plan


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    calib = [denoiser_inputs(unet, 1, seed=s) for s in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(8,), act_bits=(4, 8))
    return unet, layers


def _converted(unet, layers, plan: str, **opts):
    set_plan(layers)
    model = copy.deepcopy(unet)
    set_plan(quant_layers(model), *parse_plan_name(plan).bits(layers))
    convert_(model, BackendConfig(cpu="emulate", **opts))
    return model


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_fused_scope_takes_the_linear_layers_whose_quantization_fuses(calibrated):
    unet, layers = calibrated
    chosen = set(parse_plan_name("fused:w8a8:fp8").bits(layers)[0])
    roles = {re.sub(r"^.*\.attentions\.\d+\.(transformer_blocks\.\d+\.)?", "", n) for n in chosen}
    assert roles == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "ff.net.0.proj", "ff.net.2",
                     "proj_in", "proj_out"}
    # never: attention outputs, cross-attention K/V, time embeddings, convolutions
    assert not any(n.endswith(("to_out.0", "attn2.to_k", "attn2.to_v", "time_emb_proj")) or "embedding" in n
                   for n in chosen)
    assert all(isinstance(layers[n].inner, torch.nn.Linear) for n in chosen)
    assert len(chosen) == 4 * (6 + 2)  # 4 models of one block: 6 layers in the block, proj_in and proj_out


@pytest.mark.parametrize("a_bits", [8, 4])
def test_buffer_scales_quantize_bit_for_bit_like_the_python_numbers(calibrated, a_bits):
    """``_quant_fp8`` / ``_quant_int`` read the scale from buffers: the same codes as the spec's floats,
    at half-steps too (where a 1-ulp difference in x / s would flip a code)."""
    unet, layers = calibrated
    set_plan(layers)
    model = copy.deepcopy(unet)
    names = [n for n in layers if n.endswith("ff.net.2")]
    set_plan(quant_layers(model), {n: 8 for n in names}, {n: a_bits for n in names})
    convert_(model, BackendConfig(cpu="emulate", w8a8="int8"))
    kl = next(m for m in model.modules() if isinstance(m, KernelLayer))
    s, z = kl.spec.act_scale, kl.spec.act_zero
    k = kl.spec.k
    x = torch.cat([torch.randn(64, k) * 3 * s * 2 ** a_bits,
                   (torch.randint(-300, 300, (64, k)) + 0.5 - z) * s]).to(torch.bfloat16)
    off = 128 if a_bits == 8 else z
    assert torch.equal(kl._quant_int(x), tg.quant_act_int(x, s, z, off, kl.levels))
    if a_bits == 8:  # the same layer on the fp8 backend
        set_plan(quant_layers(model := copy.deepcopy(unet)), {names[0]: 8}, {names[0]: 8})
        convert_(model, BackendConfig(cpu="emulate", w8a8="fp8", fp8_weight="tensor"))
        kf = next(m for m in model.modules() if isinstance(m, KernelLayer))
        xf = torch.randn(128, k).to(torch.bfloat16) * 448 * kf.spec.act_scale
        got, want = kf._quant_fp8(xf), tg.quant_act_fp8(xf, 1.0 / kf.spec.act_scale)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("plan,opts", [("fused:w8a8", {"w8a8": "fp8", "fp8_weight": "tensor"}),
                                       ("fused:w8a4", {"w8a8": "int8"})])
def test_repeated_blocks_of_a_quantized_unet_share_one_compiled_graph(calibrated, plan, opts):
    """Regions of the same class and shapes compile once, quantized or not: the tiny UNet has 12
    regions of 8 distinct shapes, and its converted copy compiles exactly as many graphs as the
    16-bit one (with per-layer Python scales each quantized transformer compiled its own: 11)."""
    unet, layers = calibrated
    x = denoiser_inputs(unet, 1, seed=3)
    counts, outs = [], []
    for model in (_converted(unet, layers, "uniform:w16a16"), _converted(unet, layers, plan, **opts)):
        with torch.no_grad():
            eager = model(**x).sample
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        names = compile_regions(model, UNET_REGIONS, backend="eager", dynamic=False)
        with torch.no_grad():
            compiled = model(**x).sample
            again = model(**x).sample
        counts.append(_unique_graphs())
        outs.append((eager, compiled, again))
        assert len(names) == 12 and names == region_names(model, UNET_REGIONS)
    assert counts[0] == counts[1] == 8
    for eager, compiled, again in outs:
        assert torch.equal(eager, compiled) and torch.equal(compiled, again)
    assert sqnr_db(outs[0][0], outs[1][0]) > 15  # the quantized model is not the 16-bit one


def test_compile_regions_names_what_it_could_not_find():
    with pytest.raises(ValueError, match="no submodule of class.*ResnetBlock2D.*Linear"):
        compile_regions(torch.nn.Sequential(torch.nn.Linear(2, 2)), ("ResnetBlock2D",))


@pytest.mark.gpu
def test_regional_inductor_compile_of_fused_fp8_on_gpu():
    """On CUDA: cuBLASLt fp8 GEMMs inside inductor-compiled regions compute what they compute eager."""
    torch.manual_seed(0)
    unet = build_unet("tiny", device="cuda", dtype=torch.bfloat16)
    calib = [denoiser_inputs(unet, 1, seed=s) for s in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(8,), act_bits=(8,))
    model = _converted(unet, layers, "fused:w8a8", w8a8="fp8", fp8_weight="tensor")
    x = denoiser_inputs(model, 1, latent=16, seed=3)
    with torch.no_grad():
        eager = model(**x).sample
        compile_regions(model, UNET_REGIONS, dynamic=False)
        compiled = model(**x).sample
    # 8-bit activations: rounding-level differences flip codes; the floor of test_kernels' inductor test
    assert sqnr_db(eager.float(), compiled.float()) > 15


def test_benchmark_stage_compile_regional_compiles_the_blocks_in_place(calibrated):
    """``stage.compile=regional``: the denoiser's and the VAE decoder's repeated blocks are compiled
    in place (once for the shared VAE), nothing else is wrapped."""
    from types import SimpleNamespace

    from mixprec.kernels.regional import DEFAULT_REGIONS
    from mixprec.models.toy import build_toy_pipeline
    from mixprec.settings import SettingsError, check_stage
    from mixprec.stages.benchmark import _compile, _compile_vae_decoder

    assert check_stage({"name": "benchmark", "compile": "regional"}).compile == "regional"
    with pytest.raises(SettingsError, match="stage.compile='regions'.*regional"):
        check_stage({"name": "benchmark", "compile": "regions"})
    unet, _ = calibrated
    model = copy.deepcopy(unet)
    assert _compile(model, "regional") is model

    def compiled(root):
        return [getattr(root.get_submodule(n), "_compiled_call_impl", None) is not None
                for n in region_names(root, DEFAULT_REGIONS)]

    assert compiled(model) and all(compiled(model))
    assert getattr(model, "_compiled_call_impl", None) is None and getattr(model.conv_in, "_compiled_call_impl", None) is None
    vae = build_toy_pipeline("sdxl").vae
    decoder = vae.decoder
    bundle = SimpleNamespace(pipe=SimpleNamespace(vae=vae))
    _compile_vae_decoder(bundle, "regional")
    _compile_vae_decoder(bundle, "regional")
    assert vae.decoder is decoder and compiled(decoder) and all(compiled(decoder))
