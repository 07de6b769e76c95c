"""Procedural compositional scenes: two objects, a spatial relation and a background.

"a small red circle left of a large blue square on a green background", 128x128 RGB.

Each object has a colour (the tiny model's eight RGB-cube corners), a shape (circle, square,
triangle, cross) and a size (small: 20-26 px, large: 38-46 px); the relation says where the first
object is relative to the second: left of / right of / above / below. The two objects and the
background have three different colours, so the checker can tell them apart by colour alone.

Held-out split (fixed by SPLIT_SEED): a few object descriptions (colour, shape, size) never
occur in training; every pair inside one (colour+shape, colour+size, shape+size) still does. A
held-out scene has exactly one held-out object, so it tests binding words the model has seen
together in pairs into an object it has never drawn.

Everything is a pure function of a seed (numpy Generator), and the renderer draws through
`coverage`, which the checker's templates also use.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mixprec.tiny.shapes import COLOUR_NAMES, COLOURS, SHAPES

from .spec import LAYOUTS, MAX_LAYOUT_JITTER

IMAGE_SIZE = 128
# Objects keep this many pixels away from the edge so the border band is pure background.
MARGIN = 4
SIZES: dict[str, tuple[int, int]] = {"small": (20, 26), "large": (38, 46)}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
# A detected extent at or above this many pixels is "large" (between the two ranges).
SIZE_THRESHOLD = 32
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Along the relation's axis the objects are this far apart (pixels between their boxes) and their
# centre distance beats the one across it by DOMINANCE pixels: the relation is never ambiguous.
GAP = 4
DOMINANCE = 8
SUPERSAMPLE = 4
TEMPLATE_WORDS: tuple[str, ...] = ("a", "of", "on", "background", "left", "right", "above", "below")
VOCABULARY: tuple[str, ...] = TEMPLATE_WORDS + SIZE_NAMES + COLOUR_NAMES + SHAPES

# Layouts of the training data (LAYOUTS). "random": anywhere on the canvas that realises the relation (the
# image is far from a function of the caption). "centred": the pair centred on the canvas, each
# object at a fixed slot of its relation's axis, moved by at most `jitter` pixels per coordinate and
# sized within its class: the caption nearly decides the image, so a few-step model trained with
# an MSE loss draws a scene instead of the blurred mean of all layouts (see docs/compose_model.md).
# Centre of the first / second object along the relation's axis for "left of" (mirrored for the others).
CENTRED_SLOTS = (36, 92)

SPLIT_SEED = 20261201
HELDOUT_OBJECTS = 8

ObjectKind = tuple[str, str, str]  # (size, colour, shape)


@dataclass(frozen=True)
class SceneObject:
    size_name: str
    colour: str
    shape: str
    x0: int
    y0: int
    extent: int

    @property
    def kind(self) -> ObjectKind:
        return (self.size_name, self.colour, self.shape)

    @property
    def words(self) -> str:
        return f"{self.size_name} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    first: SceneObject
    relation: str
    second: SceneObject
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.first.words} {self.relation} a {self.second.words} on a {self.background} background"


def caption(first: ObjectKind, relation: str, second: ObjectKind, background: str) -> str:
    return f"a {' '.join(first)} {relation} a {' '.join(second)} on a {background} background"


def longest_caption() -> str:
    words = lambda names: max(names, key=len)  # noqa: E731
    obj = (words(SIZE_NAMES), words(COLOUR_NAMES), words(SHAPES))
    return caption(obj, words(RELATIONS), obj, words(COLOUR_NAMES))


# ------------------------------------------------------------------------------------ split
def all_objects() -> list[ObjectKind]:
    return list(itertools.product(SIZE_NAMES, COLOUR_NAMES, SHAPES))


def _pairs(obj: ObjectKind) -> tuple[tuple, tuple, tuple]:
    z, c, s = obj
    return (("zc", z, c), ("zs", z, s), ("cs", c, s))


@functools.lru_cache(maxsize=None)
def split_objects() -> tuple[tuple[ObjectKind, ...], tuple[ObjectKind, ...]]:
    """(train, held_out) object descriptions. An object is held out only if each pair inside it
    keeps at least one training object (colour+shape has only two: one size is always trained)."""
    objects = all_objects()
    counts: dict[tuple, int] = {}
    for obj in objects:
        for key in _pairs(obj):
            counts[key] = counts.get(key, 0) + 1
    held: set[ObjectKind] = set()
    for i in np.random.default_rng(SPLIT_SEED).permutation(len(objects)):
        obj = objects[int(i)]
        # Held-out objects differ in colour: every colour keeps most of its objects.
        if all(counts[k] > 1 for k in _pairs(obj)) and all(o[1] != obj[1] for o in held):
            held.add(obj)
            for k in _pairs(obj):
                counts[k] -= 1
        if len(held) == HELDOUT_OBJECTS:
            break
    return tuple(o for o in objects if o not in held), tuple(o for o in objects if o in held)


def _check_split(split: str) -> str:
    if split in ("heldout", "held_out", "test"):
        return "heldout"
    if split in ("train", "all"):
        return split
    raise ValueError(f"unknown split {split!r}: use 'train', 'heldout' or 'all'")


# ------------------------------------------------------------------------------------ drawing
@functools.lru_cache(maxsize=512)
def coverage(shape: str, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel of a width x height box covered by the shape, float32 (height, width).

    Supersampled point tests: the renderer and the checker's templates both come from here.
    """
    s = SUPERSAMPLE
    u = (np.arange(width * s) + 0.5) / (width * s)
    v = (np.arange(height * s) + 0.5) / (height * s)
    px, py = np.meshgrid(u, v)
    if shape == "circle":
        inside = (px - 0.5) ** 2 + (py - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = np.ones_like(px, dtype=bool)
    elif shape == "triangle":  # pointing up: apex at the top centre, base along the bottom
        inside = np.abs(px - 0.5) <= 0.5 * py
    elif shape == "cross":  # a plus sign, arms one third wide
        third = (px >= 1 / 3) & (px < 2 / 3), (py >= 1 / 3) & (py < 2 / 3)
        inside = third[0] | third[1]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    cov = inside.reshape(height, s, width, s).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov.astype(np.float32)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image of the scene."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = COLOURS[scene.background]
    bg = np.asarray(COLOURS[scene.background], np.float32)
    # The boxes never overlap (the layout keeps a gap), so each blends over the background only.
    for obj in (scene.first, scene.second):
        cov = coverage(obj.shape, obj.extent, obj.extent)[..., None]
        box = cov * np.asarray(COLOURS[obj.colour], np.float32) + (1.0 - cov) * bg
        img[obj.y0:obj.y0 + obj.extent, obj.x0:obj.x0 + obj.extent] = np.rint(box).astype(np.uint8)
    return img


def render_batch(scenes: Sequence[Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (n, 3, size, size)."""
    if not scenes:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack([render(s, size) for s in scenes])).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------ sampling
def _layout(rng: np.random.Generator, relation: str, ext_a: int, ext_b: int) -> tuple[int, int, int, int]:
    """(xa, ya, xb, yb) top-left corners realising `relation` (a relative to b), by rejection."""
    lo, hi_a, hi_b = MARGIN, IMAGE_SIZE - MARGIN - ext_a, IMAGE_SIZE - MARGIN - ext_b
    while True:
        # Drawn for "left of" along x (main axis) and y (cross axis); other relations mirror/transpose.
        ma, mb = int(rng.integers(lo, hi_a + 1)), int(rng.integers(lo, hi_b + 1))
        ca, cb = int(rng.integers(lo, hi_a + 1)), int(rng.integers(lo, hi_b + 1))
        main = (mb + ext_b / 2) - (ma + ext_a / 2)
        cross = (cb + ext_b / 2) - (ca + ext_a / 2)
        if ma + ext_a + GAP <= mb and abs(main) >= abs(cross) + DOMINANCE:
            break
    if relation in ("right of", "below"):  # mirror: a's box goes where b's mirror image would be
        ma, mb = IMAGE_SIZE - ma - ext_a, IMAGE_SIZE - mb - ext_b
    if relation in ("left of", "right of"):
        return ma, ca, mb, cb
    return ca, ma, cb, mb


def _centred_layout(rng: np.random.Generator, relation: str, ext_a: int, ext_b: int, jitter: int
                    ) -> tuple[int, int, int, int]:
    """(xa, ya, xb, yb) for the "centred" layout: slots CENTRED_SLOTS on the relation's axis, the
    canvas centre across it, each coordinate moved by an integer in [-jitter, jitter]."""
    if not 0 <= jitter <= MAX_LAYOUT_JITTER:
        raise ValueError(f"layout jitter must be in 0..{MAX_LAYOUT_JITTER} pixels, got {jitter}")
    first, second = CENTRED_SLOTS
    if relation in ("right of", "below"):
        first, second = second, first
    mid = IMAGE_SIZE // 2
    d = [int(v) for v in rng.integers(-jitter, jitter + 1, size=4)]
    ma, mb = first + d[0] - ext_a // 2, second + d[1] - ext_b // 2
    ca, cb = mid + d[2] - ext_a // 2, mid + d[3] - ext_b // 2
    if relation in ("left of", "right of"):
        return ma, ca, mb, cb
    return ca, ma, cb, mb


def _pick_objects(rng: np.random.Generator, split: str) -> tuple[ObjectKind, ObjectKind]:
    train, held = split_objects()
    pool_a = held if split == "heldout" else (train + held if split == "all" else train)
    pool_b = train + held if split == "all" else train
    while True:
        a, b = pool_a[int(rng.integers(len(pool_a)))], pool_b[int(rng.integers(len(pool_b)))]
        if a[1] != b[1]:
            break
    if split == "heldout" and rng.integers(2):  # the held-out object is first or second
        a, b = b, a
    return a, b


def sample_scene(rng: np.random.Generator, split: str = "train", layout: str = "random", jitter: int = 4) -> Scene:
    split = _check_split(split)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    a, b = _pick_objects(rng, split)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    backgrounds = [c for c in COLOUR_NAMES if c not in (a[1], b[1])]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    ext_a, ext_b = (int(rng.integers(SIZES[o[0]][0], SIZES[o[0]][1] + 1)) for o in (a, b))
    if layout == "random":
        xa, ya, xb, yb = _layout(rng, relation, ext_a, ext_b)
    else:
        xa, ya, xb, yb = _centred_layout(rng, relation, ext_a, ext_b, jitter)
    return Scene(SceneObject(*a, xa, ya, ext_a), relation, SceneObject(*b, xb, yb, ext_b), background)


def sample_scenes(n: int, seed: int, split: str = "train", layout: str = "random", jitter: int = 4) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, layout, jitter) for _ in range(n)]


def make_dataset(n: int, seed: int, split: str = "train", layout: str = "random", jitter: int = 4
                 ) -> tuple[torch.Tensor, list[str]]:
    """uint8 (n, 3, 128, 128) images and their captions: the compact form training keeps in memory."""
    scenes = sample_scenes(n, seed, split, layout, jitter)
    return render_batch(scenes), [s.caption for s in scenes]


def eval_prompts(n: int = 64, split: str = "heldout", seed: int = 0) -> list[tuple[str, int]]:
    """n (caption, generation seed) pairs: captions of scenes drawn from the split with `seed`
    (a stream independent of the training data's), seeds distinct per prompt."""
    scenes = sample_scenes(n, seed + 7919, split)
    return [(s.caption, seed * 100_000 + i) for i, s in enumerate(scenes)]
