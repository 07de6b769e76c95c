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
# The initial distribution of the UNet's Linear and Conv2d weights (see ComposeTrainConfig.unet_init).
UnetInit = Literal["default", "student_t"]
TIMESTEP_MODES: tuple[str, ...] = get_args(Timesteps)
ACCELERATE_MODES: tuple[str, ...] = get_args(Accelerate)
UNET_INITS: tuple[str, ...] = get_args(UnetInit)


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
    # Initial UNet Linear/Conv2d weights: "default" is PyTorch's kaiming-uniform; "student_t" redraws
    # each layer's weights from a Student-t of `unet_init_dof` degrees of freedom with the same
    # per-layer standard deviation. Why: a few minutes of training barely move the weights' shape
    # from their initial distribution (the shipped weights, default init: kurtosis 1.83, uniform's is
    # 1.8, per-row max/std 1.89), so every row quantizes to 4 bits almost ideally (~22 dB), while
    # long-trained models like SDXL carry heavy-tailed weights whose per-channel 4-bit scales are set
    # by a few large values. Student-t tails give this model that property from the start.
    # Measured (session 26, one H200, 48 held-out prompts x 3 seed sets): with "default" uniform W4A8
    # kept full precision's adherence (0.986 vs 0.986); with student_t (dof 4) it lost 11 points.
    # Session 27, dof 3 (96 prompts): 19.4 points, W8A8 within 1 point.
    unet_init: UnetInit = "student_t"
    unet_init_dof: float = 3.0
    # A saved compose pipeline (folder) to start from instead of random weights: continues training
    # across GPU sessions when the optimizer state cannot travel (its VAE and latent scale are kept;
    # set vae_steps to 0 to train only the denoiser).
    init_from: str | None = None
    sample_every: int = 500
    eval_prompts: int = 64
    checkpoint_every: int = 500

    FINGERPRINT_SKIP = TrainConfig.FINGERPRINT_SKIP | {"accelerate"}

    def fingerprint_skip(self) -> frozenset:
        # unet_init came after the session-25 weights' config: with the default init the two fields are
        # left out (the dof means nothing there), so that config keeps its fingerprint (and its
        # checkpoints keep resuming).
        if self.unet_init == "default":
            return self.FINGERPRINT_SKIP | {"unet_init", "unet_init_dof"}
        return self.FINGERPRINT_SKIP

    @staticmethod
    def base_arch() -> Mapping[str, Any]:
        from mixprec.compose.build import COMPOSE_ARCH  # loads torch and diffusers: imported on use

        return COMPOSE_ARCH

    def __post_init__(self) -> None:
        for name, allowed in (("timesteps", TIMESTEP_MODES), ("layout", LAYOUTS), ("accelerate", ACCELERATE_MODES),
                              ("unet_init", UNET_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # Refused here, before a run renders its data, not when the first scene is drawn.
        if not 0 <= self.layout_jitter <= MAX_LAYOUT_JITTER:
            raise ValueError(f"layout_jitter must be in 0..{MAX_LAYOUT_JITTER} pixels, got {self.layout_jitter}")
        if not self.unet_init_dof > 2:  # the variance is finite only above 2 degrees of freedom
            raise ValueError(f"unet_init_dof must be > 2 (a Student-t has a variance only then), got {self.unet_init_dof}")
