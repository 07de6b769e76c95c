"""Image and tensor metrics: SQNR, PSNR, MSE and SSIM.

SSIM follows scikit-image's ``structural_similarity`` with its defaults (7x7 uniform window,
K1=0.01, K2=0.03, sample covariance, border of 3 pixels cropped from the mean, channels averaged).
:func:`ssim_torch` computes the same number batched on any device, which the sensitivity sweep
needs on GPU; :func:`ssim_skimage` is the reference it is tested against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB over the whole tensor (inf when identical)."""
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def sqnr_db_per_sample(reference: torch.Tensor, test: torch.Tensor, sample_dim: int = 0) -> torch.Tensor:
    """SQNR in dB for each sample along ``sample_dim`` (other dims reduced); float64, inf where identical."""
    ref = reference.detach().double().movedim(sample_dim, 0).flatten(1)
    tst = test.detach().double().movedim(sample_dim, 0).flatten(1)
    noise = (ref - tst).pow(2).sum(1)
    signal = ref.pow(2).sum(1)
    return 10 * torch.log10(signal / noise)


def mse(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float((reference.detach().double() - test.detach().double()).pow(2).mean())


def psnr_db(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> float:
    err = mse(reference, test)
    if err == 0:
        return float("inf")
    return float(10 * np.log10(data_range ** 2 / err))


def ssim_skimage(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of two HxWxC float images with scikit-image (the reference implementation)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(reference, test, channel_axis=-1, data_range=data_range))


def ssim_torch(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Per-image SSIM of two [N, C, H, W] batches, matching scikit-image's defaults; returns float64 [N]."""
    if reference.shape != test.shape or reference.dim() != 4:
        raise ValueError(f"ssim_torch needs two [N,C,H,W] tensors of one shape, got {tuple(reference.shape)} "
                         f"and {tuple(test.shape)}")
    x = reference.detach().double()
    y = test.detach().double()
    n, c, h, w = x.shape
    if min(h, w) < win_size:
        raise ValueError(f"images of {h}x{w} are smaller than the SSIM window {win_size}")
    k1, k2 = 0.01, 0.03
    npix = win_size * win_size
    cov_norm = npix / (npix - 1)  # scikit-image uses the sample covariance

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t.reshape(n * c, 1, h, w), win_size, stride=1)

    ux, uy = filt(x), filt(y)
    uxx, uyy, uxy = filt(x * x), filt(y * y), filt(x * y)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # avg_pool2d's "valid" output is exactly the region scikit-image keeps after cropping its border.
    return s.reshape(n, c, -1).mean(dim=2).mean(dim=1)
