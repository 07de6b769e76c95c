"""A Triton GEMM for 8-bit Linear layers (int8 x int8 or fp8 x fp8), tuned for few-row products.

Why its own kernel: the general kernel in :mod:`.triton_gemm` walks K as conv taps x packed groups
and decodes packed fields, and on Hopper its int8 path ran at half its fp8 speed (33.5 vs 19.6 us
at 256x10240x1280 on an H200, session 29); cuBLAS's ``torch._int_mm`` is slower than bf16 at every
SDXL shape at 512 px and writes int32 that a second kernel rescales. This kernel is only the
Linear case: 8-bit activations (quantized by their producer, where torch.compile fuses it) times
8-bit weight codes, accumulated on the tensor cores (int32 for int8, float32 for fp8), then the
epilogue ``out = acc * row_scale[n] + col_bias[n]`` written in 16 bit - one kernel per layer.

Two ways to load tiles: plain pointers (``tma=False``) or Hopper's tensor-memory accelerator
through device-side tensor descriptors (``tma=True``; needs ``triton.set_allocator``, done here).
The tile table :data:`TILES` holds the configuration measured fastest per shape on an H200
(``benchmarks/w8a8_triton_gemms.py``); other shapes take :func:`default_tiles`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # Triton is optional: without it (CPU machines) callers use another path
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False


@dataclass(frozen=True)
class W8Tiles:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8
    tma: bool = False

    def smem_bytes(self) -> int:
        """Shared memory the pipelined operand tiles take (1 byte per 8-bit element)."""
        return (self.block_m + self.block_n) * self.block_k * self.num_stages


# (rows bucket, N, K) -> tiles: the fastest int8 configuration of the H200 sweep (session 30,
# docs/measurements/kernels/s30/call1/w8a8_triton.json; pointer loads won every shape, TMA lost by
# 5-50%); rows bucket = the next power of two >= M. SDXL's Linear shapes at 512 px batch 1 and 4x rows.
TILES: dict[tuple[int, int, int], W8Tiles] = {
    (256, 10240, 1280): W8Tiles(64, 128, 128, 4, 3),  # 11.86 us (bf16 14.37)
    (256, 1280, 1280): W8Tiles(64, 64, 256, 4, 3),  # 4.51 us (bf16 5.99)
    (256, 1280, 5120): W8Tiles(64, 64, 256, 4, 4),  # 11.01 us (bf16 12.15)
    (1024, 5120, 640): W8Tiles(128, 64, 128, 4, 3),  # 14.21 us (bf16 15.87)
    (1024, 640, 640): W8Tiles(128, 64, 128, 4, 4),  # 4.58 us (bf16 4.87)
    (1024, 640, 2560): W8Tiles(64, 64, 256, 4, 3),  # 9.11 us (bf16 8.98)
    (1024, 10240, 1280): W8Tiles(128, 128, 128, 4, 3),  # 33.35 us (bf16 44.52)
    (1024, 1280, 1280): W8Tiles(64, 64, 128, 4, 4),  # 8.25 us (bf16 8.46)
    (1024, 1280, 5120): W8Tiles(64, 128, 128, 4, 4),  # 18.51 us (bf16 20.44)
    (4096, 5120, 640): W8Tiles(128, 128, 128, 4, 3),  # 38.88 us (bf16 45.04)
    (4096, 640, 640): W8Tiles(64, 128, 128, 4, 3),  # 7.98 us (bf16 8.42)
    (4096, 640, 2560): W8Tiles(64, 128, 128, 4, 3),  # 16.09 us (bf16 20.02)
}


def rows_bucket(m: int) -> int:
    return 1 << max(4, (m - 1).bit_length())


def default_tiles(m: int, n: int, k: int) -> W8Tiles:
    """Enough output tiles to cover the SMs at few rows: 64-row tiles below 512 rows."""
    bm = 64 if m <= 512 else 128
    bk = 128 if k % 128 == 0 else 64
    return W8Tiles(bm, 128, bk, 4 if bm == 64 else 8, 4)


def tiles_for(m: int, n: int, k: int) -> W8Tiles:
    return TILES.get((rows_bucket(m), n, k)) or default_tiles(m, n, k)


if HAS_TRITON:

    @triton.jit
    def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped order: GROUP_M row tiles share each column tile of weights while it sits in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % rows, (pid % per_group) // rows

    @triton.jit
    def _epilogue(acc, out_ptr, rs_ptr, cb_ptr, M, N, s_om, pid_m, pid_n,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        y = acc.to(tl.float32) * tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(cb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        o_ptrs = out_ptr + offs_m[:, None] * s_om + offs_n[None, :]
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])

    @triton.jit
    def _w8_ptr_kernel(a_ptr, w_ptr, out_ptr, rs_ptr, cb_ptr, M, N, K, s_am, s_wn, s_om,
                       INT8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
        pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # rows past M / N re-read row 0: their results are masked at the store, loads stay unmasked
        rows_a = tl.where(offs_m < M, offs_m, 0)
        rows_w = tl.where(offs_n < N, offs_n, 0)
        a_ptrs = a_ptr + rows_a[:, None] * s_am + offs_k[None, :]
        w_ptrs = w_ptr + rows_w[:, None] * s_wn + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = (k0 + offs_k) < K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if INT8:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            else:
                # promote every BLOCK_K step into float32 (fp8 wgmma keeps ~14 accumulator bits)
                acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=BLOCK_K)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        _epilogue(acc, out_ptr, rs_ptr, cb_ptr, M, N, s_om, pid_m, pid_n, HAS_BIAS, BLOCK_M, BLOCK_N)

    @triton.jit
    def _w8_tma_kernel(a_ptr, w_ptr, out_ptr, rs_ptr, cb_ptr, M, N, K, s_am, s_wn, s_om,
                       INT8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
        pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # out-of-bounds rows and K columns of a descriptor load read as zero
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[s_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[s_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            if INT8:
                acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
        _epilogue(acc, out_ptr, rs_ptr, cb_ptr, M, N, s_om, pid_m, pid_n, HAS_BIAS, BLOCK_M, BLOCK_N)


_ALLOCATOR_SET = False


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # device-side descriptors live in a small global scratch buffer Triton asks for at launch
    return torch.empty(size, device="cuda", dtype=torch.int8)


def supports(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`w8a8_linear` takes these operands (2-d, 8-bit, same dtype, unit K stride, CUDA)."""
    return (HAS_TRITON and a.is_cuda and a.dim() == 2 and w.dim() == 2 and a.dtype == w.dtype
            and a.dtype in (torch.int8, torch.float8_e4m3fn) and a.stride(1) == 1 and w.stride(1) == 1
            and a.shape[1] == w.shape[1])


def w8a8_linear(a: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor, col_bias: torch.Tensor | None,
                out_dtype: torch.dtype, tiles: W8Tiles | None = None) -> torch.Tensor:
    """``(a @ w.T) * row_scale + col_bias`` for 8-bit ``a`` [M, K] and ``w`` [N, K], in ``out_dtype``.

    ``row_scale`` and ``col_bias`` are float32 per output column; int8 codes accumulate exactly in
    int32, fp8 in float32.
    """
    global _ALLOCATOR_SET
    if not supports(a, w):
        raise ValueError(f"w8a8_linear takes 2-d CUDA int8 or fp8 e4m3 operands of one dtype with unit K stride; "
                         f"got a {tuple(a.shape)} {a.dtype} on {a.device}, w {tuple(w.shape)} {w.dtype}")
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0:
        return out
    t = tiles or tiles_for(m, n, k)
    if t.tma and not _ALLOCATOR_SET:
        triton.set_allocator(_tma_scratch)
        _ALLOCATOR_SET = True
    kernel = _w8_tma_kernel if t.tma else _w8_ptr_kernel
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)
    kernel[grid](a, w, out, row_scale, col_bias if col_bias is not None else row_scale, m, n, k,
                 a.stride(0), w.stride(0), out.stride(0),
                 INT8=a.dtype == torch.int8, HAS_BIAS=col_bias is not None, EVEN_K=k % t.block_k == 0,
                 BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                 num_warps=t.num_warps, num_stages=t.num_stages)
    return out
