"""The quantization recipe as a typed, checked object (the ``quant`` config group).

Like torchao's config objects: one frozen dataclass says what a recipe is, refuses keys it does not
know and values it cannot run, and is what the stages pass around (no dict of loosely checked
keys). Usable from a notebook::

    recipe = QuantRecipe(weight_bits=(4, 8), weight_bits_by_group={"content": (4, 8), "quality": (8,)})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

GROUPS = ("content", "quality")
WEIGHT_CLIPS = ("minmax", "mse")
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class Gptq:
    """GPTQ rounding settings (used with ``rounding="gptq"``)."""

    damp: float = 0.01          # added to the Hessian's diagonal, as a fraction of its mean
    block_size: int = 128       # columns updated together (speed only: the result is the same up to float rounding)
    max_columns: int | None = None  # layers with more input columns keep nearest rounding (Hessian size cap)

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, (int, float)) and 0 < float(self.damp) < 1):
            raise ValueError(f"quant.gptq.damp must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"quant.gptq.block_size must be a positive integer, got {self.block_size!r}")
        m = self.max_columns
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"quant.gptq.max_columns must be a positive integer or null, got {m!r}")


@dataclass(frozen=True)
class ProtectAct:
    """Activation protection: layers kept in full precision, chosen from 8-bit activation sensitivity."""

    content: int = 2            # lowest-SSIM content layers
    quality: int = 2            # lowest-SQNR quality layers
    first_last_conv: bool = True


def _bits(v: Any) -> tuple[int, ...]:
    return tuple(int(b) for b in v)


@dataclass(frozen=True)
class QuantRecipe:
    """Which bit-widths are calibrated, which each group may use, and how they are calibrated and run."""

    name: str = "default"
    weight_bits: tuple[int, ...] = (2, 4, 8)           # calibrated for every layer
    act_bits: tuple[int, ...] = (4, 8)
    weight_bits_by_group: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: {"content": (2, 4, 8), "quality": (4, 8)})
    act_bits_by_group: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: {"content": (4, 8), "quality": (4, 8)})
    weight_clip: str = "minmax"                         # minmax | mse (clipping search)
    weight_group_sizes: tuple[int, ...] = ()            # per-group scale options beside per channel (e.g. 64, 128)
    rounding: str = "nearest"                           # nearest | gptq (Hessian of the calibration inputs)
    gptq: Gptq = field(default_factory=Gptq)
    act_momentum: float = 0.95                          # running min/max over calibration batches and steps
    act_timestep_groups: int = 1                        # G > 1: one activation range per group of sampler steps
    skip_bos: bool = True                               # cross-attention K/V: the BOS token outside the range
    protect_act: ProtectAct = field(default_factory=ProtectAct)
    kernels: Mapping[str, Any] = field(default_factory=dict)  # mixprec.kernels.BackendConfig options

    def __post_init__(self) -> None:
        for kind, allowed in (("weight_bits_by_group", "weight_bits"), ("act_bits_by_group", "act_bits")):
            for group, bits in getattr(self, kind).items():
                extra = sorted(set(bits) - set(getattr(self, allowed)))
                if extra:
                    raise ValueError(f"quant.{kind}.{group} uses bits {extra} that quant.{allowed}="
                                     f"{list(getattr(self, allowed))} does not calibrate; add them to quant.{allowed}")
        if any(b < 2 or b > 8 for b in self.weight_bits + self.act_bits):
            raise ValueError(f"bit-widths must be between 2 and 8, got weight {list(self.weight_bits)} / act "
                             f"{list(self.act_bits)}")
        g = self.act_timestep_groups
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"quant.act_timestep_groups must be an integer >= 1, got {g!r}")
        if self.weight_clip not in WEIGHT_CLIPS:
            raise ValueError(f"quant.weight_clip must be one of {WEIGHT_CLIPS}, got {self.weight_clip!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"quant.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        sizes = self.weight_group_sizes
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 2 for g in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"quant.weight_group_sizes must be distinct integers >= 2 (input columns per weight "
                             f"scale, e.g. [64, 128]; [] = per output channel only), got {list(sizes)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], num_inference_steps: int | None = None) -> "QuantRecipe":
        """From the ``quant`` config; unknown keys are refused. With ``num_inference_steps``, timestep
        groups are checked against the model's sampler steps."""
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown quant settings {unknown}; the recipe knows {sorted(known)}")
        for key in ("weight_bits", "act_bits"):
            if key in d:
                d[key] = _bits(d[key])
        for key in ("weight_bits_by_group", "act_bits_by_group"):
            if key in d:
                d[key] = {str(g): _bits(b) for g, b in dict(d[key]).items()}
        if "protect_act" in d:
            d["protect_act"] = ProtectAct(**dict(d["protect_act"]))
        if "weight_group_sizes" in d:
            sizes = d["weight_group_sizes"] or []
            if isinstance(sizes, (str, int)):
                raise ValueError(f"quant.weight_group_sizes must be a list such as [64, 128], got {sizes!r}")
            d["weight_group_sizes"] = tuple(int(g) if isinstance(g, int) or str(g).isdigit() else g for g in sizes)
        if "gptq" in d:
            gptq = dict(d["gptq"] or {})
            unknown_g = sorted(set(gptq) - {f.name for f in fields(Gptq)})
            if unknown_g:
                raise ValueError(f"unknown quant.gptq settings {unknown_g}; known: {[f.name for f in fields(Gptq)]}")
            d["gptq"] = Gptq(**gptq)
        if "kernels" in d:
            d["kernels"] = dict(d["kernels"] or {})
        recipe = cls(**d)
        steps = num_inference_steps
        if steps is not None and recipe.act_timestep_groups > int(steps):
            raise ValueError(f"quant.act_timestep_groups={recipe.act_timestep_groups} is more than the model's "
                             f"{steps} sampler steps (model.num_inference_steps); use at most {steps}")
        return recipe

    def bits_by_group(self, kind: str) -> dict[str, tuple[int, ...]]:
        """Group -> the widths a ``weight`` or ``act`` plan may use."""
        return dict(self.weight_bits_by_group if kind == "weight" else self.act_bits_by_group)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as the config spells them (stored in calibration metadata)."""
        d = asdict(self)
        for key in ("weight_bits", "act_bits", "weight_group_sizes"):
            d[key] = list(d[key])
        for key in ("weight_bits_by_group", "act_bits_by_group"):
            d[key] = {g: list(b) for g, b in d[key].items()}
        d["kernels"] = dict(d["kernels"])
        return d

    def identity(self) -> dict[str, Any]:
        """What decides calibration and plans (the recipe's part of the quant fingerprint): not its
        name, not kernel execution options; options at their neutral value are left out, so that
        workspaces made before they existed stay valid."""
        neutral = {"act_timestep_groups": 1, "weight_group_sizes": [], "rounding": "nearest"}
        d = {k: v for k, v in self.to_dict().items() if k not in ("name", "kernels") and (k not in neutral or neutral[k] != v)}
        if self.rounding != "gptq":
            d.pop("gptq")  # its settings do nothing with nearest rounding
        return d
