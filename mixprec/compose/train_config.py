"""The compose model's training knobs: :class:`ComposeTrainConfig` and the names its string fields
take (library code: no Hydra, no torch here).

Torch-free on purpose, like :mod:`mixprec.tiny.train_config`: :mod:`mixprec.settings` derives the
``train_compose`` stage's keys, types, defaults and allowed values from this module before torch
is loaded. The training loop is :mod:`mixprec.compose.train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mixprec.tiny.train_config import TrainConfig

from .spec import LAYOUTS, MAX_LAYOUT_JITTER, NUM_INFERENCE_STEPS, Layout

# Which timesteps the denoiser trains at: the sampler's own, or all 1000 (ordinary diffusion).
Timesteps = Literal["inference", "uniform"]
# How a denoiser training step is launched on CUDA (see ComposeTrainConfig.accelerate).
Accelerate = Literal["cuda_graph", "compile", "none"]
TIMESTEP_MODES: tuple[str, ...] = get_args(Timesteps)
ACCELERATE_MODES: tuple[str, ...] = get_args(Accelerate)


@dataclass
class ComposeTrainConfig(TrainConfig):
    arch: dict = field(default_factory=lambda: ComposeTrainConfig.merged_arch(None))
    dataset_size: int = 65536
    # Training scenes' layout: "centred" (fixed slots, moved by up to layout_jitter px) or "random"
    # (anywhere that realises the relation). Prompts and the checker do not change.
    layout: Layout = "centred"
    layout_jitter: int = 4
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    unet_steps: int = 2000
    unet_batch_size: int = 256
    # 1e-3 failed in three of five runs (twice NaN, once spikes it never recovered from); 5e-4 did not.
    unet_lr: float = 5e-4
    text_lr: float = 5e-4
    warmup_steps: int = 100
    # No min-SNR weighting: at the first of the inference timesteps the SNR is 0 and it would
    # weight away the step that decides layout and colours.
    min_snr_gamma: float = 0.0
    # A short run: the EMA must follow within a couple of hundred steps.
    ema_decay: float = 0.995
    num_inference_steps: int = NUM_INFERENCE_STEPS
    # "inference": train only at the sampler's timesteps; "uniform": all 1000 (ordinary diffusion).
    timesteps: Timesteps = "inference"
    # bf16 autocast for the forward passes on CUDA (ignored on CPU).
    bf16: bool = True
    # Deterministic CUDA kernels (slower); off by default: runs repeat to within run-to-run noise.
    deterministic: bool = False
    # How a denoiser step runs on CUDA (same arithmetic, only the launch path differs, so it is not
    # part of the fingerprint): "cuda_graph" captures forward + backward + clipping + AdamW once and
    # replays it (an eager step of this small model is bound by ~10^4 kernel launches from Python,
    # not by the GPU); "compile" runs the UNet through torch.compile; "none" is plain eager.
    accelerate: Accelerate = "cuda_graph"
    # A saved compose pipeline (folder) to start from instead of random weights: continues training
    # across GPU sessions when the optimizer state cannot travel (its VAE and latent scale are kept;
    # set vae_steps to 0 to train only the denoiser).
    init_from: str | None = None
    sample_every: int = 500
    eval_prompts: int = 64
    checkpoint_every: int = 500

    FINGERPRINT_SKIP = TrainConfig.FINGERPRINT_SKIP | {"accelerate"}

    @staticmethod
    def base_arch() -> Mapping[str, Any]:
        from mixprec.compose.build import COMPOSE_ARCH  # loads torch and diffusers: imported on use

        return COMPOSE_ARCH

    def __post_init__(self) -> None:
        for name, allowed in (("timesteps", TIMESTEP_MODES), ("layout", LAYOUTS), ("accelerate", ACCELERATE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # Refused here, before a run renders its data, not when the first scene is drawn.
        if not 0 <= self.layout_jitter <= MAX_LAYOUT_JITTER:
            raise ValueError(f"layout_jitter must be in 0..{MAX_LAYOUT_JITTER} pixels, got {self.layout_jitter}")
