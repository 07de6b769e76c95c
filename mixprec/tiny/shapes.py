"""Procedural captioned images: "a <colour> <shape> on a <colour> background".

The data set of the built-in tiny model. Everything is a pure function of a seed, so the training
set, the held-out prompts and the checker's templates are reproducible on any machine.

Colours are the eight corners of the RGB cube (slightly inset), so any two differ by at least one
full channel swing: a blurry or noisy generated pixel is still far nearer its own palette colour
than any other, which is what lets the adherence checker classify by nearest palette colour.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Shapes keep this many pixels away from the edge so the border band is pure background.
MARGIN = 4
MIN_SIZE = 20
MAX_SIZE = 36
# Drawing at 4x then box-downsampling gives anti-aliased edges, like real images have.
SUPERSAMPLE = 4

_LO, _HI = 20, 235
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (_HI, _LO, _LO),
    "green": (_LO, _HI, _LO),
    "blue": (_LO, _LO, _HI),
    "yellow": (_HI, _HI, _LO),
    "cyan": (_LO, _HI, _HI),
    "magenta": (_HI, _LO, _HI),
    "white": (_HI, _HI, _HI),
    "black": (_LO, _LO, _LO),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Words of the caption template besides colours and shapes; the tokenizer is built from these.
TEMPLATE_WORDS: tuple[str, ...] = ("a", "on", "background")
VOCABULARY: tuple[str, ...] = TEMPLATE_WORDS + COLOUR_NAMES + SHAPES

# The held-out split depends only on this seed, never on a training seed: every run of every
# stage agrees on which combinations the model never saw.
SPLIT_SEED = 20240604
HELDOUT_FRACTION = 0.16

Combo = tuple[str, str, str]  # (shape colour, shape, background colour)


@dataclass(frozen=True)
class ShapeSpec:
    shape_colour: str
    shape: str
    background: str
    x0: int
    y0: int
    size: int

    @property
    def combo(self) -> Combo:
        return (self.shape_colour, self.shape, self.background)

    @property
    def caption(self) -> str:
        return caption(self.shape_colour, self.shape, self.background)


def caption(shape_colour: str, shape: str, background: str) -> str:
    return f"a {shape_colour} {shape} on a {background} background"


def all_combos() -> list[Combo]:
    return [(c, s, b) for c, s, b in itertools.product(COLOUR_NAMES, SHAPES, COLOUR_NAMES) if c != b]


def _pair_keys(combo: Combo) -> tuple[tuple, tuple, tuple]:
    c, s, b = combo
    return (("cs", c, s), ("cb", c, b), ("sb", s, b))


def split_combos() -> tuple[list[Combo], list[Combo]]:
    """(train, held_out) combinations, fixed by SPLIT_SEED.

    A combination is held out only if every pair it contains (colour+shape, colour+background,
    shape+background) keeps at least two training combinations: the held-out prompts then test
    composition of things the model has seen together in pairs, never an unseen attribute.
    """
    combos = all_combos()
    counts: dict[tuple, int] = {}
    for combo in combos:
        for key in _pair_keys(combo):
            counts[key] = counts.get(key, 0) + 1
    target = round(HELDOUT_FRACTION * len(combos))
    rng = np.random.default_rng(SPLIT_SEED)
    held: set[Combo] = set()
    for i in rng.permutation(len(combos)):
        combo = combos[int(i)]
        if all(counts[k] > 2 for k in _pair_keys(combo)):
            held.add(combo)
            for k in _pair_keys(combo):
                counts[k] -= 1
        if len(held) == target:
            break
    train = [c for c in combos if c not in held]
    heldout = [c for c in combos if c in held]
    return train, heldout


def train_combos() -> list[Combo]:
    return split_combos()[0]


def heldout_combos() -> list[Combo]:
    return split_combos()[1]


def combos_for(split: str) -> list[Combo]:
    if split == "train":
        return train_combos()
    if split in ("heldout", "held_out", "test"):
        return heldout_combos()
    if split == "all":
        return all_combos()
    raise ValueError(f"unknown split {split!r}: use 'train', 'heldout' or 'all'")


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, w: float, h: float, fill) -> None:
    x1, y1 = x0 + w, y0 + h
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif shape == "cross":
        # Arms one third of the extent: the plus sign differs clearly from a square and a circle.
        tw, th = w / 3, h / 3
        draw.rectangle([x0 + tw, y0, x1 - tw, y1], fill=fill)
        draw.rectangle([x0, y0 + th, x1, y1 - th], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_coverage(shape: str, x0: float, y0: float, w: float, h: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape in the box (x0, y0, w, h), as float32 (size, size).

    Both the renderer and the checker's templates come from here, so they agree exactly.
    """
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    # The supersampled box spans whole pixels [x0*s, (x0+w)*s): PIL's ranges are inclusive.
    _draw(ImageDraw.Draw(canvas), shape, x0 * s, y0 * s, w * s - 1, h * s - 1, 255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(spec: ShapeSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image of the spec."""
    cov = shape_coverage(spec.shape, spec.x0, spec.y0, spec.size, spec.size, size)[..., None]
    fg = np.asarray(COLOURS[spec.shape_colour], dtype=np.float32)
    bg = np.asarray(COLOURS[spec.background], dtype=np.float32)
    img = cov * fg + (1.0 - cov) * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_pil(spec: ShapeSpec, size: int = IMAGE_SIZE) -> Image.Image:
    return Image.fromarray(render(spec, size), mode="RGB")


def render_tensor(spec: ShapeSpec, size: int = IMAGE_SIZE) -> torch.Tensor:
    """float32 (3, size, size) image in [0, 1]."""
    return torch.from_numpy(render(spec, size)).permute(2, 0, 1).float() / 255.0


def sample_spec(rng: np.random.Generator, combo: Combo) -> ShapeSpec:
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    hi = IMAGE_SIZE - MARGIN - size
    x0 = int(rng.integers(MARGIN, hi + 1))
    y0 = int(rng.integers(MARGIN, hi + 1))
    c, s, b = combo
    return ShapeSpec(c, s, b, x0, y0, size)


def sample_specs(n: int, seed: int, split: str = "train") -> list[ShapeSpec]:
    """n specs with combinations drawn uniformly from the split, deterministic in seed."""
    combos = combos_for(split)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(combos), size=n)
    return [sample_spec(rng, combos[int(i)]) for i in idx]


def render_batch(specs: Sequence[ShapeSpec], size: int = IMAGE_SIZE) -> torch.Tensor:
    """float32 (n, 3, size, size) in [0, 1]."""
    if not specs:
        return torch.zeros(0, 3, size, size)
    arr = np.stack([render(s, size) for s in specs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def sample_batch(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, list[str], list[ShapeSpec]]:
    """(images float (n,3,64,64) in [0,1], captions, specs)."""
    specs = sample_specs(n, seed, split)
    return render_batch(specs), [s.caption for s in specs], specs


def make_dataset(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """uint8 (n, 3, 64, 64) images and their captions: the compact form training keeps in memory."""
    specs = sample_specs(n, seed, split)
    arr = np.stack([render(s) for s in specs]) if specs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), [s.caption for s in specs]


def eval_prompts(n: int = 64, split: str = "heldout", seed: int = 0) -> list[tuple[str, int]]:
    """n (caption, generation seed) pairs covering the split's combinations in turn.

    The combinations cycle in a fixed shuffled order so any prefix covers as many distinct
    combinations as possible; seeds are distinct so repeated combinations get different noise.
    """
    combos = combos_for(split)
    rng = np.random.default_rng(seed + 7919)
    order = [combos[int(i)] for i in rng.permutation(len(combos))]
    return [(caption(*order[i % len(order)]), seed * 100_000 + i) for i in range(n)]


def iter_captions(split: str = "all") -> Iterable[str]:
    return (caption(*c) for c in combos_for(split))
