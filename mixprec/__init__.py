"""mixprec: mixed-precision quantization plans for diffusers text-to-image models.

``mixprec.load_quantized_pipeline(base, checkpoint)`` gives a ready diffusers pipeline from a base
model and a quantized checkpoint (:mod:`mixprec.pretrained`); LoRA adapters on quantized pipelines
are in :mod:`mixprec.lora`, the torchao export in :mod:`mixprec.export`.
"""


def __getattr__(name: str):
    # lazy: importing mixprec stays free of diffusers/torch until this is used
    if name == "load_quantized_pipeline":
        from mixprec.pretrained import load_quantized_pipeline

        return load_quantized_pipeline
    raise AttributeError(f"module 'mixprec' has no attribute {name!r}")
