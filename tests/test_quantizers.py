import pytest
import torch
import torch.nn as nn

from mixprec.metrics import sqnr_db
from mixprec.quantizers import (LayerQuantParams, QuantLayer, act_qparams, fake_quant_act, fake_quant_weight,
                                quantize_, quantize_weight, set_plan, weight_qmax, weight_scales)


def test_weight_scales_are_computed_per_bit():
    w = torch.randn(16, 32)
    s2, s8 = weight_scales(w, 2), weight_scales(w, 8)
    # Same max|w|, different integer range: the 2-bit scale is not the 8-bit one reused.
    assert torch.allclose(s2 / s8, torch.full_like(s2, 127.0))
    q = quantize_weight(w, s2, 2)
    assert set(q.unique().tolist()) <= {-1, 0, 1}
    assert int(quantize_weight(w, s8, 8).abs().max()) == 127 == weight_qmax(8)


def test_weight_sqnr_grows_with_bits_and_mse_clipping_helps():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    s = {b: sqnr_db(w, fake_quant_weight(w, weight_scales(w, b), b)) for b in (2, 4, 8)}
    assert s[2] < s[4] < s[8]
    assert s[8] > 35
    for b in (2, 4):
        mse_err = sqnr_db(w, fake_quant_weight(w, weight_scales(w, b, clip="mse"), b))
        assert mse_err > s[b] + 0.5


def test_activation_quantization_keeps_zero_and_range():
    scale, zero = act_qparams(-1.0, 3.0, 8)
    x = torch.tensor([-1.0, 0.0, 3.0, 1.234])
    y = fake_quant_act(x, scale, zero, 8)
    assert y[1] == 0.0
    assert torch.allclose(y, x, atol=scale / 2 + 1e-7)
    # Clipped outside the calibrated range.
    assert fake_quant_act(torch.tensor([10.0]), scale, zero, 8).item() == pytest.approx(3.0, abs=scale)
    # Positive-only inputs still get a range that includes zero.
    s, z = act_qparams(2.0, 4.0, 4)
    assert z == 0 and s == pytest.approx(4.0 / 15)


def _calibrated(layer: QuantLayer, lo: float, hi: float) -> QuantLayer:
    w = layer.inner.weight
    layer.params = LayerQuantParams({b: weight_scales(w, b) for b in (2, 4, 8)}, (lo, hi),
                                    {b: act_qparams(lo, hi, b) for b in (4, 8)})
    return layer


def test_quant_layer_switches_bits_without_rebuilding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(3, 4, 3))
    layers = quantize_(model)
    assert list(layers) == ["0", "1"] and isinstance(model[0], QuantLayer)
    assert quantize_(model) == layers  # idempotent
    lin = _calibrated(layers["0"], -3, 3)
    x = torch.randn(5, 8)
    ref = lin(x)
    lin.set_bits(w_bits=4)
    out4 = lin(x)
    assert not torch.equal(out4, ref)
    expected = nn.functional.linear(x, fake_quant_weight(lin.inner.weight, lin.params.weight_scales[4], 4), lin.inner.bias)
    assert torch.allclose(out4, expected)
    lin.set_bits(None, None)
    assert torch.equal(lin(x), ref)
    assert lin.in_features == 8 and layers["1"].kernel_size == (3, 3)
    with pytest.raises(KeyError, match="no calibrated weight parameters for 3 bits"):
        lin.set_bits(w_bits=3)


def test_cross_attention_bos_token_stays_full_precision():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.attn2 = nn.Module()
    parent.attn2.to_k = nn.Linear(16, 16)
    layers = quantize_(parent)
    kv = layers["attn2.to_k"]
    assert kv.skip_first_token
    from mixprec.quantizers import RangeObserver
    kv.observer = RangeObserver(0.95)
    ctx = torch.randn(2, 6, 16)
    ctx[:, 0] = 500.0  # the huge prompt-independent BOS embedding
    kv(ctx)
    assert kv.observer.hi < 10  # BOS left out of the range
    _calibrated(kv, kv.observer.lo, kv.observer.hi)
    kv.observer = None
    kv.set_bits(w_bits=4, a_bits=4)
    out = kv(ctx)
    assert torch.equal(out[:, 0], kv.inner(ctx[:, :1])[:, 0])  # BOS K/V exact
    assert not torch.allclose(out[:, 1:], kv.inner(ctx[:, 1:]))


def test_set_plan_refuses_unknown_layers():
    model = nn.Sequential(nn.Linear(4, 4))
    layers = quantize_(model)
    _calibrated(layers["0"], -1, 1)
    set_plan(layers, {"0": 4}, {"0": 8})
    assert (layers["0"].w_bits, layers["0"].a_bits) == (4, 8)
    set_plan(layers, {"0": 16})
    assert (layers["0"].w_bits, layers["0"].a_bits) == (None, None)
    with pytest.raises(KeyError, match="another model"):
        set_plan(layers, {"down_blocks.9.x": 4})


def test_wrapped_model_still_casts_and_moves():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(3, 3, 1))
    quantize_(model)
    model.to(torch.float64)
    assert model[0].weight.dtype == torch.float64 and model[1].inner.bias.dtype == torch.float64
    model.float()
    assert model[0](torch.randn(2, 4)).dtype == torch.float32
