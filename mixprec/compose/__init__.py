"""The built-in compose model: two-object scenes (scenes), their checker, SDXL's three-level UNet
at small width (build), few-step training (train) and measurements with mixprec's quantizers
(eval). See docs/compose_model.md.

Submodules are imported on demand: the generator and checker need no diffusers.
"""
