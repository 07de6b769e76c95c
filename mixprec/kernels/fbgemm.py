"""4-bit weight GEMMs from ``fbgemm-gpu-genai`` (CUTLASS mixed-input kernels for Hopper), optional.

Why: mixprec's own Triton kernel decodes packed 4-bit codes in registers before a 16-bit or int8
MMA and runs 2-4x slower than bf16 cuBLAS at SDXL's shapes; fbgemm's preshuffled CUTLASS kernels
(``f8i4bf16_shuffled``: int4 weights x fp8 activations, ``bf16i4bf16_shuffled``: int4 x bf16) ran at
0.83-0.96x and 0.56-0.76x of bf16 cuBLAS (H200, 512 px batch-1 shapes, docs/kernels.md "Session
29"). ``kernels.low_bit=fbgemm`` sends 4-bit-storage Linear layers here:

- W4A16 (no activation bits): ``bf16i4bf16_shuffled`` with the per-channel scale repeated over
  K/128 groups and zero points 0 (``w = q * s[n]``, the same integers as the reference);
- W4A8: activations in fp8 e4m3 (static per-tensor scale, or per token with
  ``kernels.fp8_act=token``) and ``f8i4bf16_shuffled`` with row scale ``s[n]`` and every group scale
  1.0 (exact in e4m3), so ``y[m, n] = sa[m] * s[n] * sum_k xq[m, k] * q[n, k]``. The 8-bit activation
  format is fp8, not the calibrated int8 grid: the layer's reference path fake-quantizes in fp8 too.

The ops are wrapped as ``torch.library`` custom ops with shape functions, so ``torch.compile`` traces
them as extern kernels whatever fake implementations the installed fbgemm registers. The preshuffled
weights are derived buffers (not saved): a layer on this path holds them beside its packed codes.
fbgemm's wheels are built against one torch version; ``available()`` says whether the installed one
loads (``load_error()`` says why not).
"""

from __future__ import annotations

import functools

import torch

GROUP = 128  # fbgemm's int4 group size along K (it supports >= 128); our per-channel scale repeats over groups


@functools.lru_cache(maxsize=1)
def load_error() -> str | None:
    """Why the fbgemm kernels cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (9, 0):
        return f"fbgemm's mixed-input kernels need sm90 (Hopper), this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception as exc:  # not installed, or built for another torch
        return (f"fbgemm-gpu-genai did not load ({exc!r}); install the build matching torch "
                f"{torch.__version__} (pip install fbgemm-gpu-genai) or use kernels.low_bit=triton")
    return None


def available() -> bool:
    return load_error() is None


def check_loads(option: str = "kernels.low_bit=fbgemm") -> None:
    """Raise with :func:`load_error`'s reason when the kernels cannot run here (``option``: what asked)."""
    err = load_error()
    if err:
        raise RuntimeError(f"{option}: {err}")


def shape_ok(k: int, n: int) -> bool:
    """Shapes the kernels take: whole 128-column groups, 16-byte aligned rows and columns."""
    return k % GROUP == 0 and n % 16 == 0


@torch.library.custom_op("mixprec::fbgemm_f8i4", mutates_args=())
def f8i4_gemm(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, row_scale: torch.Tensor,
              group_scale: torch.Tensor) -> torch.Tensor:
    """bf16 [M, N] = x_scale[m] * row_scale[n] * sum_k xq[m, k] * (q[n, k] * group_scale[k // 128, n])."""
    return torch.ops.fbgemm.f8i4bf16_shuffled(xq, wq, x_scale, row_scale, group_scale)


@f8i4_gemm.register_fake
def _(xq, wq, x_scale, row_scale, group_scale):
    return xq.new_empty((xq.shape[0], row_scale.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("mixprec::fbgemm_bf16i4", mutates_args=())
def bf16i4_gemm(x: torch.Tensor, wq: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor) -> torch.Tensor:
    """bf16 [M, N] = sum_k x[m, k] * (q[n, k] * group_scale[g, n] + group_zero[g, n]), g = k // 128."""
    return torch.ops.fbgemm.bf16i4bf16_shuffled(x, wq, group_scale, group_zero)


@bf16i4_gemm.register_fake
def _(x, wq, group_scale, group_zero):
    return x.new_empty((x.shape[0], group_zero.shape[-1]), dtype=torch.bfloat16)


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] signed 4-bit codes (int8 in [-8, 7]) -> [N, K/2] bytes, column 2j in the low nibble."""
    c = codes.to(torch.int8)
    return torch.bitwise_or(torch.bitwise_and(c[:, 0::2], 0xF), torch.bitwise_left_shift(c[:, 1::2], 4)).contiguous()


@torch.no_grad()
def prepare_f8i4(codes: torch.Tensor, wscale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derived buffers for :func:`f8i4_gemm` from per-channel codes [N, K] and scales [N] (on CUDA)."""
    n, k = codes.shape
    ones = torch.ones(k // GROUP, n, device=codes.device).to(torch.float8_e4m3fn)
    wq, group_scale = torch.ops.fbgemm.preshuffle_i4(pack_pairs(codes), ones)
    return {"fb_wq": wq, "fb_row_scale": wscale.float().reshape(n).contiguous(), "fb_group_scale": group_scale}


@torch.no_grad()
def prepare_bf16i4(codes: torch.Tensor, wscale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derived buffers for :func:`bf16i4_gemm` from per-channel codes [N, K] and scales [N] (on CUDA)."""
    n, k = codes.shape
    scale = wscale.float().reshape(1, n).expand(k // GROUP, n).to(torch.bfloat16).contiguous()
    wq, group_scale = torch.ops.fbgemm.preshuffle_i4(pack_pairs(codes), scale)
    return {"fb_wq": wq, "fb_group_scale": group_scale,
            "fb_group_zero": torch.zeros(k // GROUP, n, device=codes.device, dtype=torch.bfloat16)}
