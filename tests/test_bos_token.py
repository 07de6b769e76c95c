"""The cross-attention BOS token on CPU: the fake-quant layer and the kernel module compute it alike.

Found on the tiny model at batch 16 (4 of 104 images off by up to 0.062): the BOS row is a strided
slice of the text states, and CPU ``F.linear`` on a strided 3-D input folds it into one GEMM when
the weight requires grad (a ``QuantLayer``'s parameter) but runs a batched GEMM when it does not (a
``KernelLayer``'s buffer); the two round differently. The layer here has the tiny model's
cross-attention K/V shape (64 -> 64, no bias, 16 text tokens).
"""

import pytest
import torch
import torch.nn as nn

from mixprec.kernels import BackendConfig, KernelLayer, choose_backend
from mixprec.quantizers import LayerQuantParams, QuantLayer, act_qparams, weight_scales


def _calibrated_kv(requires_grad: bool, x: torch.Tensor) -> QuantLayer:
    torch.manual_seed(0)
    inner = nn.Linear(64, 64, bias=False).requires_grad_(requires_grad)
    layer = QuantLayer("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", inner, skip_first_token=True)
    lo, hi = float(x[:, 1:].min()), float(x[:, 1:].max())
    layer.params = LayerQuantParams({b: weight_scales(inner.weight, b) for b in (2, 4, 8)}, (lo, hi),
                                    {b: act_qparams(lo, hi, b) for b in (4, 8)})
    return layer


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("batch", [2, 8, 16])
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, None), (2, 4)])
def test_bos_row_is_bit_identical_in_fake_quant_and_kernel_layers(requires_grad, batch, w_bits, a_bits):
    x = torch.randn(batch, 16, 64, generator=torch.Generator().manual_seed(batch))
    x[:, 0] *= 30  # the BOS outlier kept out of the activation range
    layer = _calibrated_kv(requires_grad, x)
    layer.set_bits(w_bits, a_bits)
    backend, _ = choose_backend(layer.inner, w_bits, a_bits, BackendConfig())
    kernel = KernelLayer.from_quant_layer(layer, backend, bos="exact")
    with torch.no_grad():
        fake, converted = layer(x), kernel(x)
    assert torch.equal(converted[:, :1], fake[:, :1])
    assert torch.equal(converted, fake)
