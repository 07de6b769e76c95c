"""Weight quantization choices beyond one scale per channel and round-to-nearest.

- :mod:`.options`: a layer's weight option = (bits, group size), its name in tables and plans;
- :mod:`.groups`: scales per group of input columns, and codes/dequantization for either granularity;
- :mod:`.gptq`: GPTQ rounding (error feedback through the inverse Hessian of the layer's inputs on the
  calibration prompts) for Linear and Conv2d (via unfold) layers, per channel or per group.

The switchable fake-quant layer that uses them is :class:`mixprec.quantizers.QuantLayer`.
"""

from .gptq import HessianAccumulator, gptq_codes
from .groups import column_scales, dequantize_codes, group_weight_scales, nearest_codes, num_groups
from .options import WeightOption, parse_weight_option, weight_options

__all__ = ["HessianAccumulator", "WeightOption", "column_scales", "dequantize_codes", "gptq_codes",
           "group_weight_scales", "nearest_codes", "num_groups", "parse_weight_option", "weight_options"]
