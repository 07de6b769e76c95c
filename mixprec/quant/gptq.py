"""GPTQ rounding: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The layer's output error on inputs X is ||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X;
round-to-nearest minimises ||W - Q|| element by element and ignores H, GPTQ (Frantar et al., 2022)
minimises the output error greedily, one column at a time, with the closed-form update through the
Cholesky factor of H^-1. Scales are fixed before rounding (per channel or per group, the same scales
round-to-nearest uses), so a GPTQ option stores exactly what a nearest one stores and the packed
kernels run it unchanged. Everything is deterministic (no random order, no act-order reordering).

Conv2d layers are handled as the matrix product they are: H is built from ``F.unfold`` columns of
the input, whose (c, kh, kw) order is the order of ``weight.reshape(out, -1)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .groups import column_scales, weight_qmax


class HessianAccumulator:
    """Sum of x x^T over every input row a layer sees (unfolded patches for convolutions)."""

    def __init__(self, module: nn.Module):
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)):
            raise ValueError("GPTQ Hessians are built for ungrouped convolutions with explicit padding only")
        self.module = module
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as rows of the matrix the weight multiplies: [rows, in_features]."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            patches = F.unfold(x.float(), m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return x.float().reshape(-1, x.shape[-1])

    def update(self, x: torch.Tensor) -> None:
        cols = self.columns(x.detach())
        if cols.shape[0] == 0:
            return
        if self.sum is None:
            self.sum = torch.zeros(cols.shape[1], cols.shape[1], dtype=torch.float32, device=cols.device)
        self.sum.addmm_(cols.T, cols)
        self.rows += cols.shape[0]

    def hessian(self) -> torch.Tensor | None:
        """E[x x^T] (float32, CPU); None if the layer saw no input."""
        if self.sum is None or self.rows == 0:
            return None
        return (self.sum / self.rows).cpu()


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, float64. Inputs that never fired (zero diagonal) get
    a unit diagonal, so their columns are rounded to nearest without moving other columns. The damping
    grows tenfold (deterministically) until the factorization succeeds."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10 ** attempt) * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise RuntimeError(f"the Hessian ({h.shape[0]} inputs) is not positive definite even with damping "
                       f"{damp * 1e5:g}; raise quant.gptq.damp or use quant.rounding=nearest")


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int,
               group_size: int = 0, damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """Integer codes (int8, the weight's shape) for ``bits`` with the given fixed scales
    (per channel [out] with ``group_size=0``, or per group [out, groups]), rounded by GPTQ."""
    qmax = weight_qmax(bits)
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).float().clone()
    cols = w.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"a Hessian of shape {tuple(hessian.shape)} does not fit a weight with {cols} input columns")
    upper = _inverse_cholesky(hessian.to(w.device), damp).float()
    s = column_scales(scale.to(w.device), group_size, cols).expand(w.shape[0], cols)
    codes = torch.empty_like(w)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        u = upper[start:end, start:end]
        for j in range(end - start):
            col_scale = s[:, start + j]
            q = torch.clamp(torch.round(block[:, j] / col_scale), -qmax, qmax)
            codes[:, start + j] = q
            err = (block[:, j] - q * col_scale) / u[j, j]
            block[:, j:] -= err[:, None] * u[j, j:][None, :]
            errors[:, j] = err
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes.to(torch.int8).reshape(shape)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error per input row, tr((W - Wq) H (W - Wq)^T) / out, with H = E[x x^T]."""
    d = (weight.detach().reshape(weight.shape[0], -1) - approx.detach().reshape(approx.shape[0], -1)).double()
    return float(torch.einsum("oi,ij,oj->", d, hessian.double().to(d.device), d)) / d.shape[0]
