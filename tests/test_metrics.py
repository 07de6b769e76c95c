import numpy as np
import pytest
import torch

from mixprec.metrics import psnr_db, sqnr_db, sqnr_db_per_sample, ssim_skimage, ssim_torch


@pytest.mark.parametrize("size", [(2, 3, 32, 32), (1, 3, 48, 40)])
def test_ssim_torch_matches_scikit_image(size):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(size, generator=g)
    test = (ref + 0.1 * torch.randn(size, generator=g)).clamp(0, 1)
    ours = ssim_torch(ref, test)
    for i in range(size[0]):
        expected = ssim_skimage(ref[i].permute(1, 2, 0).numpy().astype(np.float64),
                                test[i].permute(1, 2, 0).numpy().astype(np.float64))
        assert abs(float(ours[i]) - expected) < 1e-9
    assert torch.allclose(ssim_torch(ref, ref), torch.ones(size[0], dtype=torch.float64))


def test_sqnr_and_psnr_values():
    x = torch.ones(100)
    y = x + 0.1  # noise power 0.01 against signal power 1: 20 dB
    assert sqnr_db(x, y) == pytest.approx(20.0, abs=1e-4)
    assert sqnr_db(x, x) == float("inf")
    per = sqnr_db_per_sample(torch.stack([x, x]), torch.stack([y, x + 0.01]))
    assert per.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert psnr_db(torch.zeros(10), torch.full((10,), 0.1)) == pytest.approx(20.0, abs=1e-4)
