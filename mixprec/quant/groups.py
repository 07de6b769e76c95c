"""Weight scales per group of input columns, and codes/dequantization for either granularity.

A weight is seen as a matrix [out, in] (Conv2d: in = in_channels * kh * kw in PyTorch's (c, kh, kw)
order, the order of ``F.unfold``). With group size ``g`` every row is cut into ceil(in / g) runs of
``g`` consecutive columns (the last one may be shorter), each with its own symmetric scale; group
size 0 is one scale per row (per output channel). Scales are float32 [out] (per channel) or
[out, groups] (per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weight_qmax(bits: int) -> int:
    if bits < 2:
        raise ValueError(f"weight bits must be >= 2, got {bits}")
    return 2 ** (bits - 1) - 1


def num_groups(cols: int, group_size: int) -> int:
    return 1 if not group_size else -(-cols // group_size)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 view of a Linear or Conv2d weight."""
    return weight.detach().reshape(weight.shape[0], -1).float()


def row_scales(w: torch.Tensor, bits: int, clip: str = "minmax", clip_grid: int = 20,
               clip_min_ratio: float = 0.5) -> torch.Tensor:
    """One symmetric scale per row of the float matrix ``w``.

    ``clip="mse"`` searches a clipping ratio per row in [clip_min_ratio, 1] that minimises the squared
    error of the fake-quantized row (helps most at 2 and 4 bits).
    """
    qmax = weight_qmax(bits)
    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    if clip == "minmax":
        return amax / qmax
    if clip != "mse":
        raise ValueError(f"unknown weight clipping {clip!r}: use 'minmax' or 'mse'")
    best_scale = amax / qmax
    best_err = torch.full_like(amax, float("inf"))
    for ratio in torch.linspace(1.0, clip_min_ratio, clip_grid).tolist():
        scale = amax * ratio / qmax
        q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
        err = (q * scale[:, None] - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def _grouped_rows(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out * groups, group_size]: each row split into groups, the last one padded with zeros (a zero
    changes neither a group's max nor its rounding error)."""
    out, cols = w.shape
    groups = num_groups(cols, group_size)
    padded = F.pad(w, (0, groups * group_size - cols))
    return padded.reshape(out * groups, group_size)


def group_weight_scales(weight: torch.Tensor, bits: int, group_size: int, clip: str = "minmax") -> torch.Tensor:
    """Scales [out, groups] for ``bits`` with one scale per ``group_size`` input columns of each row."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive for group scales, got {group_size}")
    w = as_matrix(weight)
    scales = row_scales(_grouped_rows(w, group_size), bits, clip=clip)
    return scales.reshape(w.shape[0], num_groups(w.shape[1], group_size))


def column_scales(scale: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """The scale of every weight element, as [out, cols] (per channel: [out, 1], broadcasting)."""
    if not group_size:
        return scale.reshape(-1, 1).float()
    if scale.dim() != 2 or scale.shape[1] != num_groups(cols, group_size):
        raise ValueError(f"group scales of shape {tuple(scale.shape)} do not fit {cols} columns in groups of "
                         f"{group_size} ({num_groups(cols, group_size)} groups)")
    return scale.float().repeat_interleave(group_size, dim=1)[:, :cols]


def nearest_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """Round-to-nearest integer codes (int8, the weight's shape) for per-channel or per-group scales."""
    qmax = weight_qmax(bits)
    w = as_matrix(weight)
    s = column_scales(scale.to(w.device), group_size, w.shape[1])
    q = torch.clamp(torch.round(w / s), -qmax, qmax)
    return q.to(torch.int8).reshape(weight.shape)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale in ``dtype``, the codes' shape; per-channel or per-group scales."""
    q = codes.reshape(codes.shape[0], -1).float()
    s = column_scales(scale.to(codes.device), group_size, q.shape[1])
    return (q * s).to(dtype).reshape(codes.shape)
