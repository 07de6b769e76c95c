"""Building or loading the pipeline a :class:`~mixprec.models.ModelSpec` describes, and its scheduler."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mixprec.workspace import safetensors_problem

from . import toy
from .denoiser import denoiser_of
from .random_builders import build_random_pipeline
from .schedulers import configured_scheduler
from .spec import BUILTIN_MODELS, ModelSpec


def load_pipeline(spec: ModelSpec, device: str | torch.device = "cpu"):
    """Build or load the pipeline described by ``spec`` and move it to ``device``."""
    from diffusers import DiffusionPipeline

    if spec.source == "tiny_random":
        pipe = toy.build_toy_pipeline(spec.family, spec.arch, seed=spec.seed)
    elif spec.source == "builtin":
        folder = spec.resolved_path()
        _check_pipeline_folder(folder, spec.name)
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=spec.torch_dtype, local_files_only=True)
        _check_tokenizers(pipe, folder)
    elif spec.weights == "random":
        # Initialising billions of parameters is single-threaded on CPU (minutes for PixArt's T5-XXL):
        # build where it will run.
        pipe = build_random_pipeline(spec.family, seed=spec.seed, device=device)
    else:
        pipe = _load_diffusers(spec)
    try:
        denoiser = denoiser_of(pipe)
    except TypeError as exc:
        raise TypeError(f"model {spec.name!r}: {exc}") from None
    if spec.scheduler:
        pipe.scheduler = configured_scheduler(pipe.scheduler, spec.scheduler)
    if spec.lora:
        from mixprec.lora import fuse_adapters

        fuse_adapters(pipe, spec.lora)
    if denoiser.dtype != spec.torch_dtype:
        pipe = pipe.to(dtype=spec.torch_dtype)
    pipe = pipe.to(torch.device(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_diffusers(spec: ModelSpec):
    from diffusers import DiffusionPipeline

    if spec.path:
        folder = Path(spec.path)
        _check_pipeline_folder(folder, spec.name)
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=spec.torch_dtype, local_files_only=True)
        _check_tokenizers(pipe, folder)
        return pipe
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return DiffusionPipeline.from_pretrained(spec.hub_id, torch_dtype=spec.torch_dtype, local_files_only=offline)
    except Exception as exc:  # the hub client's errors are many; the advice is the same
        raise RuntimeError(
            f"could not load {spec.hub_id!r} from the hub{' (HF_HUB_OFFLINE is set, so only the local cache was tried)' if offline else ''}: "
            f"{exc}. Download it elsewhere and pass model.path=<folder>, or use model.weights=random for "
            f"speed/memory work."
        ) from exc


def _check_pipeline_folder(folder: Path | None, name: str) -> None:
    if folder is None or not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"model {name!r}: {folder} is not a diffusers pipeline folder (no model_index.json). "
            + (f"The built-in {name} model is trained by `python run.py stage={BUILTIN_MODELS[name][1]}`."
               if name in BUILTIN_MODELS else "Pass model.path=<folder saved with save_pretrained>.")
        )


def check_model_files(spec: ModelSpec) -> None:
    """A local model folder that cannot load: say which file and why before any stage starts work."""
    local = spec.source == "builtin" or (spec.source != "tiny_random" and spec.path and spec.weights != "random")
    if not local:
        return
    folder = spec.resolved_path()
    _check_pipeline_folder(folder, spec.name)
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model {spec.name!r}: {index} is not valid JSON ({exc}); the folder is damaged: save the "
                         f"pipeline again with save_pretrained, or point model.path at a complete copy") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ValueError(f"model {spec.name!r}: {index} is not a diffusers model index (no _class_name); point "
                         f"model.path at a folder written by save_pretrained")
    stage = BUILTIN_MODELS.get(spec.name, ("tiny", "train_tiny"))[1]
    fix = (f"`python run.py stage={stage}` writes the built-in model again" if spec.source == "builtin" else
           "save the pipeline again with save_pretrained, or point model.path at a complete copy")
    for weights in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ValueError(f"model {spec.name!r}: the weights {weights} are unreadable: {problem}. {fix}.")


def _check_tokenizers(pipe, folder: Path) -> None:
    """A tokenizer folder that is missing or empty can load as a tokenizer that maps everything to UNK."""
    for attr in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, attr, None)
        if tok is None:
            continue
        ids = tok("a red circle", add_special_tokens=False).input_ids
        if len(tok) < 10 or not ids or all(i == tok.unk_token_id for i in ids):
            raise ValueError(f"{folder}/{attr} did not load a working tokenizer (vocabulary of {len(tok)}, "
                             f"'a red circle' -> {ids}); the folder is incomplete")
