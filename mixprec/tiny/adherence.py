"""Deterministic caption-adherence checker for the tiny model's images.

Given an image and a caption "a <colour> <shape> on a <colour> background" it decides whether
the background colour, the shape's colour and the shape are right. No learned model: plain image
analysis that is exact on the generator's own images and tolerant of the blur, noise and colour
drift of generated ones.

1. Every pixel gets the nearest palette colour (the palette is the RGB cube's corners, so drift
   up to half a channel swing is harmless).
2. Background = the most common label in a border band (shapes never enter it).
3. Shape colour = the most common label among pixels that are not background.
4. Shape mask = pixels nearer the shape colour than the background colour (a 50% threshold on
   anti-aliased edges), keep the largest connected blob, fill its holes.
5. Shape = the template (circle, square, triangle, cross drawn into the blob's bounding box by the
   generator's own renderer) with the highest IoU against the mask.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .shapes import COLOUR_NAMES, COLOURS, SHAPES, shape_coverage

ATTRIBUTES = ("shape_colour", "background", "shape")
BORDER = 2
# Fewer shape pixels than this means "no shape drawn" (the generator's smallest shape has ~200).
MIN_SHAPE_PIXELS = 24

_PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32) / 255.0
_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<c>[a-z]+)\s+(?P<s>[a-z]+)\s+on\s+an?\s+(?P<b>[a-z]+)\s+background\s*\.?\s*$"
)


def parse_caption(caption: str) -> dict[str, str]:
    """{'shape_colour', 'shape', 'background'} of a caption; ValueError if it is not one of ours."""
    m = _CAPTION_RE.match(caption.lower())
    if not m:
        raise ValueError(f"not a tiny-model caption: {caption!r} (expected 'a <colour> <shape> on a <colour> background')")
    c, s, b = m.group("c"), m.group("s"), m.group("b")
    for word, known in ((c, COLOUR_NAMES), (s, SHAPES), (b, COLOUR_NAMES)):
        if word not in known:
            raise ValueError(f"unknown word {word!r} in caption {caption!r}; known: {known}")
    return {"shape_colour": c, "shape": s, "background": b}


def to_array(image: Any) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] from a PIL image, a uint8/float array (HWC) or a tensor (CHW or HWC)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an RGB image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _templates(h: int, w: int, box: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    y0, x0, y1, x1 = box
    size = max(h, w)
    out = {}
    for shape in SHAPES:
        cov = shape_coverage(shape, x0, y0, x1 - x0, y1 - y0, size)[:h, :w]
        out[shape] = cov >= 0.5
    return out


def classify(image: Any) -> dict[str, Any]:
    """What the image shows: {'shape_colour', 'background', 'shape'} (None where nothing is found)
    plus diagnostics ('shape_pixels', 'iou': per-shape IoU)."""
    img = to_array(image)
    h, w, _ = img.shape
    dist = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, K)
    labels = dist.argmin(-1)

    border = np.zeros((h, w), dtype=bool)
    border[:BORDER] = border[-BORDER:] = True
    border[:, :BORDER] = border[:, -BORDER:] = True
    bg = int(np.bincount(labels[border], minlength=len(COLOUR_NAMES)).argmax())

    result: dict[str, Any] = {"background": COLOUR_NAMES[bg], "shape_colour": None, "shape": None,
                              "shape_pixels": 0, "iou": {}}
    fg_labels = labels[labels != bg]
    if fg_labels.size < MIN_SHAPE_PIXELS:
        return result
    sc = int(np.bincount(fg_labels, minlength=len(COLOUR_NAMES)).argmax())
    result["shape_colour"] = COLOUR_NAMES[sc]

    mask = dist[:, :, sc] < dist[:, :, bg]
    comp, n = ndimage.label(mask)
    if n == 0:
        return result
    sizes = ndimage.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1))
    mask = ndimage.binary_fill_holes(comp == (int(np.argmax(sizes)) + 1))
    result["shape_pixels"] = int(mask.sum())
    if result["shape_pixels"] < MIN_SHAPE_PIXELS:
        return result
    ys, xs = np.nonzero(mask)
    box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    ious = {}
    for shape, tmpl in _templates(h, w, box).items():
        inter = np.logical_and(tmpl, mask).sum()
        union = np.logical_or(tmpl, mask).sum()
        ious[shape] = float(inter / union) if union else 0.0
    result["iou"] = ious
    result["shape"] = max(SHAPES, key=lambda s: ious[s])
    return result


def check(image: Any, caption: str) -> dict[str, bool]:
    """{'shape_colour', 'background', 'shape', 'all'}: whether each attribute matches the caption."""
    want = parse_caption(caption)
    got = classify(image)
    out = {k: bool(got[k] == want[k]) for k in ATTRIBUTES}
    out["all"] = all(out[k] for k in ATTRIBUTES)
    return out


def check_batch(images: Sequence[Any] | torch.Tensor, captions: Sequence[str],
                check_fn: Callable[[Any, str], dict[str, bool]] = check,
                attributes: Sequence[str] = ATTRIBUTES) -> dict[str, Any]:
    """Adherence rates over a batch: {'all', 'shape_colour', 'background', 'shape'} as fractions in
    [0, 1], 'n', and 'per_image' (the list of check() results). Another checker: its `check_fn`
    and `attributes`."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    per_image = [check_fn(im, cap) for im, cap in zip(images, captions)]
    n = len(per_image)
    rates = {k: (sum(r[k] for r in per_image) / n if n else float("nan")) for k in tuple(attributes) + ("all",)}
    return {**rates, "n": n, "per_image": per_image}
