"""Per-prompt sensitivities -> one table, optionally on a bootstrap resample of the prompts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mixprec.quant.options import table_key

from .program import SensitivityError


def resample_indices(n_prompts: int, seed: int) -> np.ndarray:
    """Prompt indices for ``seed``: all of them once for seed 0, else n draws with replacement."""
    if n_prompts <= 0:
        raise SensitivityError("no per-prompt sensitivities to average (0 prompts)")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if seed == 0:
        return np.arange(n_prompts)
    return np.random.default_rng(seed).integers(0, n_prompts, size=n_prompts)


CONTENT_METRICS = ("ssim", "ssim_db")


def ssim_db(per_prompt: Mapping[str, Mapping[int | str, Sequence[float]]], cap: float = 100.0
            ) -> dict[str, dict[int | str, list[float]]]:
    """Per-prompt SSIM -> ``-10 log10(1 - SSIM)`` (dB, clamped to ``[-cap, cap]``; 1.0 maps to ``cap``).

    Monotone, so a layer's widths keep their order, but it does not saturate: on the compose model the
    content layers' single-layer SSIMs sit at 0.9999-1.0000, where the raw values (and a min-max
    normalisation of them) call 2-bit weights free; in dB 0.99999 and 0.9999999 are 50 and 70, as far
    apart as the quality layers' SQNR values of the same error ratio (docs/method.md, session 27)."""
    def one(v: float) -> float:
        gap = 1.0 - float(v)
        return cap if gap <= 10 ** (-cap / 10) else max(-cap, min(cap, -10.0 * math.log10(gap)))
    return {layer: {b: [one(v) for v in vals] for b, vals in row.items()} for layer, row in per_prompt.items()}


QUALITY_METRICS = ("sqnr_db", "noise_power")


def noise_power(per_prompt: Mapping[str, Mapping[int | str, Sequence[float]]], cap: float = 100.0
                ) -> dict[str, dict[int | str, list[float]]]:
    """Per-prompt SQNR (dB) -> ``-10^(-SQNR/10)``: minus the output's relative noise power (the SQNR
    clamped to ``[-cap, cap]`` first; higher is still better).

    Independent layers' errors add in power, not in dB: the sum of dB values the programs maximise
    rates a layer going from 10 to 40 dB like one going from 60 to 90 dB, where the first removes a
    thousand times more noise. In power the few layers that dominate the output's error dominate the
    objective too (the compose model's quality layers at 4 bits span 10-100 dB; docs/method.md,
    session 27)."""
    def one(v: float) -> float:
        return -(10.0 ** (-max(-cap, min(cap, float(v))) / 10.0))
    return {layer: {b: [one(v) for v in vals] for b, vals in row.items()} for layer, row in per_prompt.items()}


def bootstrap_metric(per_prompt: Mapping[str, Mapping[int, Sequence[float]]], seed: int,
                     cap: float | None = None) -> dict[str, dict[int, float]]:
    """Mean over prompts of every (layer, bits) sensitivity.

    seed 0 is the plain mean over all prompts. seed > 0 draws one bootstrap resample of prompt
    indices (``numpy.random.default_rng(seed)``, n draws with replacement) and averages every
    layer and bit-width over *those same* prompts, so a seed is one plausible calibration set,
    not independent noise per entry; different seeds give different tables and therefore
    different, equally plausible plans. All lists must have the same length (prompt i of one
    layer is prompt i of every other).

    ``cap`` clamps each per-prompt value to ``[-cap, cap]`` before averaging, so that one
    lossless prompt (SQNR = +inf) does not make the mean infinite.
    """
    lengths = {len(v) for row in per_prompt.values() for v in row.values()}
    if len(lengths) > 1:
        raise SensitivityError(f"per-prompt sensitivities have different prompt counts {sorted(lengths)}; "
                               "every layer and bit-width must be measured on the same prompts")
    if not lengths:
        return {l: {} for l in per_prompt}
    idx = resample_indices(lengths.pop(), seed)
    out: dict[str, dict[int, float]] = {}
    for layer, row in per_prompt.items():
        out[layer] = {}
        for b, vals in row.items():
            a = np.asarray(vals, dtype=np.float64)[idx]
            if np.isnan(a).any():
                raise SensitivityError(f"sensitivity of layer {layer!r} at {b} bits has NaN for some prompt")
            if cap is not None:
                a = np.clip(a, -cap, cap)
            if np.isposinf(a).any() and np.isneginf(a).any():
                raise SensitivityError(f"sensitivity of layer {layer!r} at {b} bits is +inf for one prompt and -inf "
                                       "for another; pass a cap")
            out[layer][table_key(b)] = float(a.mean())  # "4g64" options stay strings
    return out
