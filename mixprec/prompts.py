"""Prompt sets: (prompt, seed) pairs for calibration, sensitivity, selection and evaluation.

A set is given in the ``prompts`` config group in one of three forms:
- ``{prompts: [...], seed: 1000}``: an explicit list; image i gets seed ``seed + i``;
- ``{file: path.txt, seed: 1000, n: null}``: one prompt per line;
- ``{split: train|heldout|all, n: 8, seed: 0, generator: tiny}``: captions of a built-in model's
  generator (``tiny``: shapes; ``compose``: two-object scenes).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Caption generators of the built-in models: name -> module with eval_prompts(n, split, seed).
PROMPT_GENERATORS = {"tiny": "mixprec.tiny.shapes", "compose": "mixprec.compose.scenes"}


def resolve_prompt_set(spec: Mapping[str, Any], name: str = "prompts") -> list[tuple[str, int]]:
    spec = dict(spec)
    kinds = [k for k in ("prompts", "file", "split") if spec.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError(f"prompt set {name!r} must give exactly one of 'prompts', 'file' or 'split', got {kinds or 'none'}")
    seed = int(spec.get("seed", 0))
    n = spec.get("n")
    if kinds[0] == "prompts":
        prompts = [str(p) for p in spec["prompts"]]
    elif kinds[0] == "file":
        path = Path(spec["file"])
        if not path.is_file():
            raise FileNotFoundError(f"prompt set {name!r}: prompts file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        generator = str(spec.get("generator", "tiny"))
        if generator not in PROMPT_GENERATORS:
            raise ValueError(f"prompt set {name!r}: unknown generator {generator!r}; known: {sorted(PROMPT_GENERATORS)}")
        eval_prompts = importlib.import_module(PROMPT_GENERATORS[generator]).eval_prompts
        pairs = eval_prompts(int(n or 8), split=str(spec["split"]), seed=seed)
        if not pairs:
            raise ValueError(f"prompt set {name!r}: split {spec['split']!r} gave no prompts")
        return pairs
    if n is not None:
        prompts = prompts[: int(n)]
    if not prompts:
        raise ValueError(f"prompt set {name!r} is empty")
    return [(p, seed + i) for i, p in enumerate(prompts)]
