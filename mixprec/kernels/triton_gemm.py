"""One Triton GEMM for every quantized layer shape: Linear and implicit-GEMM Conv2d.

What the kernel multiplies (``mma``):
  0 - 16-bit activations x weights decoded to 16 bit (weight-only 2/4/8-bit, fp32 accumulate);
  1 - int8 activations x int8 weights (W8A8 and W4A8/W2A8, int32 accumulate);
  2 - fp8 e4m3 activations x fp8 e4m3 weights, fp32 accumulate: the partial sum of every
      BLOCK_K-deep step is promoted to a float32 accumulator (Hopper's fp8 wgmma otherwise keeps
      about 14 accumulator bits over the whole K, which Triton allows by default on sm90);
  3 - the same with Triton's default fast (imprecise) accumulation over the whole K.
For ``mma`` 1 and 2 the activations either arrive already quantized (the producer did it, which is
where torch.compile fuses it) or arrive in 16 bit and are quantized inside the kernel (``qa``),
with the same static per-tensor scale and zero point.

Epilogue: ``out[m, n] = acc[m, n] * row_scale[n] + col_bias[n]``. For int8 activations stored as
``q - off`` (off = 128 at 8 bits, so uint8 codes fit int8; off = zero point below 8 bits), the
zero-point correction ``(off - zp) * sum_k Wq[n, k]`` is folded into ``col_bias`` by the caller.

Convolutions are an implicit GEMM: row m = (image, output pixel), column k = (kh, kw, c), read
straight from the input through its strides (NCHW or channels-last, no im2col buffer). Spatial
padding reads the quantized zero (``zp - off``), so the folded correction stays exact at borders.

Without CUDA (or without Triton) the op runs :func:`emulate`, the same arithmetic in float64.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import w8a8_linear
from .packing import planes, unpack

try:  # Triton is optional: CPU machines run the emulation
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP8_MAX = 448.0
MMA_16, MMA_INT8, MMA_FP8, MMA_FP8_FAST = 0, 1, 2, 3
FP8_MMAS = (MMA_FP8, MMA_FP8_FAST)


# --------------------------------------------------------------------------- the kernel
if HAS_TRITON:
    from .w8a8_linear import tile_ids

    @triton.jit
    def _qgemm_kernel(
        a_ptr, w_ptr, out_ptr, rs_ptr, cb_ptr, aq_ptr,
        M, N, C, CP, R,
        s_am, s_ac, s_wn, s_om, s_on,
        IN_H, IN_W, OH, OW, KSZ_W, STRIDE, PAD,
        s_ab, s_ah, s_aw, s_ob, s_osp,
        MMA: tl.constexpr, QA: tl.constexpr, LEVELS: tl.constexpr, W_BITS: tl.constexpr,
        CONV: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # K is walked as R groups (conv taps; 1 for Linear) of C columns, packed per group into CP
        # bytes; each K step loads one [BLOCK_N, BLOCK_K] byte tile = P weight tiles.
        P: tl.constexpr = 8 // W_BITS
        FIELD: tl.constexpr = (1 << W_BITS) - 1
        W_OFF: tl.constexpr = 1 << (W_BITS - 1)
        # a byte whose every field decodes to 0: masked weight loads must add nothing
        W_ZERO: tl.constexpr = 0x88 if P == 2 else 0xAA

        pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N

        if CONV:
            sp = offs_m % (OH * OW)
            img = offs_m // (OH * OW)
            ih0 = (sp // OW) * STRIDE - PAD
            iw0 = (sp % OW) * STRIDE - PAD
            a_row = img * s_ab + ih0 * s_ah + iw0 * s_aw
        else:
            a_row = offs_m * s_am

        if MMA == 1:
            inv_s = tl.load(aq_ptr)
            zp = tl.load(aq_ptr + 1)
            off = tl.load(aq_ptr + 2)
            a_pad = (zp - off).to(tl.int8)
        if MMA >= 2:
            inv_s = tl.load(aq_ptr)

        if MMA == 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        w_rows = w_ptr + offs_n[:, None] * s_wn
        n_cb = tl.cdiv(CP, BLOCK_K)
        for it in range(0, R * n_cb):
            r = it // n_cb
            cp = (it % n_cb) * BLOCK_K + offs_k
            if CONV:
                kh = r // KSZ_W
                kw = r % KSZ_W
                ih = ih0 + kh
                iw = iw0 + kw
                row_ok = m_ok & (ih >= 0) & (ih < IN_H) & (iw >= 0) & (iw < IN_W)
                a_base = a_row + kh * s_ah + kw * s_aw
            else:
                row_ok = m_ok
                a_base = a_row
            if MASK_K:
                w_mask = n_ok[:, None] & (cp < CP)[None, :]
            else:
                w_mask = n_ok[:, None]
            if P == 1:
                wt = tl.load(w_rows + (r * CP + cp)[None, :], mask=w_mask, other=0.0)
            else:
                wt = tl.load(w_rows + (r * CP + cp)[None, :], mask=w_mask, other=W_ZERO)
            for p in tl.static_range(P):
                c = p * CP + cp
                a_ptrs = a_ptr + a_base[:, None] + c[None, :] * s_ac
                if MASK_K:
                    a_mask = row_ok[:, None] & ((c < C) & (cp < CP))[None, :]
                else:
                    a_mask = row_ok[:, None]
                if QA:
                    a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
                    if MMA == 1:
                        v = tl.minimum(tl.maximum(a * inv_s, -2048.0), 2048.0)
                        # round half to even, as torch.round: exact for |v| < 2^22
                        v = (v + 12582912.0) - 12582912.0
                        v = tl.minimum(tl.maximum(v + zp, 0.0), LEVELS)
                        a = (v - off).to(tl.int8)
                    else:
                        a = tl.minimum(tl.maximum(a * inv_s, -448.0), 448.0).to(tl.float8e4nv)
                else:
                    if MMA == 1:
                        a = tl.load(a_ptrs, mask=a_mask, other=a_pad)
                    else:
                        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
                if P == 1:
                    wv = wt
                else:
                    wv = ((wt >> (p * W_BITS)) & FIELD).to(tl.int8) - W_OFF
                if MMA == 0:
                    wv = wv.to(a.dtype)
                    acc = tl.dot(a, tl.trans(wv), acc)
                elif MMA == 1:
                    acc = tl.dot(a, tl.trans(wv), acc, out_dtype=tl.int32)
                elif MMA == 2:
                    # promote to float32 after each BLOCK_K step (a K of 11520 on SDXL's 3x3 convs)
                    acc = tl.dot(a, tl.trans(wv), acc, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc = tl.dot(a, tl.trans(wv), acc)

        rs = tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * rs[None, :]
        if HAS_BIAS:
            y += tl.load(cb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if CONV:
            o_ptrs = out_ptr + (img * s_ob + sp * s_osp)[:, None] + offs_n[None, :] * s_on
        else:
            o_ptrs = out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                 for bn, bk, w in ((1, 2048, 4), (2, 1024, 4), (4, 1024, 4), (4, 512, 4), (8, 512, 4),
                                   (8, 256, 4), (16, 256, 8), (2, 2048, 8))],
        key=["M", "N", "K"])
    @triton.jit
    def _gemv_kernel(a_ptr, w_ptr, out_ptr, rs_ptr, cb_ptr, M, N, K, s_am, s_wn, s_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # A few rows times 8-bit codes: memory-bound, so narrow column blocks with long K steps
        # (not tensor-core tiles) keep many bytes in flight; products summed in float32 registers.
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            a = tl.load(a_ptr + offs_m[:, None] * s_am + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * s_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        y = acc * tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        y += tl.load(cb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Set by benchmarks to try other tiles; None = the heuristic below.
TILE_OVERRIDE: TileConfig | None = None
# Linear layers with 8-bit weights and pre-quantized int8 / fp8 activations run the dedicated kernel of
# w8a8_linear (this general kernel's int8 path ran at half its fp8 speed on Hopper); False: this kernel.
LINEAR_W8_KERNEL = True


def pick_tiles(m: int, n: int, cp: int, mma: int, w_bits: int, sms: int = 132) -> TileConfig:
    """Tile sizes from the problem shape: enough tiles to fill the SMs, wide K steps for 8-bit data.

    SDXL at 512 px, batch 1 feeds M = 256 / 1024 / 4096 rows: 128x128 tiles would give fewer
    tiles than SMs on most layers, so M and N tiles shrink until the grid covers the SMs. The K
    step divides the packed group width when it can, so the K loop needs no masks.
    """
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    bn = 128

    def tiles(bm_: int, bn_: int) -> int:
        return -(-m // bm_) * -(-n // bn_)

    if bm == 128 and tiles(bm, bn) < sms:
        bm = 64
    if tiles(bm, bn) < sms:
        bn = 64
    p = 8 // w_bits
    eight_bit = mma in (MMA_INT8, *FP8_MMAS)
    unit = 32 if eight_bit else 16
    target = max((128 if eight_bit else 64) // p, unit)
    bk = next((b for b in (target, target // 2, target // 4) if b >= unit and cp % b == 0), target)
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 4 if eight_bit and p == 1 else 3
    return TileConfig(bm, bn, bk, 8, warps, stages)


def conv_output(a: torch.Tensor, n: int, oh: int, ow: int, dtype: torch.dtype) -> torch.Tensor:
    """The conv output buffer: channels-last when the input is (the fake op must agree with this,
    or compiled code downstream would read the wrong strides)."""
    cl = a.stride(1) == 1 and a.shape[1] > 1
    return torch.empty((a.shape[0], n, oh, ow), device=a.device, dtype=dtype,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: int, pad: int) -> tuple[int, int]:
    return (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1


def launch(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_bias: torch.Tensor | None,
           aq: torch.Tensor | None, k: int, w_bits: int, mma: int, qa: bool, levels: int,
           out_dtype: torch.dtype, conv: list[int], tiles: TileConfig | None = None) -> torch.Tensor:
    """Run the Triton kernel. ``a`` is [M, K] (Linear) or [B, C, H, W] with any strides (Conv2d);
    a conv output takes the input's memory format (channels-last in, channels-last out)."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    n = w.shape[0]
    if conv:
        kh, kw, stride, pad = conv
        bsz, c, h, wd = a.shape
        oh, ow = conv_out_hw(h, wd, kh, kw, stride, pad)
        m = bsz * oh * ow
        groups = kh * kw
        out = conv_output(a, n, oh, ow, out_dtype)
        geo = (h, wd, oh, ow, kw, stride, pad, a.stride(0), a.stride(2), a.stride(3), out.stride(0), out.stride(3))
        rows = (0, a.stride(1), w.stride(0), 0, out.stride(1))
    else:
        m, c = a.shape
        if (LINEAR_W8_KERNEL and tiles is None and w_bits == 8 and not qa and mma in (MMA_INT8, MMA_FP8)
                and w8a8_linear.supports(a, w)):
            # pre-quantized 8-bit Linear: the dedicated kernel (tiles per shape, TMA where it won)
            return w8a8_linear.w8a8_linear(a, w, row_scale, col_bias, out_dtype)
        groups = 1
        out = torch.empty((m, n), device=a.device, dtype=out_dtype)
        geo = (1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
        rows = (a.stride(0), a.stride(1), w.stride(0), out.stride(0), out.stride(1))
    if m == 0:
        return out
    cp = w.shape[1] // groups
    p = 8 // w_bits
    if tiles is None:
        sms = _sm_count(a.device.index or 0) if a.is_cuda else 132
        tiles = pick_tiles(m, n, cp, mma, w_bits, sms)
    mask_k = not (cp % tiles.block_k == 0 and c == p * cp)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    dummy = row_scale
    _qgemm_kernel[grid](
        a, w, out, row_scale, col_bias if col_bias is not None else dummy, aq if aq is not None else dummy,
        m, n, c, cp, groups, *rows, *geo,
        MMA=mma, QA=qa, LEVELS=levels, W_BITS=w_bits, CONV=bool(conv), HAS_BIAS=col_bias is not None,
        MASK_K=mask_k, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


# --------------------------------------------------------------------------- emulation (CPU)
def quant_act_int(x: torch.Tensor, scale: float | torch.Tensor, zero: float | torch.Tensor,
                  off: float | torch.Tensor, levels: int, inverse: bool = False) -> torch.Tensor:
    """Static asymmetric activation quantization to int8 codes ``q - off`` (plain ops: fusable).

    Divides by ``scale`` in float32 like the reference; ``inverse=True`` multiplies by it instead
    (what the in-kernel quantization does, so the emulation can match it).
    """
    v = x.float() * scale if inverse else x.float() / scale
    q = torch.clamp(torch.round(v) + zero, 0, levels)
    return (q - off).to(torch.int8)


def quant_act_fp8(x: torch.Tensor, inv_scale: float | torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.float() * inv_scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


TOKEN_SCALE_MIN = 1e-12  # an all-zero row keeps a finite scale (its codes are 0 whatever the scale)


def quant_act_fp8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) fp8 e4m3 quantization of ``x`` [M, K]: (codes [M, K], scales [M, 1]
    float32) with ``scale = max|row| / 448``, so every row spans e4m3's full range whatever the
    calibration saw. The reference, the emulation and the kernels all quantize through this function
    (plain ops: under compile inductor fuses the row max and the cast into the producer)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(TOKEN_SCALE_MIN)
    codes = torch.clamp(xf / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def decode_weight(w: torch.Tensor, w_bits: int, k: int, groups: int = 1) -> torch.Tensor:
    """[N, K] int8 (or fp8) weight codes in (kh, kw, c) column order."""
    if w.dtype == torch.float8_e4m3fn:
        return w[:, :k]
    return unpack(w, w_bits, k, groups) if planes(w_bits) > 1 else w[:, :k]


def emulate(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_bias: torch.Tensor | None,
            aq: torch.Tensor | None, k: int, w_bits: int, mma: int, qa: bool, levels: int,
            out_dtype: torch.dtype, conv: list[int]) -> torch.Tensor:
    """The kernel's arithmetic with torch ops, in float64 (exact for the integer paths)."""
    a_in = a
    wq = decode_weight(w, w_bits, k, conv[0] * conv[1] if conv else 1).double()
    pad_value = 0.0
    if mma == MMA_INT8:
        inv_s, zp, off = (float(v) for v in aq.tolist())
        if qa:
            a = quant_act_int(a, inv_s, zp, off, levels, inverse=True)
        pad_value = zp - off
    elif mma in FP8_MMAS and qa:
        a = quant_act_fp8(a, float(aq[0]))
    a = a.double()
    if conv:
        kh, kw, stride, pad = conv
        n = wq.shape[0]
        c = a.shape[1]
        if pad:
            a = F.pad(a, (pad, pad, pad, pad), value=pad_value)
        cols = F.unfold(a, (kh, kw), stride=stride)  # [B, C*kh*kw, L], column order (c, kh, kw)
        wmat = wq.view(n, kh, kw, c).permute(0, 3, 1, 2).reshape(n, -1)
        acc = torch.einsum("bkl,nk->bnl", cols, wmat)
        y = acc * row_scale.double()[None, :, None]
        if col_bias is not None:
            y = y + col_bias.double()[None, :, None]
        oh, ow = conv_out_hw(a.shape[2] - 2 * pad, a.shape[3] - 2 * pad, kh, kw, stride, pad)
        out = conv_output(a_in, n, oh, ow, out_dtype)
        return out.copy_(y.reshape(a.shape[0], n, oh, ow))
    y = (a @ wq.t()) * row_scale.double()
    if col_bias is not None:
        y = y + col_bias.double()
    return y.to(out_dtype)


# --------------------------------------------------------------------------- the op
@torch.library.custom_op("mixprec::qgemm", mutates_args=())
def qgemm(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_bias: torch.Tensor | None,
          aq: torch.Tensor | None, k: int, w_bits: int, mma: int, qa: bool, levels: int,
          out_dtype: torch.dtype, conv: list[int]) -> torch.Tensor:
    """Quantized GEMM / implicit-GEMM conv; an opaque op to torch.compile (no graph break)."""
    if a.is_cuda and HAS_TRITON:
        return launch(a, w, row_scale, col_bias, aq, k, w_bits, mma, qa, levels, out_dtype, conv)
    if INTERPRET and HAS_TRITON:
        return launch(a, w, row_scale, col_bias, aq, k, w_bits, mma, qa, levels, out_dtype, conv)
    return emulate(a, w, row_scale, col_bias, aq, k, w_bits, mma, qa, levels, out_dtype, conv)


GEMV_MAX_ROWS = 16


@torch.library.custom_op("mixprec::gemv", mutates_args=())
def gemv(a: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, col_bias: torch.Tensor,
         out_dtype: torch.dtype) -> torch.Tensor:
    """``(a @ codes.T) * row_scale + col_bias`` for at most 16 rows of ``a`` (activations, or
    activation codes, as float) and 8-bit codes (int8 or fp8 e4m3), summed in float32."""
    m, k = a.shape
    n = codes.shape[0]
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {m}")
    if not HAS_TRITON or not (a.is_cuda or INTERPRET):
        return ((a.float() @ codes.float().t()) * row_scale + col_bias).to(out_dtype)
    a = a.contiguous()
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    args = (a, codes, out, row_scale, col_bias, m, n, k, a.stride(0), codes.stride(0), out.stride(0))
    block_m = max(1, triton.next_power_of_2(m))
    if INTERPRET:  # the autotuner times configs on a GPU: the interpreter runs the kernel body once
        _gemv_kernel.fn[(triton.cdiv(n, 4),)](*args, BLOCK_M=block_m, BLOCK_N=4, BLOCK_K=128)
    else:
        _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, BLOCK_M=block_m)
    return out


@gemv.register_fake
def _(a, codes, row_scale, col_bias, out_dtype):
    return a.new_empty((a.shape[0], codes.shape[0]), dtype=out_dtype)


@qgemm.register_fake
def _(a, w, row_scale, col_bias, aq, k, w_bits, mma, qa, levels, out_dtype, conv):
    n = w.shape[0]
    if conv:
        kh, kw, stride, pad = conv
        oh, ow = conv_out_hw(a.shape[2], a.shape[3], kh, kw, stride, pad)
        return conv_output(a, n, oh, ow, out_dtype)
    return a.new_empty((a.shape[0], n), dtype=out_dtype)
