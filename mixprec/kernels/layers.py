"""The module that replaces a calibrated :class:`~mixprec.quantizers.QuantLayer` for real execution.

A :class:`KernelLayer` holds only what inference needs: integer (packed) or fp8 weight codes, their
scales, the bias, and the static activation parameters. Its ``forward`` picks one execution path
from the input shape and device (a Python decision that torch.compile resolves while tracing, so
there is no graph break):

- ``triton``    Triton GEMM / implicit-GEMM conv (int8, weight-only 2/4/8-bit, fp8 convs);
- ``scaled_mm`` torch._scaled_mm, fp8 e4m3 Linear layers;
- ``int_mm``    torch._int_mm, int8 Linear layers (optional);
- ``fbgemm``    fbgemm-gpu-genai's CUTLASS int4 x fp8 / int4 x bf16 kernels, 4-bit Linear layers
                (``kernels.low_bit=fbgemm``, optional dependency: :mod:`mixprec.kernels.fbgemm`);
- ``gemv``      Linear layers with a handful of rows (time embeddings, the BOS row of cross-attn
                K/V): compiled, a product-and-sum that inductor fuses into one reduction over the
                codes; eager, a GEMV kernel (a tensor-core tile would be 15/16 empty, and the GEMM
                kernel walks K serially on too few CTAs: ~15 us a call);
- ``emulate``   the kernel arithmetic in torch (CPU, for tests);
- ``reference`` fake quantization from the stored codes: identical to QuantLayer's forward.

Everything the layer stores is described by a JSON-able :class:`LayerSpec`, so a checkpoint can
rebuild the module with empty buffers and load the tensors into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.quant.groups import dequantize_codes, num_groups
from mixprec.quantizers import QuantLayer, dequantize_weight, fake_quant_act, weight_qmax

from . import fbgemm, packing
from .triton_gemm import (FP8_MAX, FP8_MMAS, GEMV_MAX_ROWS, HAS_TRITON, MMA_16, MMA_FP8, MMA_FP8_FAST, MMA_INT8, gemv,
                          qgemm, quant_act_fp8, quant_act_fp8_token, quant_act_int)

BACKENDS = ("reference", "int8", "fp8", "wonly")


@dataclass
class LayerSpec:
    """Everything needed to rebuild a quantized layer's module (all JSON-able)."""

    name: str
    kind: str                       # "linear" | "conv"
    out_features: int
    in_features: int                # Linear: K; conv: input channels
    kernel_size: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: int = 0
    has_bias: bool = True
    w_bits: int | None = None
    a_bits: int | None = None
    weight_format: str = "int"      # "int" (codes, packed) | "fp8" | "fp" (weights kept in 16 bit)
    storage_bits: int = 8           # bits per stored code: 2, 4 or 8
    act_scale: float | None = None  # int activations: asymmetric (scale, zero); fp8: symmetric scale
    act_zero: int | None = None
    fp8_weight: str = "tensor"      # fp8 weight scales: "tensor" | "channel" (per output channel, applied
                                    # after a tensor-wise GEMM) | "rowwise" (the same scales through
                                    # _scaled_mm's row-wise kernel)
    fp8_act: str = "tensor"         # fp8 activation scales: "tensor" (the calibrated static scale) | "token"
                                    # (one per GEMM row, max|row| / 448 at run time; Linear layers only)
    skip_first_token: bool = False
    bos: str = "weight_only"        # first (BOS) token of cross-attn K/V: "weight_only" | "exact"
    backend: str = "reference"
    group_size: int = 0             # int weights: 0 = one scale per output channel; G = one per G input
                                    # columns in PyTorch's (c, kh, kw) order (reference path only)
    rounding: str = "nearest"       # how the codes were rounded: "nearest" | "gptq"

    @property
    def groups(self) -> int:
        """Weight columns are packed per conv tap (kh, kw): one group for Linear."""
        return self.kernel_size[0] * self.kernel_size[1] if self.kind == "conv" else 1

    @property
    def k(self) -> int:
        kh, kw = self.kernel_size
        return self.in_features * kh * kw if self.kind == "conv" else self.in_features

    def to_json(self) -> dict:
        d = asdict(self)
        d["kernel_size"] = list(self.kernel_size)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LayerSpec":
        d = dict(d)
        d["kernel_size"] = tuple(d.get("kernel_size", (1, 1)))
        return cls(**d)


def storage_bits_for(w_bits: int) -> int:
    if w_bits < 2 or w_bits > 8:
        raise ValueError(f"weight bits must be in [2, 8] for integer storage, got {w_bits}")
    return 2 if w_bits <= 2 else 4 if w_bits <= 4 else 8


def _codes_layout(w: torch.Tensor) -> torch.Tensor:
    """[N, K] view of a weight-shaped tensor, conv columns ordered (kh, kw, c)."""
    if w.dim() == 4:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.reshape(w.shape[0], -1)


class KernelLayer(nn.Module):
    """A quantized Linear/Conv2d running on a real kernel, or on the reference path when it can't."""

    def __init__(self, spec: LayerSpec, dtype: torch.dtype = torch.float16, device=None,
                 cpu_path: str = "reference", min_m: int = 1, int8_impl: str = "triton",
                 act_quant: str = "producer", fp8_fast_accum: bool = False, gemv_max_m: int = 8,
                 low_bit_impl: str = "triton"):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.cpu_path = cpu_path
        self.min_m = min_m
        self.gemv_max_m = gemv_max_m
        self.int8_impl = int8_impl
        self.low_bit_impl = low_bit_impl
        self.act_quant = act_quant
        self.fp8_fast_accum = fp8_fast_accum
        self.compute_dtype = dtype
        # the attributes of the module it replaces that callers read (diffusers reads in_features)
        if spec.kind == "conv":
            self.in_channels, self.out_channels = spec.in_features, spec.out_features
            self.kernel_size = tuple(spec.kernel_size)
            self.stride, self.padding = (spec.stride,) * 2, (spec.padding,) * 2
        else:
            self.in_features, self.out_features = spec.in_features, spec.out_features
        n, k = spec.out_features, spec.k
        kw = dict(device=device)
        if spec.weight_format == "fp":
            shape = (n, spec.in_features, *spec.kernel_size) if spec.kind == "conv" else (n, k)
            self.register_buffer("weight", torch.empty(shape, dtype=dtype, **kw))
        elif spec.weight_format == "int":
            cols = packing.packed_cols(k, spec.storage_bits, spec.groups)
            code_dtype = torch.int8 if spec.storage_bits == 8 else torch.uint8
            self.register_buffer("qweight", torch.empty((n, cols), dtype=code_dtype, **kw))
            scale_shape = (n, num_groups(k, spec.group_size)) if spec.group_size else (n,)
            self.register_buffer("wscale", torch.empty(scale_shape, dtype=torch.float32, **kw))
        elif spec.weight_format == "fp8":
            self.register_buffer("qweight", torch.empty((n, k), dtype=torch.float8_e4m3fn, **kw))
            self.register_buffer("wscale", torch.empty(n if spec.fp8_weight != "tensor" else 1,
                                                       dtype=torch.float32, **kw))
        else:
            raise ValueError(f"{spec.name}: unknown weight format {spec.weight_format!r}")
        if spec.has_bias:
            self.register_buffer("bias", torch.empty(n, dtype=dtype, **kw))
        else:
            self.bias = None
        if spec.skip_first_token and spec.bos == "exact" and spec.weight_format != "fp":
            self.register_buffer("bos_weight", torch.empty((n, k), dtype=dtype, **kw))
        self._prepared = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quant_layer(cls, layer: QuantLayer, backend: str, *, fp8_weight: str = "tensor",
                         fp8_act: str = "tensor", bos: str = "weight_only", **kwargs) -> "KernelLayer":
        inner = layer.inner
        w = inner.weight.detach()
        is_conv = isinstance(inner, nn.Conv2d)
        if is_conv:
            for attr, val in (("stride", inner.stride), ("padding", inner.padding)):
                if isinstance(val, str) or len(set(val)) != 1:
                    raise ValueError(f"{layer.name}: only square {attr} is supported, got {val}")
        spec = LayerSpec(
            name=layer.name, kind="conv" if is_conv else "linear",
            out_features=w.shape[0], in_features=w.shape[1],
            kernel_size=tuple(w.shape[2:]) if is_conv else (1, 1),
            stride=inner.stride[0] if is_conv else 1, padding=inner.padding[0] if is_conv else 0,
            has_bias=inner.bias is not None, w_bits=layer.w_bits, a_bits=layer.a_bits,
            skip_first_token=layer.skip_first_token, bos=bos, backend=backend, fp8_weight=fp8_weight,
            # per-token scales for Linear layers only: in a conv each output row sums 9 input pixels,
            # whose own scales would not factor out of the implicit GEMM's sum
            fp8_act=fp8_act if backend == "fp8" and not is_conv and layer.a_bits is not None else "tensor",
        )
        params = layer.params
        if layer.w_bits is None:
            spec.weight_format = "fp"
        elif backend == "fp8" and layer.w_bits == 8:
            spec.weight_format = "fp8"
        else:
            spec.weight_format = "int"
            spec.storage_bits = storage_bits_for(layer.w_bits)
            spec.group_size = int(layer.w_group)
            spec.rounding = "gptq" if params.uses_gptq else "nearest"
            if spec.group_size and backend != "reference":
                raise ValueError(f"{layer.name}: per-group weight scales run on the reference backend only, "
                                 f"not {backend!r} (choose_backend says so)")
        if layer.a_bits is not None:
            if backend == "fp8":
                s, z = params.act_params[8] if 8 in params.act_params else params.act_params[layer.a_bits]
                levels = 2 ** (8 if 8 in params.act_params else layer.a_bits) - 1
                lo, hi = -z * s, (levels - z) * s
                if params.act_range is not None:
                    lo, hi = params.act_range
                spec.act_scale = max(abs(lo), abs(hi), 1e-8) / FP8_MAX
            else:
                s, z = params.act_params[layer.a_bits]
                spec.act_scale, spec.act_zero = float(s), int(z)
        mod = cls(spec, dtype=w.dtype, device=w.device, **kwargs)
        with torch.no_grad():
            if spec.weight_format == "fp":
                mod.weight.copy_(w)
            elif spec.weight_format == "int":
                # the QuantLayer's own codes (nearest or GPTQ): the kernels compute its fake quantization
                q, scale = layer.weight_codes()
                mod.qweight.copy_(packing.pack(_codes_layout(q), spec.storage_bits, spec.groups))
                mod.wscale.copy_(scale.to(w.device, torch.float32))
            else:
                mod._fill_fp8(w, params.weight_scales[layer.w_bits].to(w.device, torch.float32))
            if spec.has_bias:
                mod.bias.copy_(inner.bias.detach())
            if hasattr(mod, "bos_weight"):
                mod.bos_weight.copy_(w.reshape(w.shape[0], -1))
        mod.prepare()
        return mod

    def _fill_fp8(self, w: torch.Tensor, int8_scale: torch.Tensor) -> None:
        # The calibrated 8-bit scale fixes the clipping range (amax = 127 * scale); fp8 spans it.
        amax = int8_scale * weight_qmax(8)
        if self.spec.fp8_weight == "tensor":
            amax = amax.max().reshape(1)
        scale = (amax / FP8_MAX).clamp_min(1e-12)
        wf = _codes_layout(w).float()
        codes = torch.clamp(wf / scale.reshape(-1, 1), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        self.qweight.copy_(codes)
        self.wscale.copy_(scale)

    # ------------------------------------------------------------------ derived tensors
    @torch.no_grad()
    def prepare(self) -> None:
        """(Re)compute the epilogue vectors from the stored tensors (after building or loading)."""
        spec = self.spec
        dev = (self.weight if spec.weight_format == "fp" else self.qweight).device
        n = spec.out_features
        bias32 = self.bias.float() if self.bias is not None else torch.zeros(n, device=dev)
        derived: dict[str, torch.Tensor] = {}
        if spec.weight_format != "fp" and not spec.group_size:  # grouped scales: reference path, no epilogue
            wscale_n = self.wscale.expand(n).contiguous() if self.wscale.numel() == 1 else self.wscale
            # weight-only epilogue: 16-bit activations times decoded codes (also the BOS path)
            derived["wo_row_scale"] = wscale_n.clone()
            derived["wo_col_bias"] = bias32.clone()
            if spec.a_bits is not None and spec.weight_format == "int" and spec.backend != "fp8":
                levels = 2 ** spec.a_bits - 1
                zp = spec.act_zero
                off = 128 if spec.a_bits == 8 else zp
                codes = self.decode_codes().to(torch.float64)
                rowsum = codes.sum(dim=1)
                row_scale = wscale_n.double() * spec.act_scale
                derived["row_scale"] = row_scale.float()
                derived["col_bias"] = (bias32.double() + row_scale * (off - zp) * rowsum).float()
                derived["aq"] = torch.tensor([1.0 / spec.act_scale, zp, off], dtype=torch.float32, device=dev)
                derived["act_q"] = torch.tensor([spec.act_scale, zp, off], dtype=torch.float32, device=dev)
                self.levels = levels
            if spec.weight_format == "int" and spec.backend == "fp8" and spec.a_bits is not None:
                # 4-bit codes x fp8 activations (fbgemm's f8i4 kernel; the gemv path for few rows)
                token = spec.fp8_act == "token"
                derived["row_scale"] = (wscale_n.double() * (1.0 if token else spec.act_scale)).float()
                derived["col_bias"] = bias32.clone()
                derived["act_inv"] = torch.tensor(1.0 / spec.act_scale, dtype=torch.float32, device=dev)
                derived["scale_a"] = torch.tensor(spec.act_scale, dtype=torch.float32, device=dev)
                self.levels = 0
            if spec.weight_format == "fp8" and spec.a_bits is not None:
                derived["row_scale"] = (wscale_n.double() * spec.act_scale).float()
                derived["col_bias"] = bias32.clone()
                derived["aq"] = torch.tensor([1.0 / spec.act_scale, 0.0, 0.0], dtype=torch.float32, device=dev)
                derived["act_inv"] = torch.tensor(1.0 / spec.act_scale, dtype=torch.float32, device=dev)
                derived["scale_a"] = torch.tensor(spec.act_scale, dtype=torch.float32, device=dev)
                derived["scale_b"] = (self.wscale.reshape(()) if self.wscale.numel() == 1
                                      else self.wscale.reshape(1, -1)).float().contiguous()
                if spec.fp8_weight == "channel":  # the GEMM runs tensor-wise, the epilogue scales channels
                    derived["scale_b"] = torch.ones((), dtype=torch.float32, device=dev)
                if spec.fp8_act == "token":  # activation scales come per row at run time
                    derived["row_scale"] = wscale_n.float().clone()
                    derived["scale_b_row"] = wscale_n.float().reshape(1, -1).contiguous()
                    # the tensor-wise GEMM's scalar scales put its 16-bit output at the layer's own size
                    # (unit scales overflow float16: |acc| reaches 448^2 * K); the epilogue rescales
                    w_max = wscale_n.double().max()
                    derived["gemm_scale_a"] = torch.tensor(spec.act_scale, dtype=torch.float32, device=dev)
                    derived["gemm_scale_b"] = w_max.float().to(dev)
                    derived["token_rescale"] = (wscale_n.double() / (spec.act_scale * w_max)).float()
                self.levels = 0
        if self._takes_fbgemm(dev):
            codes = self.decode_codes()
            derived.update(fbgemm.prepare_f8i4(codes, self.wscale) if spec.backend == "fp8"
                           else fbgemm.prepare_bf16i4(codes, self.wscale))
        for name, t in derived.items():
            self.register_buffer(name, t, persistent=False)
        self._prepared = True

    def _takes_fbgemm(self, dev: torch.device) -> bool:
        """Whether this layer runs fbgemm's int4 kernels: 4-bit codes of a Linear layer, bf16, on a GPU
        where fbgemm loads; W4A16 only when ``kernels.low_bit=fbgemm`` chose it, 4-bit x fp8 always
        (it has no other kernel)."""
        spec = self.spec
        if not (spec.kind == "linear" and spec.weight_format == "int" and spec.storage_bits == 4
                and not spec.group_size and dev.type == "cuda" and self.compute_dtype == torch.bfloat16
                and fbgemm.shape_ok(spec.k, spec.out_features)):
            return False
        wanted = (spec.backend == "fp8" and spec.a_bits is not None) or (
            spec.backend == "wonly" and self.low_bit_impl == "fbgemm")
        return wanted and fbgemm.available()

    @property
    def fp8_activations(self) -> bool:
        """Activations quantize to fp8 e4m3 (fp8 weights, or 4-bit codes on the fp8 backend), on every
        path, the reference one included (also when a checkpoint loads onto the reference backend)."""
        return self.spec.weight_format == "fp8" or self.spec.backend == "fp8"

    def decode_codes(self) -> torch.Tensor:
        """Integer (or fp8) codes as [N, K], conv columns in (kh, kw, c) order."""
        return _decode(self.qweight, self.spec)

    # ------------------------------------------------------------------ reference path
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the reference path multiplies with, in the module's original layout."""
        spec = self.spec
        dtype = dtype or self.compute_dtype
        if spec.weight_format == "fp":
            return self.weight.to(dtype)
        codes = self.decode_codes()
        if spec.group_size:
            return self._dequantized_grouped(codes, dtype)
        if spec.weight_format == "int":
            w = dequantize_weight(codes, self.wscale, dtype)
        else:
            w = (codes.float() * self.wscale.reshape(-1, 1)).to(dtype)
        if spec.kind == "conv":
            kh, kw = spec.kernel_size
            # contiguous: a channels-last weight could make the conv pick another algorithm
            # (clone, not .contiguous(): a 1x1 weight already counts as contiguous and would keep
            # the permuted strides of its size-1 dims)
            w = w.reshape(spec.out_features, kh, kw, spec.in_features).permute(0, 3, 1, 2)
            w = w.clone(memory_format=torch.contiguous_format)
        return w

    def _dequantized_grouped(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Codes times per-group scales; groups run along the (c, kh, kw) columns of the original weight."""
        spec = self.spec
        if spec.kind == "conv":
            kh, kw = spec.kernel_size
            codes = codes.reshape(spec.out_features, kh, kw, spec.in_features).permute(0, 3, 1, 2)
            w = dequantize_codes(codes.reshape(spec.out_features, -1), self.wscale, spec.group_size, dtype)
            return w.reshape(spec.out_features, spec.in_features, kh, kw)
        return dequantize_codes(codes, self.wscale, spec.group_size, dtype)

    def _fake_act(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.a_bits is None:
            return x
        if self.fp8_activations and spec.fp8_act == "token":
            codes, scale = quant_act_fp8_token(x.reshape(-1, x.shape[-1]))
            return (codes.float() * scale).to(x.dtype).reshape(x.shape)
        if self.fp8_activations:
            return (quant_act_fp8(x, 1.0 / spec.act_scale).float() * spec.act_scale).to(x.dtype)
        return fake_quant_act(x, spec.act_scale, spec.act_zero, spec.a_bits)

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "conv":
            return F.conv2d(x, weight, self.bias, spec.stride, spec.padding)
        return F.linear(x, weight, self.bias)

    def _bos_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if hasattr(self, "bos_weight"):
            return self.bos_weight.to(dtype)
        return self.dequantized_weight(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization from the stored codes: the same computation as QuantLayer.forward."""
        split = self._splits(x)
        rest = x[:, 1:] if split else x
        w = self.dequantized_weight(x.dtype)
        out = self._dense(self._fake_act(rest), w)
        if split:
            # contiguous, as in QuantLayer.forward: the same GEMM whether or not a weight requires grad
            out = torch.cat([self._dense(x[:, :1].contiguous(), self._bos_weight(x.dtype)), out], dim=1)
        return out

    # ------------------------------------------------------------------ dispatch
    def _splits(self, x: torch.Tensor) -> bool:
        return self.spec.skip_first_token and x.dim() == 3 and x.shape[1] > 1

    def route(self, m: int, is_cuda: bool) -> str:
        """The execution path for ``m`` GEMM rows on this device (also what the report shows)."""
        spec = self.spec
        if spec.backend == "reference":
            return "reference"
        if m < self.min_m:  # before the CPU choice: reference_path() forces the reference on CPU too
            return "reference"
        if not is_cuda:
            emulates = self.cpu_path == "emulate" and not (spec.weight_format == "int" and spec.backend == "fp8")
            return "emulate" if emulates else "reference"
        if self._gemv_takes(m):  # plain torch ops: needs no Triton
            return "gemv"
        if hasattr(self, "fb_wq"):  # prepared for fbgemm (see _takes_fbgemm)
            return "fbgemm"
        if spec.weight_format == "int" and spec.backend == "fp8":  # 4-bit x fp8: no other kernel
            return "reference"
        if not HAS_TRITON and not (spec.backend in ("fp8", "int8") and spec.kind == "linear"):
            return "reference"
        k, n = spec.k, spec.out_features
        if spec.kind == "linear" and spec.backend == "fp8" and spec.a_bits is not None:
            if k % 16 == 0 and n % 16 == 0 and m >= 16:
                return "scaled_mm"
        if (spec.kind == "linear" and spec.backend == "int8" and self.int8_impl == "torch"
                and spec.storage_bits == 8 and m > 16 and k % 8 == 0 and n % 8 == 0):
            return "int_mm"
        return "triton" if HAS_TRITON else "reference"

    def gemm_rows(self, x: torch.Tensor) -> int:
        if self.spec.kind == "conv":
            from .triton_gemm import conv_out_hw
            kh, kw = self.spec.kernel_size
            oh, ow = conv_out_hw(x.shape[-2], x.shape[-1], kh, kw, self.spec.stride, self.spec.padding)
            return (x.shape[0] if x.dim() == 4 else 1) * oh * ow
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if self._splits(x):
            rows = rows // x.shape[1] * (x.shape[1] - 1)
        return rows

    def _gemv_takes(self, m: int) -> bool:
        spec = self.spec
        return spec.kind == "linear" and spec.weight_format != "fp" and 0 < m <= self.gemv_max_m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.route(self.gemm_rows(x), x.is_cuda)
        if path == "reference":
            return self.reference_forward(x)
        if self._splits(x):
            bos = x[:, :1]
            if self._gemv_takes(x.shape[0]) and not hasattr(self, "bos_weight"):
                first = self.gemv(bos, MMA_16)
            else:
                first = self._weight_only(bos, path)
            return torch.cat([first, self._main(x[:, 1:], path)], dim=1)
        return self._main(x, path)

    # ------------------------------------------------------------------ kernel paths
    def _mma(self) -> int:
        spec = self.spec
        if spec.a_bits is None or spec.weight_format == "fp":
            return MMA_16
        if self.fp8_activations:
            return MMA_FP8_FAST if self.fp8_fast_accum else MMA_FP8
        return MMA_INT8

    def _conv_args(self) -> list[int]:
        s = self.spec
        return [s.kernel_size[0], s.kernel_size[1], s.stride, s.padding] if s.kind == "conv" else []

    def _main(self, x: torch.Tensor, path: str) -> torch.Tensor:
        spec = self.spec
        if spec.weight_format == "fp":  # activation-only quantization: fake-quant + dense
            return self._dense(self._fake_act(x), self.weight)
        if path == "fbgemm":
            return self._fbgemm(x)
        mma = self._mma()
        if spec.fp8_act == "token" and mma in FP8_MMAS:
            return self._fp8_token(x, path, mma)
        if path == "gemv":
            return self.gemv(x, mma)
        if mma == MMA_16:
            return self._weight_only(x, path)
        if path == "scaled_mm":
            return self._scaled_mm(x)
        if path == "int_mm":
            return self._int_mm(x)
        in_kernel = self.act_quant == "kernel"
        a = x
        if not in_kernel:
            a = self._quant_int(x) if mma == MMA_INT8 else self._quant_fp8(x)
        return self._run(a, mma, in_kernel, self.row_scale, self.col_bias, x.dtype)

    # The static activation scale (and zero point) are read from 0-d/1-d float32 buffers, not from the
    # spec's Python numbers: a Python number is a constant that torch.compile specializes on, so
    # every layer (every block of a regionally compiled model) would compile its own graph. The
    # results are bit for bit the same (a Python float operand is rounded to float32 all the same).
    def _quant_fp8(self, x: torch.Tensor) -> torch.Tensor:
        return quant_act_fp8(x, self.act_inv)

    def _quant_int(self, x: torch.Tensor) -> torch.Tensor:
        q = self.act_q
        return quant_act_int(x, q[0], q[1], q[2], self.levels)

    def _weight_only(self, x: torch.Tensor, path: str) -> torch.Tensor:
        if self.spec.weight_format == "fp":
            return self._dense(x, self.weight)
        if hasattr(self, "bos_weight") and self._splits_bos_shape(x):
            return F.linear(x, self.bos_weight, self.bias)
        return self._run(x, MMA_16, False, self.wo_row_scale, self.wo_col_bias, x.dtype)

    def _splits_bos_shape(self, x: torch.Tensor) -> bool:
        return self.spec.skip_first_token and x.dim() == 3 and x.shape[1] == 1

    def _run(self, a: torch.Tensor, mma: int, qa: bool, row_scale: torch.Tensor, col_bias: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
        spec = self.spec
        aq = getattr(self, "aq", None) if mma != MMA_16 else None
        levels = self.levels if mma == MMA_INT8 else 0
        bits = spec.storage_bits if spec.weight_format == "int" else 8
        if spec.kind == "conv":
            # channels-last keeps each tap's C input channels contiguous: the K-major tiles that
            # 8-bit tensor-core MMAs need (a no-op when the producer already wrote channels-last)
            a = a.contiguous(memory_format=torch.channels_last)
            return qgemm(a, self.qweight, row_scale, col_bias, aq, spec.k, bits, mma, qa, levels,
                         out_dtype, self._conv_args())
        lead = a.shape[:-1]
        out = qgemm(a.reshape(-1, spec.k), self.qweight, row_scale, col_bias, aq, spec.k, bits, mma, qa,
                    levels, out_dtype, [])
        return out.reshape(*lead, spec.out_features)

    def gemv(self, x: torch.Tensor, mma: int) -> torch.Tensor:
        """The kernel arithmetic for a few rows: ``sum_k a[m, k] * codes[n, k]`` in float32, then
        the epilogue. Under torch.compile a product-and-sum that inductor fuses with the decoding;
        eager, the GEMV kernel for 8-bit codes (a float32 matmul without CUDA or for packed codes)."""
        spec = self.spec
        lead = x.shape[:-1]
        a = x.reshape(-1, spec.k)
        if mma == MMA_INT8:
            a = self._quant_int(a)
            row_scale, col_bias = self.row_scale, self.col_bias
        elif mma in FP8_MMAS:
            a = self._quant_fp8(a)
            row_scale, col_bias = self.row_scale, self.col_bias
        else:
            row_scale, col_bias = self.wo_row_scale, self.wo_col_bias
        if torch.compiler.is_compiling():
            # inductor fuses decode, product and sum into one reduction per layer: measured on SDXL
            # (H100) ~0.4 ms for its 161 few-row products vs 1.5 ms through the GEMV kernel
            acc = (a.float()[:, None, :] * self.decode_codes().float()[None, :, :]).sum(-1)
            out = (acc * row_scale + col_bias).to(x.dtype)
        elif spec.storage_bits == 8 and a.shape[0] <= GEMV_MAX_ROWS:
            out = gemv(a.float(), self.qweight, row_scale, col_bias, x.dtype)
        else:
            acc = a.float() @ self.decode_codes().float().t()
            out = (acc * row_scale + col_bias).to(x.dtype)
        return out.reshape(*lead, spec.out_features)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.fp8_act == "token":
            return self._scaled_mm_token(x)
        lead = x.shape[:-1]
        # cuBLASLt takes only row-major A: a strided view (channels-last input) must be copied
        xq = self._quant_fp8(x.reshape(-1, spec.k)).contiguous()
        scale_a = self.scale_a
        if self.scale_b.dim() == 2:  # row-wise weight scales need row-wise activation scales
            scale_a = scale_a.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
        if spec.fp8_weight == "channel":
            # per-channel scales after cuBLAS's tensor-wise fp8 GEMM: on an H200 (torch 2.11) the
            # row-wise _scaled_mm kernel took 7.2 us at 256x1280x1280 against 4.6 us tensor-wise
            # (bf16: 5.9); this multiply-add is one pointwise op that inductor fuses downstream
            out = torch._scaled_mm(xq, self.qweight.t(), scale_a=scale_a, scale_b=self.scale_b, out_dtype=x.dtype,
                                   use_fast_accum=self.fp8_fast_accum)
            out = (out.float() * self.wscale + self.col_bias).to(x.dtype)
            return out.reshape(*lead, spec.out_features)
        bias = self.bias if self.bias is not None and x.dtype == torch.bfloat16 else None
        out = torch._scaled_mm(xq, self.qweight.t(), scale_a=scale_a, scale_b=self.scale_b, bias=bias,
                               out_dtype=x.dtype, use_fast_accum=self.fp8_fast_accum)
        if self.bias is not None and bias is None:
            out = out + self.bias
        return out.reshape(*lead, spec.out_features)

    def _fp8_token(self, x: torch.Tensor, path: str, mma: int) -> torch.Tensor:
        """fp8 with per-token activation scales ``sa[m]`` and weight scales ``sw[n]``:
        ``y = sa[m] * sw[n] * sum_k xq[m, k] * Wq[n, k] + bias[n]``."""
        spec = self.spec
        if path == "scaled_mm":
            return self._scaled_mm(x)
        lead = x.shape[:-1]
        xq, sa = quant_act_fp8_token(x.reshape(-1, spec.k))
        zeros = torch.zeros_like(self.col_bias)
        if path == "gemv" and torch.compiler.is_compiling():  # fused by inductor, as in gemv()
            acc = (xq.float()[:, None, :] * self.decode_codes().float()[None, :, :]).sum(-1)
        elif path == "gemv" and xq.shape[0] <= GEMV_MAX_ROWS and spec.weight_format == "fp8":
            acc = gemv(xq.float(), self.qweight, torch.ones_like(zeros), zeros, torch.float32)
        elif path == "gemv":  # 4-bit codes with fp8 activations
            acc = xq.float() @ self.decode_codes().float().t()
        else:  # the Triton GEMM (or its emulation) with unit scales; float32 out, scaled below
            acc = qgemm(xq, self.qweight, torch.ones_like(zeros), None, None, spec.k, 8, mma, False, 0,
                        torch.float32, [])
        out = (acc * (sa * self.row_scale) + self.col_bias).to(x.dtype)
        return out.reshape(*lead, spec.out_features)

    def _scaled_mm_token(self, x: torch.Tensor) -> torch.Tensor:
        """``_scaled_mm`` with per-token activation scales: ``fp8_weight=rowwise`` passes both scale
        vectors to the row-wise kernel (scale_a [M, 1], scale_b [1, N], float32, contiguous);
        otherwise the tensor-wise GEMM runs with scalar scales (the calibrated activation scale and the
        largest weight scale, so its 16-bit output has the layer's size) and one pointwise op (fused by
        inductor downstream) applies ``sa[m] * sw[n]`` relative to them, and the bias."""
        spec = self.spec
        lead = x.shape[:-1]
        xq, sa = quant_act_fp8_token(x.reshape(-1, spec.k))
        xq = xq.contiguous()  # cuBLASLt takes only row-major A (the codes keep a strided input's layout)
        if spec.fp8_weight == "rowwise":
            bias = self.bias if self.bias is not None and x.dtype == torch.bfloat16 else None
            out = torch._scaled_mm(xq, self.qweight.t(), scale_a=sa, scale_b=self.scale_b_row, bias=bias,
                                   out_dtype=x.dtype, use_fast_accum=self.fp8_fast_accum)
            if self.bias is not None and bias is None:
                out = out + self.bias
        else:
            out = torch._scaled_mm(xq, self.qweight.t(), scale_a=self.gemm_scale_a, scale_b=self.gemm_scale_b,
                                   out_dtype=x.dtype, use_fast_accum=self.fp8_fast_accum)
            out = (out.float() * (sa * self.token_rescale) + self.col_bias).to(x.dtype)
        return out.reshape(*lead, spec.out_features)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        """4-bit codes on fbgemm's CUTLASS kernels: fp8 activations (static scale, or per token) or
        bf16 ones; the bias as a pointwise add that inductor fuses into the consumer."""
        spec = self.spec
        lead = x.shape[:-1]
        a = x.reshape(-1, spec.k)
        if spec.backend == "fp8":
            if spec.fp8_act == "token":
                xq, sa = quant_act_fp8_token(a)
                sa = sa.reshape(-1)
            else:
                xq, sa = self._quant_fp8(a), self.scale_a.expand(a.shape[0])
            out = fbgemm.f8i4_gemm(xq.contiguous(), self.fb_wq, sa.contiguous(), self.fb_row_scale,
                                   self.fb_group_scale)
        else:
            out = fbgemm.bf16i4_gemm(a.contiguous(), self.fb_wq, self.fb_group_scale, self.fb_group_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*lead, spec.out_features)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        lead = x.shape[:-1]
        xq = self._quant_int(x.reshape(-1, spec.k)).contiguous()
        acc = torch._int_mm(xq, self.qweight.t())
        out = (acc.float() * self.row_scale + self.col_bias).to(x.dtype)
        return out.reshape(*lead, spec.out_features)

    # ------------------------------------------------------------------ bookkeeping
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        s = self.spec
        group = f", group_size={s.group_size}" if s.group_size else ""
        return (f"name={s.name}, kind={s.kind}, w_bits={s.w_bits}{group}, a_bits={s.a_bits}, backend={s.backend}, "
                f"format={s.weight_format}/{s.storage_bits}, rounding={s.rounding}")


def _decode(qweight: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    if spec.weight_format == "fp8":
        return qweight
    return packing.unpack(qweight, spec.storage_bits, spec.k, spec.groups)
