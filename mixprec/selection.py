"""Scoring generated images against full precision, and ranking candidate plans.

The published selection used one image and uint8 arithmetic; here every score is computed in
float over several prompts. Rankings (``stage.metric``, :func:`sort_key`):

* ``psnr``: mean per-image PSNR, higher is better (ties: mean MSE). A mean of logs: one image whose
  object moved does not outweigh the rest, as it does in the mean MSE (on the compose model the mean
  MSE of 8 selection prompts preferred uniform W4 where held-out PSNR and SSIM preferred the mixed
  plan by 1.7 dB);
* ``adherence`` (models with a content checker): the checker's caption adherence first, then PSNR,
  then MSE;
* ``auto`` (the default): ``adherence`` for a model with a content checker, ``psnr`` without;
* ``mse`` (lower is better) and ``ssim`` (higher, ties by MSE).

Equal keys are broken by the candidate's path (:func:`rank`), so a ranking is deterministic.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mixprec import artifacts
from mixprec.artifacts import PlanFile
from mixprec.metrics import ssim_torch
from mixprec.workspace import MissingArtifactError, Workspace

METRICS = ("auto", "adherence", "psnr", "ssim", "mse")
# Content checkers: name -> module with check_batch and ATTRIBUTES.
CHECKERS = {"tiny_shapes": "mixprec.tiny.adherence", "compose_scenes": "mixprec.compose.checker"}


def _checker_module(checker: str):
    if checker not in CHECKERS:
        raise ValueError(f"unknown content checker {checker!r}; known: {tuple(CHECKERS)}")
    return importlib.import_module(CHECKERS[checker])


def adherence(images: torch.Tensor, captions: Sequence[str], checker: str | None) -> dict[str, Any] | None:
    """Caption adherence rates (all, and per attribute) when the model has a content checker."""
    if checker is None:
        return None
    module = _checker_module(checker)
    result = module.check_batch(images.float().cpu(), list(captions))
    return {k: v for k, v in result.items() if k != "per_image"} | {
        "attributes": tuple(module.ATTRIBUTES), "per_image": [bool(r["all"]) for r in result["per_image"]]}


def image_scores(reference: torch.Tensor, images: torch.Tensor, captions: Sequence[str] | None = None,
                 checker: str | None = None) -> dict[str, Any]:
    """Per-image and mean MSE, PSNR and SSIM against the reference (float), plus adherence."""
    ref, img = reference.double(), images.double()
    per_mse = (ref - img).pow(2).flatten(1).mean(1)
    per_ssim = ssim_torch(ref, img)
    per_psnr = torch.where(per_mse > 0, 10 * torch.log10(1.0 / per_mse), torch.full_like(per_mse, float("inf")))
    out: dict[str, Any] = {
        "mse": float(per_mse.mean()), "ssim": float(per_ssim.mean()), "psnr_db": float(per_psnr.mean()),
        "per_image": {"mse": per_mse.tolist(), "ssim": per_ssim.tolist(), "psnr_db": per_psnr.tolist()},
    }
    adh = adherence(images, captions, checker) if captions is not None else None
    if adh is not None:
        out["adherence"] = adh["all"]
        out["adherence_detail"] = {k: adh[k] for k in adh["attributes"]}
        out["per_image"]["adherence"] = adh["per_image"]
    return out


def resolve_metric(metric: str, checker: str | None, setting: str = "stage.metric") -> str:
    """The ranking a selection uses: ``auto`` -> ``adherence`` with a content checker, else ``psnr``.
    Unknown names and ``adherence`` without a checker are refused naming ``setting``."""
    metric = str(metric)
    if metric not in METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; {setting} is one of {', '.join(METRICS)}")
    if metric == "auto":
        return "adherence" if checker else "psnr"
    if metric == "adherence" and not checker:
        raise ValueError(f"{setting}=adherence needs a model with a content checker (model.checker); use "
                         f"{setting}=auto, psnr, ssim or mse")
    return metric


def sort_key(scores: Mapping[str, Any], metric: str) -> tuple:
    """Smaller sorts first (best). ``metric``: a resolved name (:func:`resolve_metric`), not ``auto``."""
    if metric == "mse":
        return (scores["mse"],)
    if metric == "ssim":
        return (-scores["ssim"], scores["mse"])
    if metric == "psnr":
        return (-scores["psnr_db"], scores["mse"])
    if metric == "adherence":
        if "adherence" not in scores:
            raise ValueError("selection by adherence needs a model with a content checker (model.checker)")
        return (-scores["adherence"], -scores["psnr_db"], scores["mse"])
    raise ValueError(f"unknown selection metric {metric!r}; known: {METRICS[1:]} (auto is resolved first)")


def bits_digest(bits: Mapping[str, Any]) -> str:
    """Identity of a plan's bit assignment (candidates from different seeds/K are often identical)."""
    return hashlib.sha256(json.dumps(dict(sorted(bits.items())), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Candidate(PlanFile):
    """A candidate plan with its selection scores."""

    scores: dict[str, Any] = field(default_factory=dict)
    duplicate_of: str | None = None

    @property
    def digest(self) -> str:
        # per-group layers change the plan: they join the identity (per-channel plans keep their digest)
        return bits_digest(self.bits) + (bits_digest(self.group_size) if self.group_size else "")


def rank(candidates: Sequence[Candidate], metric: str) -> list[Candidate]:
    """Best first; ties (e.g. identical plans) broken by path, so the ranking is deterministic."""
    return sorted(candidates, key=lambda c: sort_key(c.scores, metric) + (c.path,))


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit]


def image_grid(images: torch.Tensor, columns: int = 8):
    """One PIL image of a batch, ``columns`` per row."""
    from PIL import Image

    from mixprec.generation import to_pil

    tiles = to_pil(images)
    w, h = tiles[0].size
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * w, (i // cols) * h))
    return grid


def load_candidates(ws: Workspace, kind: str, budget: float | None = None) -> list[Candidate]:
    """Candidate plans of one kind; with ``budget``, only those allocated for it (mean bits or MiB).

    Plans of one budget compete: across budgets the largest plan would always win.
    """
    paths = artifacts.plan_paths(ws.root, kind)
    how = (f"`python run.py stage=allocate stage.kind={kind}` (or the sweep "
           f"`python run.py -cd sweeps -cn allocate stage.kind={kind}`)")
    if not paths:
        raise MissingArtifactError(f"no candidate {kind} plans under {ws.root / artifacts.PLANS_DIR}: run {how} first")
    out, budgets = [], set()
    for p in paths:
        plan = artifacts.read_plan_file(ws, str(p.relative_to(ws.root)))
        artifacts.check_plan_fingerprints(ws, plan.header, plan.path)
        value = plan.typed.budget_value
        budgets.add(value)
        if budget is None or value == float(budget):
            out.append(Candidate(plan.path, plan.header, plan.bits, plan.group_size))
    if not out:
        raise MissingArtifactError(
            f"no candidate {kind} plans for target {budget:g} (the workspace has targets "
            f"{sorted(b for b in budgets if b is not None)}): run {how.replace('`(', '` (')} with stage.target={budget:g}, "
            f"or set stage.{kind}_target to one of those")
    return out


@dataclass
class Generation:
    """One generation of a prompt set: the images, their scores against a reference (None without
    one) and the wall time of the generation."""

    images: torch.Tensor
    scores: dict[str, Any] | None
    seconds: float

    def save(self, ws: Workspace, folder: str, pairs: Sequence[tuple[str, int]], slug_limit: int = 60,
             metadata: bool = True) -> list[str]:
        """One PNG per image under ``folder`` (:func:`image_names`); ``metadata``: prompt and seed in each."""
        return save_images(ws, image_names(folder, pairs, slug_limit), self.images, pairs if metadata else None)


def generate_and_score(sampler, layers, prompts: Sequence[str], seeds: Sequence[int],
                       reference: torch.Tensor | None = None, checker: str | None = None,
                       weight_bits: Mapping[str, Any] | None = None, act_bits: Mapping[str, Any] | None = None,
                       adapters: Sequence[Mapping[str, Any]] = (),
                       weight_groups: Mapping[str, int] | None = None) -> Generation:
    """Set a plan on the quantized layers, generate, and score against ``reference`` (None: no scores).

    What select, evaluate, infer and report all do with a plan. ``layers=None`` runs the model as it
    is (kernel modules a plan was converted to, a loaded checkpoint); ``adapters`` (:mod:`mixprec.lora`
    entries) sit beside the layers for this generation only. The layers keep the plan: callers reset
    them (``set_plan(layers)``) when they are done. ``weight_groups``: the weight plan's per-group layers
    (``Plan.group_size``, layer -> 64 / 128).
    """
    from mixprec.lora import loaded
    from mixprec.quantizers import set_plan

    if layers is not None:
        set_plan(layers, weight_bits=weight_bits, act_bits=act_bits, weight_groups=weight_groups)
    cuda = sampler.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with loaded(sampler.pipe, adapters):
        images = sampler.generate(list(prompts), list(seeds)).images
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    scores = image_scores(reference, images, list(prompts), checker) if reference is not None else None
    return Generation(images, scores, seconds)


def image_names(folder: str, pairs: Sequence[tuple[str, int]], slug_limit: int = 60) -> list[str]:
    """``<folder>/<index>_seed<seed>_<prompt slug>.png`` for each (prompt, seed)."""
    return [f"{folder}/{i:03d}_seed{seed}_{slug(prompt, slug_limit)}.png" for i, (prompt, seed) in enumerate(pairs)]


def save_images(ws: Workspace, names: Sequence[str], images: torch.Tensor,
                pairs: Sequence[tuple[str, int]] | None = None) -> list[str]:
    """Write one PNG per image (atomically); with ``pairs``, prompt and seed go into the PNG metadata."""
    from PIL.PngImagePlugin import PngInfo

    from mixprec.generation import to_pil

    for i, (pil, name) in enumerate(zip(to_pil(images), names)):
        info = None
        if pairs is not None:
            info = PngInfo()
            info.add_text("prompt", pairs[i][0])
            info.add_text("seed", str(pairs[i][1]))
        with ws.atomic_path(name) as tmp:
            pil.save(tmp, format="PNG", pnginfo=info)
    return list(names)


def save_grid(ws: Workspace, name: str, images: torch.Tensor) -> str:
    with ws.atomic_path(name) as tmp:
        image_grid(images).save(tmp, format="PNG")
    return name
