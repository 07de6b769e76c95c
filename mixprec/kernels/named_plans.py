"""Plans by name: the uniform families the docs and benchmarks quote, without a plan file.

A name is ``<scope>:w<W>a<A>[:<format>]``:

- ``scope`` picks the layers that get the bits (all others stay 16-bit):
  ``uniform`` every quantizable layer; ``linear`` Linear layers only (convolutions 16-bit);
  ``conv`` convolutions only; ``ff`` the transformer feed-forward layers; ``attn`` the attention
  projections (self- and cross-attention Q/K/V/out); ``inner`` every layer but the first and the
  last (``conv_in``/``conv_out``, or a transformer's patch embedding and final projection), the
  layers that see the latents themselves; ``fused`` the Linear layers whose quantization costs no
  kernel of its own in a compiled (inductor) diffusers UNet or transformer: the input comes from an
  op inductor generates (LayerNorm / GroupNorm, GEGLU, a residual add), so the activation
  quantization fuses into it, and the output feeds one it fuses into or a GEMM-only consumer:
  ``ff.net.0.proj``, ``ff.net.2``, ``proj_in``, ``proj_out``, self-attention ``to_q/to_k/to_v`` and
  cross-attention ``to_q``. Left 16-bit: attention outputs (``to_out.0``: the input comes from the
  attention kernel, so its quantization is a kernel of its own), cross-attention ``to_k/to_v`` (each
  layer quantizes the text states again, and their first token runs apart), the few-row time
  embeddings, and every convolution. The layers outside the scope are plain 16-bit layers (16-bit
  weights too): a ``fused:w8a8`` plan is a mixed plan, not uniform W8A8 (see docs/kernels.md).
- ``W``/``A`` are weight/activation bits; 16 (or more) means unquantized.
- ``format`` (optional) sets a kernel option for this plan only: ``fp8`` or ``int8`` set
  ``kernels.w8a8``; ``fbgemm`` sets ``kernels.low_bit=fbgemm`` (4-bit Linear layers on
  fbgemm-gpu-genai's CUTLASS kernels, W4A8 with fp8 activations: docs/kernels.md "Session 29");
  without it the stage's kernel options decide.

Examples: ``linear:w8a8:fp8`` (the Linear-only fp8 plan), ``ff:w8a8:fp8``, ``uniform:w8a8:int8``,
``uniform:w4a16``, ``inner:w8a8:fp8``, ``fused:w8a8:fp8``, ``fused:w4a8:fbgemm``, ``linear:w4a16:fbgemm``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch.nn as nn

FORMATS = {"fp8": {"w8a8": "fp8"}, "int8": {"w8a8": "int8"}, "fbgemm": {"low_bit": "fbgemm"}}
_NAME = re.compile(r"^(?P<scope>[a-z_]+):w(?P<w>\d+)a(?P<a>\d+)(?::(?P<fmt>[a-z0-9]+))?$")
_FIRST_LAST = {"conv_in", "conv_out", "pos_embed.proj", "proj_out"}
# Linear layers whose activation quantization inductor fuses into the producer (see ``fused`` above)
_FUSED = re.compile(r"(\.ff\.net\.0\.proj|\.ff\.net\.2|\.proj_in|\.proj_out|\.attn1\.to_[qkv]|\.attn2\.to_q)$")


def _inner(module: nn.Module) -> nn.Module:
    return getattr(module, "inner", module)  # a QuantLayer wraps the Linear/Conv2d


SCOPES: dict[str, Callable[[str, nn.Module], bool]] = {
    "uniform": lambda name, m: True,
    "linear": lambda name, m: isinstance(_inner(m), nn.Linear),
    "conv": lambda name, m: isinstance(_inner(m), nn.Conv2d),
    "ff": lambda name, m: ".ff." in f".{name}.",
    "attn": lambda name, m: bool(re.search(r"\.attn\d?\.(to_q|to_k|to_v|to_out\.0)$", f".{name}")),
    "inner": lambda name, m: name not in _FIRST_LAST,
    "fused": lambda name, m: isinstance(_inner(m), nn.Linear) and bool(_FUSED.search(f".{name}")),
}


@dataclass(frozen=True)
class NamedPlan:
    scope: str
    w_bits: int | None
    a_bits: int | None
    fmt: str | None = None

    def kernel_overrides(self) -> dict:
        """Backend options this plan sets over the stage's (from the name's format, if any)."""
        return dict(FORMATS[self.fmt]) if self.fmt else {}

    def bits(self, layers: Mapping[str, nn.Module]) -> tuple[dict, dict]:
        """(weight bits, activation bits) by layer name for ``layers`` (QuantLayers or plain layers)."""
        chosen = [n for n, m in layers.items() if SCOPES[self.scope](n, m)]
        return {n: self.w_bits for n in chosen}, {n: self.a_bits for n in chosen}


def parse_plan_name(name: str) -> NamedPlan | None:
    """The :class:`NamedPlan` for ``name``, or None when ``name`` is not of the named form (a file
    path, ``final``). A name of that form with an unknown scope or format raises ValueError."""
    m = _NAME.match(name.strip().lower())
    if not m:
        return None
    scope, fmt = m.group("scope"), m.group("fmt")
    if scope not in SCOPES:
        raise ValueError(f"plan {name!r}: unknown scope {scope!r}; use one of {sorted(SCOPES)}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"plan {name!r}: unknown format {fmt!r}; use one of {tuple(FORMATS)} (or leave it out)")
    w, a = int(m.group("w")), int(m.group("a"))
    return NamedPlan(scope, None if w >= 16 else w, None if a >= 16 else a, fmt)
