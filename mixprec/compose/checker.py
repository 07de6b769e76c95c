"""Deterministic caption-adherence checker for compositional scenes.

Given an image and a caption "a <size> <colour> <shape> <relation> a <size> <colour> <shape> on a
<colour> background" it decides, attribute by attribute, whether the image shows it. No learned
model: exact on the generator's images, tolerant of the blur, noise and colour drift of generated
ones.

1. Every pixel gets the nearest palette colour (the RGB cube's corners: drift up to half a channel
   swing is harmless); background = the most common label in a border band.
2. Objects = the two largest connected regions of non-background pixels (8-connected, at least
   MIN_OBJECT_PIXELS); an object's colour = its most common label; its mask = its pixels nearer
   that colour than the background colour, holes filled.
3. Shape = the template (the generator's own `coverage` drawn into the mask's bounding box) with
   the highest IoU; size = large when the box's longer side is >= SIZE_THRESHOLD pixels.
4. The caption's objects are matched to the found ones by colour (the three colours of a scene
   differ); an object whose colour is missing takes the remaining found object.
5. Relation = the dominant axis of the centroid offset between the matched objects.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from mixprec.tiny.adherence import check_batch as tiny_check_batch, to_array
from mixprec.tiny.shapes import SHAPES

from .scenes import COLOUR_NAMES, COLOURS, RELATIONS, SIZE_NAMES, SIZE_THRESHOLD, coverage

# Per image: both objects' colour / shape / size must be right for that attribute to count.
ATTRIBUTES = ("background", "colour", "shape", "size", "relation")
BORDER = 2
# The smallest object (20 px triangle) has ~200 pixels; blobs below this are noise.
MIN_OBJECT_PIXELS = 40

_PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32) / 255.0
_OBJ = r"(?P<z{i}>[a-z]+)\s+(?P<c{i}>[a-z]+)\s+(?P<s{i}>[a-z]+)"
_CAPTION_RE = re.compile(
    r"^\s*an?\s+" + _OBJ.format(i=1) + r"\s+(?P<rel>left of|right of|above|below)\s+an?\s+" + _OBJ.format(i=2)
    + r"\s+on\s+an?\s+(?P<bg>[a-z]+)\s+background\s*\.?\s*$"
)


def parse_caption(caption: str) -> dict[str, Any]:
    """{'objects': [{size, colour, shape}, {...}], 'relation', 'background'}; ValueError if the
    caption is not one of this generator's."""
    m = _CAPTION_RE.match(" ".join(caption.lower().split()))
    if not m:
        raise ValueError(f"not a compose-model caption: {caption!r} (expected 'a <size> <colour> <shape> "
                         f"<left of|right of|above|below> a <size> <colour> <shape> on a <colour> background')")
    objects = []
    for i in (1, 2):
        obj = {"size": m.group(f"z{i}"), "colour": m.group(f"c{i}"), "shape": m.group(f"s{i}")}
        for key, known in (("size", SIZE_NAMES), ("colour", COLOUR_NAMES), ("shape", SHAPES)):
            if obj[key] not in known:
                raise ValueError(f"unknown {key} {obj[key]!r} in caption {caption!r}; known: {known}")
        objects.append(obj)
    if m.group("bg") not in COLOUR_NAMES:
        raise ValueError(f"unknown background colour {m.group('bg')!r} in caption {caption!r}")
    return {"objects": objects, "relation": m.group("rel"), "background": m.group("bg")}


def _labels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    dist = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, K)
    labels = dist.argmin(-1)
    border = np.zeros(labels.shape, dtype=bool)
    border[:BORDER] = border[-BORDER:] = True
    border[:, :BORDER] = border[:, -BORDER:] = True
    bg = int(np.bincount(labels[border], minlength=len(COLOUR_NAMES)).argmax())
    return dist, labels, bg


def _describe(region: np.ndarray, dist: np.ndarray, labels: np.ndarray, bg: int) -> dict[str, Any] | None:
    colour = int(np.bincount(labels[region], minlength=len(COLOUR_NAMES)).argmax())
    # Half-way between object and background colour, inside the region's neighbourhood only.
    near = ndimage.binary_dilation(region, iterations=1)
    mask = ndimage.binary_fill_holes(near & (dist[:, :, colour] < dist[:, :, bg]))
    comp, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        mask = comp == int(np.argmax(sizes)) + 1
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    y0, x0, y1, x1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    crop = mask[y0:y1, x0:x1]
    ious = {}
    for shape in SHAPES:
        tmpl = coverage(shape, x1 - x0, y1 - y0) >= 0.5
        union = np.logical_or(tmpl, crop).sum()
        ious[shape] = float(np.logical_and(tmpl, crop).sum() / union) if union else 0.0
    return {"colour": COLOUR_NAMES[colour], "shape": max(SHAPES, key=lambda s: ious[s]),
            "size": "large" if max(y1 - y0, x1 - x0) >= SIZE_THRESHOLD else "small",
            "centre": (float(xs.mean()), float(ys.mean())), "pixels": int(mask.sum()), "iou": ious}


def classify(image: Any) -> dict[str, Any]:
    """What the image shows: {'background', 'objects': up to two dicts (colour, shape, size,
    centre (x, y), pixels, iou)}, largest first."""
    img = to_array(image)
    dist, labels, bg = _labels(img)
    comp, n = ndimage.label(labels != bg, structure=np.ones((3, 3), dtype=bool))
    objects = []
    if n:
        sizes = ndimage.sum(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        for idx in np.argsort(-sizes)[:2]:
            if sizes[idx] < MIN_OBJECT_PIXELS:
                break
            obj = _describe(comp == int(idx) + 1, dist, labels, bg)
            if obj is not None:
                objects.append(obj)
    return {"background": COLOUR_NAMES[bg], "objects": objects}


def relation_between(first: dict[str, Any], second: dict[str, Any]) -> str:
    """Where `first` is relative to `second`, by the dominant axis of their centre offset."""
    dx = second["centre"][0] - first["centre"][0]
    dy = second["centre"][1] - first["centre"][1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _match(wanted: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The found object for each wanted one: same colour first, then whatever is left."""
    out: list[dict[str, Any] | None] = [None, None]
    free = list(found)
    for i, w in enumerate(wanted):
        same = [f for f in free if f["colour"] == w["colour"]]
        if same:
            out[i] = same[0]
            free.remove(same[0])
    for i in range(2):
        if out[i] is None and free:
            out[i] = free.pop(0)
    return out


def check(image: Any, caption: str) -> dict[str, bool]:
    """{'background', 'colour', 'shape', 'size', 'relation', 'all'}: whether each matches the caption
    (colour, shape and size: for both objects)."""
    want = parse_caption(caption)
    got = classify(image)
    matched = _match(want["objects"], got["objects"])
    ok = {"background": got["background"] == want["background"]}
    for key in ("colour", "shape", "size"):
        ok[key] = all(m is not None and m[key] == w[key] for m, w in zip(matched, want["objects"]))
    ok["relation"] = None not in matched and relation_between(*matched) == want["relation"]
    ok["all"] = all(ok[k] for k in ATTRIBUTES)
    return {k: bool(v) for k, v in ok.items()}


def check_batch(images: Sequence[Any] | torch.Tensor, captions: Sequence[str]) -> dict[str, Any]:
    """Adherence rates over a batch: each attribute and 'all' as fractions in [0, 1], 'n', and
    'per_image' (the list of check() results)."""
    return tiny_check_batch(images, captions, check_fn=check, attributes=ATTRIBUTES)
