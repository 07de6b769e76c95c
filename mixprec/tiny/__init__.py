"""The built-in tiny text-to-image model: its data generator (shapes), adherence checker,
tokenizer, SDXL-structured builder (build), training (train) and measurements (eval).

Submodules are imported on demand: the generator and checker need no diffusers.
"""
