"""Timestep-aware activation ranges: one calibrated range per contiguous group of sampler steps.

A multi-step sampler feeds the denoiser inputs whose statistics drift with the noise level (the
early, noisy steps and the late, detailed ones need different clipping ranges). With G groups the
sampler's N steps are split into G contiguous runs (sizes differ by at most one) and every
quantized layer gets one activation range per group.

:class:`StepGroups` knows the scheduler timesteps seen at calibration and which group each belongs
to. Installed on the denoiser (:meth:`StepGroups.install`), a forward pre-hook reads the timestep
of every call and sets :attr:`StepGroups.current`; the QuantLayers that share the object read it
to pick their range. Mapping the *timestep* (not a call counter) keeps it stateless: a denoiser
called outside a sampler (benchmarks, a differently batched pipeline) still gets the range of the
calibrated step nearest to its timestep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn


def split_steps(num_steps: int, num_groups: int) -> list[int]:
    """Group index of each of ``num_steps`` steps: ``num_groups`` contiguous runs, as even as possible."""
    if num_groups < 1:
        raise ValueError(f"quant.act_timestep_groups must be >= 1, got {num_groups}")
    if num_groups > num_steps:
        raise ValueError(f"quant.act_timestep_groups={num_groups} is more than the sampler's {num_steps} steps "
                         f"(model.num_inference_steps); use at most {num_steps} groups")
    return [i * num_groups // num_steps for i in range(num_steps)]


class StepGroups:
    """Maps a denoiser call's timestep to its step group; the group of the current call is ``current``."""

    def __init__(self, timesteps: Sequence[float], num_groups: int):
        timesteps = [float(t) for t in timesteps]
        if len(set(timesteps)) != len(timesteps):
            raise ValueError(f"the scheduler repeats timesteps ({timesteps}); timestep-aware activation ranges "
                             f"need one distinct timestep per step: use quant.act_timestep_groups=1 with it")
        self.timesteps = timesteps
        self.num_groups = int(num_groups)
        self.group_of_step = split_steps(len(timesteps), self.num_groups)
        self._table = torch.tensor(timesteps, dtype=torch.float64)
        self.current = 0

    def group_of_timestep(self, t: float) -> int:
        """The group of the calibrated step whose timestep is nearest to ``t``."""
        return self.group_of_step[int((self._table - float(t)).abs().argmin())]

    def to_json(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps, "num_groups": self.num_groups}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepGroups":
        return cls(d["timesteps"], d["num_groups"])

    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise RuntimeError("the denoiser was called without a timestep; timestep-aware activation ranges "
                               "need it to choose the step group")
        # Every sample of a batch is at the same step in the pipelines mixprec drives.
        self.current = self.group_of_timestep(t.reshape(-1)[0].item() if torch.is_tensor(t) else t)

    def install(self, denoiser: nn.Module, layers) -> None:
        """Follow ``denoiser``'s timestep and let ``layers`` (QuantLayers) read the group; replaces a previous one."""
        remove(denoiser)
        denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        for layer in layers:
            layer.step_groups = self


def _hooks(denoiser: nn.Module) -> list[tuple[int, StepGroups]]:
    # Found by scanning rather than by a stored handle, so a deep copy of the denoiser (the
    # benchmark copies it per plan) carries its own hook and can still be found and removed.
    return [(key, hook.__self__) for key, hook in denoiser._forward_pre_hooks.items()
            if getattr(hook, "__func__", None) is StepGroups._pre_hook]


def remove(denoiser: nn.Module) -> None:
    for key, _ in _hooks(denoiser):
        del denoiser._forward_pre_hooks[key]
        denoiser._forward_pre_hooks_with_kwargs.pop(key, None)


def installed(denoiser: nn.Module) -> StepGroups | None:
    found = _hooks(denoiser)
    return found[-1][1] if found else None
