"""Real low-bit execution of a quantization plan.

``convert_(model, BackendConfig(...))`` turns every calibrated QuantLayer into a
:class:`KernelLayer` that runs on a real kernel (Triton int8 / packed 2-4-bit / fp8, torch's
``_scaled_mm`` and ``_int_mm``) or, where none can take it, on the reference fake-quant path; the
returned :class:`DispatchReport` says which, per layer. :func:`graphed_forwards` replays a
pipeline's components (text encoders, denoiser, VAE decoder) from CUDA graphs inside the unchanged
diffusers ``__call__``. See docs/kernels.md for numbers.
"""

from .convert import (BackendConfig, DispatchReport, LayerDispatch, choose_backend, convert_, option_coverage,
                      reference_path, report_for, weight_bytes)
from .cuda_graphs import GraphedForward, graphed_forwards
from .layers import KernelLayer, LayerSpec
from .packing import pack, packed_cols, unpack
from .triton_gemm import HAS_TRITON, TileConfig, pick_tiles

__all__ = [
    "BackendConfig", "DispatchReport", "LayerDispatch", "KernelLayer", "LayerSpec", "HAS_TRITON", "TileConfig",
    "GraphedForward", "graphed_forwards", "choose_backend", "convert_", "option_coverage", "reference_path", "report_for", "weight_bytes", "pack", "packed_cols", "unpack", "pick_tiles",
]
