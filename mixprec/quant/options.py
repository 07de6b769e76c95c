"""A layer's weight option: bits and group size, and how it is named in tables and plans.

``"4"`` is 4-bit weights with one scale per output channel (the plain integer key the tables have
always used, so the default recipe's artifacts do not change); ``"4g64"`` is 4-bit weights with one
scale per output channel per 64 consecutive input columns. Rounding (nearest or GPTQ) is a recipe
setting, not part of the option.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_KEY = re.compile(r"^w?(\d+)(?:g(\d+))?$")


@dataclass(frozen=True, order=True)
class WeightOption:
    bits: int
    group_size: int = 0  # 0 = per output channel

    def __post_init__(self) -> None:
        if not 2 <= int(self.bits) <= 8:
            raise ValueError(f"weight bits must be between 2 and 8, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group size must be 0 (per channel) or positive, got {self.group_size}")

    @property
    def key(self) -> str:
        """The name in sensitivity tables and records: ``"4"`` or ``"4g64"``."""
        return f"{self.bits}g{self.group_size}" if self.group_size else str(self.bits)

    @property
    def table_key(self) -> int | str:
        """The key as tables store it: an int for per-channel options (as before), else the string."""
        return self.bits if not self.group_size else self.key

    def label(self, rounding: str = "nearest") -> str:
        """The human form: ``"w3 g64 gptq"``, ``"w4 nearest"``."""
        parts = [f"w{self.bits}"] + ([f"g{self.group_size}"] if self.group_size else []) + [rounding]
        return " ".join(parts)


def parse_weight_option(key: int | str | WeightOption) -> WeightOption:
    """``4``, ``"4"``, ``"w4"``, ``"4g64"``, ``"w4g64"`` -> :class:`WeightOption`."""
    if isinstance(key, WeightOption):
        return key
    if isinstance(key, bool):
        raise ValueError(f"not a weight option: {key!r}")
    if isinstance(key, int):
        return WeightOption(key)
    m = _KEY.match(str(key).strip())
    if not m:
        raise ValueError(f"not a weight option: {key!r} (expected bits like '4', or bits and group size like '4g64')")
    return WeightOption(int(m.group(1)), int(m.group(2) or 0))


def weight_options(in_features: int, bits: Iterable[int], group_sizes: Iterable[int] = ()) -> list[WeightOption]:
    """The options of a layer with ``in_features`` input columns: every bit-width per channel, and per
    group for each group size smaller than the input dimension (a group as wide as the row is the
    per-channel option)."""
    bits = sorted({int(b) for b in bits})
    out = [WeightOption(b) for b in bits]
    for g in sorted({int(g) for g in group_sizes}):
        if 0 < g < in_features:
            out += [WeightOption(b, g) for b in bits]
    return out


def table_key(key: int | str) -> int | str:
    """A sensitivity-table key as tables hold it: ``4`` (per channel, and every activation width) or
    ``"4g64"`` (per group). Accepts the string forms records and CSV files carry."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    text = str(key).strip()
    return int(text) if text.isdigit() else parse_weight_option(text).table_key


def option_order(key: int | str) -> tuple[int, int]:
    """Sort key for table keys: per-channel widths first (ascending), then each group size's widths."""
    key = table_key(key)
    if isinstance(key, int):
        return (0, key)
    opt = parse_weight_option(key)
    return (opt.group_size, opt.bits)
