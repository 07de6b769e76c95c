"""Packing of 2-, 4- and 8-bit integer weights into bytes.

Layout ("planes"): a weight row of K signed integers is split into P = 8 // bits planes of Kp
columns each (Kp = K / P rounded up to a multiple of ``ALIGN``). Byte ``j`` of a row holds, in its
bit field ``p``, the value of column ``p * Kp + j``. A GEMM kernel then loads one [BLOCK_N, BLOCK_K]
tile of bytes and gets P weight tiles out of it with shifts, each of which multiplies a contiguous
slice of the activation columns: no interleaving or gathers inside the kernel.

With ``groups`` > 1 (convolutions: one group per kernel tap (kh, kw), each of C input channels)
every group of K / groups columns is packed on its own, so a kernel tile never straddles two taps.

Values are stored with an offset (q + 2^(bits-1)) so that a field is always a non-negative number
and decoding is ``((byte >> (p * bits)) & mask) - offset``. 8-bit weights are stored as plain int8
([N, K], no planes).
"""

from __future__ import annotations

import torch

ALIGN = 16  # bytes per row are a multiple of this, so rows stay 16-byte aligned for vector loads


def planes(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"packable weight bits are 2, 4 and 8, got {bits}")
    return 8 // bits


def packed_cols(k: int, bits: int, groups: int = 1) -> int:
    """Bytes per row for ``k`` values at ``bits`` (``groups`` packed separately)."""
    p = planes(bits)
    if p == 1:
        return k
    if groups > 1:
        return groups * packed_cols(k // groups, bits)
    kp = -(-k // p)
    return -(-kp // ALIGN) * ALIGN


def pack(q: torch.Tensor, bits: int, groups: int = 1) -> torch.Tensor:
    """Pack integer weights ``q`` ([N, K], values in [-(2^(b-1)-1), 2^(b-1)-1]) into bytes.

    Returns int8 [N, K] for 8 bits and uint8 [N, groups * packed_cols(K / groups, bits)] otherwise.
    """
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D [out, in] tensor, got shape {tuple(q.shape)}")
    p = planes(bits)
    qmax = 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < -qmax or int(q.max()) > qmax):
        raise ValueError(f"values out of range for {bits}-bit weights: [{int(q.min())}, {int(q.max())}]")
    if p == 1:
        return q.to(torch.int8).contiguous()
    if groups > 1:
        n, k = q.shape
        if k % groups:
            raise ValueError(f"{k} columns do not split into {groups} groups")
        parts = [pack(g, bits) for g in q.view(n, groups, k // groups).unbind(1)]
        return torch.cat(parts, dim=1)
    n, k = q.shape
    kp = packed_cols(k, bits)
    offset = 2 ** (bits - 1)
    # Padding columns encode the value 0, so a kernel that forgets a mask still adds nothing.
    fields = torch.full((n, p * kp), offset, dtype=torch.int32, device=q.device)
    fields[:, :k] = q.to(torch.int32) + offset
    fields = fields.view(n, p, kp)
    out = torch.zeros((n, kp), dtype=torch.int32, device=q.device)
    for i in range(p):
        out |= fields[:, i] << (i * bits)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int, groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack`: int8 [N, K]. Plain tensor ops, so it also traces under torch.compile."""
    p = planes(bits)
    if p == 1:
        return packed[:, :k]
    if groups > 1:
        n = packed.shape[0]
        parts = packed.view(n, groups, -1).unbind(1)
        return torch.cat([unpack(g, bits, k // groups) for g in parts], dim=1)
    offset = 2 ** (bits - 1)
    mask = 2 ** bits - 1
    wide = packed.to(torch.int16)
    cols = [((wide >> (i * bits)) & mask) - offset for i in range(p)]
    return torch.cat(cols, dim=1)[:, :k].to(torch.int8)
