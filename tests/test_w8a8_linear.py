"""The dedicated 8-bit Linear Triton GEMM (mixprec.kernels.w8a8_linear): what it takes, which tiles it
picks, and (GPU) that it computes the products of the codes exactly as the float64 reference."""

from __future__ import annotations

import pytest
import torch

from mixprec.kernels import triton_gemm
from mixprec.kernels.w8a8_linear import TILES, W8Tiles, default_tiles, rows_bucket, supports, tiles_for, w8a8_linear


def test_tiles_come_from_the_measured_table_for_sdxl_shapes_and_a_heuristic_elsewhere():
    assert rows_bucket(256) == 256 and rows_bucket(257) == 512 and rows_bucket(77) == 128 and rows_bucket(3) == 16
    assert tiles_for(256, 10240, 1280) is TILES[(256, 10240, 1280)]
    assert tiles_for(300, 96, 192) == default_tiles(300, 96, 192)
    for t in [*TILES.values(), default_tiles(77, 1280, 2048), default_tiles(4096, 640, 640)]:
        assert t.smem_bytes() <= 220 * 1024  # every tile pipelines within an H100/H200 SM's shared memory
    assert default_tiles(100, 64, 96).block_k == 64  # a K that 128 does not divide takes 64-wide steps


def test_cpu_operands_are_refused_with_what_the_kernel_takes():
    a = torch.zeros(4, 32, dtype=torch.int8)
    w = torch.zeros(8, 32, dtype=torch.int8)
    assert not supports(a, w)
    with pytest.raises(ValueError, match="2-d CUDA int8 or fp8 e4m3 operands"):
        w8a8_linear(a, w, torch.ones(8), None, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("tma", [False, True])
def test_products_match_float64_on_the_gpu(dtype, tma):
    if not torch.cuda.is_available() or not triton_gemm.HAS_TRITON:
        pytest.skip("needs CUDA and Triton")
    torch.manual_seed(0)
    # int8 sums exactly in int32. fp8 products are exact, but Hopper's fp8 MMA adds them up inside one K
    # block with fewer mantissa bits than float32 (the kernels promote to float32 between blocks):
    # 1.27e-4 measured on an H200 (session 31), the order of 2^-13
    bound = 1e-6 if dtype == torch.int8 else 5e-4
    for m, n, k in [(77, 1280, 2048), (256, 640, 640), (33, 96, 192)]:
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
            w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        else:
            a = (torch.randn(m, k, device="cuda") * 30).to(dtype)
            w = (torch.randn(n, k, device="cuda") * 30).to(dtype)
        rs = torch.rand(n, device="cuda") * 1e-3
        cb = torch.randn(n, device="cuda")
        ref = (a.double() @ w.double().t()) * rs.double() + cb.double()
        t = W8Tiles(64, 64, 64 if k % 128 else 128, 4, 3, 8, tma)
        out = w8a8_linear(a, w, rs, cb, torch.float32, t).double()
        assert ((out - ref).norm() / ref.norm()).item() < bound
        # the general kernel hands these products to this one, and returns the same result
        general = triton_gemm.launch(a, w, rs, cb, None, k, 8, triton_gemm.MMA_INT8 if dtype == torch.int8
                                     else triton_gemm.MMA_FP8, False, 255, torch.float32, [])
        assert ((general.double() - ref).norm() / ref.norm()).item() < max(bound, 1e-5)
