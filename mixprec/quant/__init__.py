"""Weight quantization choices beyond one scale per channel and round-to-nearest.

- :mod:`.options`: a layer's weight option = (bits, group size), its name in tables and plans
  (imports nothing heavy: the artifact readers use it);
- :mod:`.groups`: scales per group of input columns, and codes/dequantization for either granularity;
- :mod:`.gptq`: GPTQ rounding (error feedback through the inverse Hessian of the layer's inputs on the
  calibration prompts) for Linear and Conv2d (via unfold) layers, per channel or per group.

The switchable fake-quant layer that uses them is :class:`mixprec.quantizers.QuantLayer`. The torch
modules load on first use of one of their names, so ``mixprec.quant.options`` stays torch-free.
"""

from importlib import import_module

from .options import WeightOption, option_order, parse_weight_option, table_key, weight_options

_LAZY = {"HessianAccumulator": "gptq", "gptq_codes": "gptq", "output_error": "gptq",
         "column_scales": "groups", "dequantize_codes": "groups", "group_weight_scales": "groups",
         "nearest_codes": "groups", "num_groups": "groups"}

__all__ = ["WeightOption", "option_order", "parse_weight_option", "table_key", "weight_options", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
