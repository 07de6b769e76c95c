"""What a model is: :class:`ModelSpec` (the ``model`` config group) and the device it runs on."""

from __future__ import annotations

import hashlib

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .schedulers import scheduler_overrides


REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SOURCES = ("builtin", "tiny_random", "diffusers")
# Built-in trained models (source: builtin): model name -> (asset folder, the stage that trains it).
BUILTIN_MODELS = {"tiny": ("tiny", "train_tiny"), "compose": ("compose", "train_compose")}


@dataclass
class ModelSpec:
    name: str
    source: str = "diffusers"
    hub_id: str | None = None
    path: str | None = None
    weights: str = "pretrained"  # or "random"
    family: str = "sdxl"  # which shipped configs build the random-weight architecture
    arch: dict[str, Any] = field(default_factory=dict)  # tiny_random architecture
    seed: int = 0  # random-weight init seed
    dtype: str = "float32"
    resolution: int = 512
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    content_patterns: list[str] = field(default_factory=lambda: ["attn2", "ff"])
    exclude_patterns: list[str] = field(default_factory=list)
    # A deterministic content checker for caption adherence ("tiny_shapes" for the built-in model).
    checker: str | None = None
    # Scheduler overrides applied after the pipeline is built or loaded: ``class`` swaps the
    # scheduler class (a diffusers scheduler name), every other key overrides its config, e.g.
    # {class: EulerDiscreteScheduler, timestep_spacing: leading}. Empty: the pipeline's own.
    scheduler: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters fused into the weights at load, before anything is quantized: a list of
    # {path, scale} (mixprec.lora.fuse_adapters). Part of the model's identity (fingerprint).
    lora: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source must be one of {SOURCES}, got {self.source!r}")
        if self.weights not in ("pretrained", "random"):
            raise ValueError(f"model.weights must be 'pretrained' or 'random', got {self.weights!r}")
        if self.source == "diffusers" and self.weights == "pretrained" and not (self.path or self.hub_id):
            raise ValueError(f"model {self.name!r} needs model.path (a local folder) or model.hub_id")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"model.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.scheduler:
            scheduler_overrides(self.scheduler)  # raises on an unknown class or option
        if self.lora:
            from mixprec.lora import check_adapter_entries

            self.lora = check_adapter_entries(self.lora)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def fingerprint_data(self, device_type: str | None = None) -> dict[str, Any]:
        """What identifies the model's weights (not how it is sampled).

        Full-size random weights are drawn on the device the run uses (``device_type``), and the same
        seed gives other weights on CPU than on CUDA: the device is part of their identity.
        """
        data = {k: v for k, v in asdict(self).items()
                if k in ("name", "source", "hub_id", "path", "weights", "family", "arch", "seed")}
        if self.source == "diffusers" and self.weights == "random" and device_type is not None:
            data["random_weights_drawn_on"] = device_type
        if self.source == "builtin":
            data["weights_digest"] = _folder_digest(self.resolved_path())
        if self.lora:  # only when set: fingerprints of runs without adapters stay as they were
            from mixprec.lora import adapters_identity

            data["lora"] = adapters_identity(self.lora)
        return data

    def resolved_path(self) -> Path | None:
        if self.source == "builtin":
            return Path(self.path) if self.path else ASSETS_DIR / BUILTIN_MODELS.get(self.name, ("tiny",))[0]
        return Path(self.path) if self.path else None


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits), computed once per (path, size, mtime) in a process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def _folder_digest(folder: Path | None) -> str | None:
    """Identity of a saved pipeline: names, sizes and contents of its weight files. Contents, not only
    sizes: retrained weights have the sizes of the old ones, and a workspace calibrated for those must be
    refused (the compose model's ~46 MB hash in ~0.1 s, once per process)."""
    if folder is None or not folder.exists():
        return None
    files = sorted(p for p in folder.rglob("*.safetensors"))
    return ";".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{_file_digest(p)}" for p in files)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available; use device=cpu or auto")
    return torch.device(device)
