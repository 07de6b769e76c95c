"""The tiny model's training knobs: :class:`TrainConfig` (library code: no Hydra, no torch here).

Torch-free on purpose: :mod:`mixprec.settings` derives the ``train_tiny`` stage's keys, types and
defaults from this class when a command line is checked, before the thread settings that must
precede ``import torch`` are applied. The training loop is :mod:`mixprec.tiny.train`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class TrainConfig:
    seed: int = 0
    # The full architecture; from_dict deep-merges a partial one over base_arch().
    arch: dict = field(default_factory=lambda: TrainConfig.merged_arch(None))
    dataset_size: int = 16384
    vae_steps: int = 2000
    vae_batch_size: int = 16
    vae_lr: float = 3e-3
    kl_weight: float = 1e-4
    # Reconstruction = MSE + l1_weight * L1: the L1 term sharpens the flat-colour edges sooner.
    l1_weight: float = 1.0
    # Start with a sharp posterior (std = exp(logvar/2)): with the default std of ~1 the decoder sees
    # mostly noise and learns nothing for hundreds of steps.
    vae_logvar_init: float = -6.0
    unet_steps: int = 4000
    unet_batch_size: int = 64
    unet_lr: float = 2e-3
    text_lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # Min-SNR-gamma weighting (0 disables): stops the easy low-noise steps dominating the loss.
    min_snr_gamma: float = 5.0
    num_inference_steps: int = 8
    # Monitoring only: how often to log losses / sample grids and held-out adherence.
    log_every: int = 50
    sample_every: int = 1000
    eval_prompts: int = 32
    checkpoint_every: int = 500

    # Fields that do not decide the weights (logging cadence): left out of the fingerprint.
    FINGERPRINT_SKIP: ClassVar[frozenset] = frozenset({"log_every", "sample_every", "eval_prompts", "checkpoint_every"})

    @staticmethod
    def base_arch() -> Mapping[str, Any]:
        """What `arch` overrides are deep-merged over (a subclass for another model returns its own)."""
        from mixprec.models.toy import TINY_ARCH  # loads torch: imported on use, not with this module

        return TINY_ARCH

    @classmethod
    def merged_arch(cls, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """`overrides` deep-merged over a copy of :meth:`base_arch` (None: the shipped architecture)."""
        from mixprec.models.toy import merge_arch

        return merge_arch(cls.base_arch(), overrides)

    def fingerprint_skip(self) -> frozenset:
        """The fields :meth:`fingerprint` leaves out (a subclass may depend on the values)."""
        return self.FINGERPRINT_SKIP

    def fingerprint(self) -> str:
        """Hash of what determines the weights (not of logging cadence)."""
        skip = self.fingerprint_skip()
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        d = dict(d)
        if "arch" in d:
            d["arch"] = cls.merged_arch(d["arch"])
        return cls(**d)
