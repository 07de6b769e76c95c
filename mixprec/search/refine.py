"""Refinement after the integer program: a bounded local search scored by joint generation.

The integer program adds single-layer sensitivities as if the layers' damage did not interact.
:func:`refine` starts from the selected plan and tries moves that trade bits between layers
within the byte window: one layer one allowed width up and another one width down (or a single
step when the window has room). Each tried plan is *scored by the caller* — in mixprec, by
generating the selection prompts with the whole plan applied and comparing with full precision,
the same score selection ranks by — and a move is kept only if it strictly improves that score and,
with ``no_worse``, leaves none of the other recorded scores worse. Why the second rule: the ranking
key (e.g. mean SSIM) can rise while the mean MSE, which one moved object dominates, rises too; on the
compose model such moves raised held-out SSIM and cost adherence (docs/method.md, "Session 28").

Which moves are tried first comes from a prior, per layer and width (higher is better): the
normalised sensitivity table (what the program maximized), or, with ``operating_point=True``,
each layer's measured one-step change with every other layer already at the plan's widths (two
joint evaluations per layer, counted in the budget). Moves are ranked by their predicted change,
ties broken by a seeded shuffle; first improvement is accepted and the move list rebuilt. The
search is deterministic for a seed and a deterministic scorer, and stops after ``evaluations``
scored plans: cheap enough (tens of generations of the selection set) not to need resuming.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mixprec.quant.options import parse_weight_option

# A scorer: plan -> (sort key, smaller is better; the scores to record)
Scorer = Callable[[Mapping[str, int]], tuple[tuple, dict[str, Any]]]

# Scores a kept move may not make worse (``no_worse``): +1 higher is better, -1 lower is better.
SELECTION_SCORES: dict[str, int] = {"ssim": 1, "psnr_db": 1, "mse": -1, "adherence": 1}


def no_worse_than(trial: Mapping[str, Any], current: Mapping[str, Any], directions: Mapping[str, int]) -> bool:
    """True if no score named in ``directions`` (and recorded in both) is worse in ``trial``."""
    for name, sign in directions.items():
        if name in trial and name in current and sign * (float(trial[name]) - float(current[name])) < 0:
            return False
    return True


@dataclass(frozen=True)
class Move:
    """Raise ``up`` to ``up_to`` and/or lower ``down`` to ``down_to`` (None: no such half)."""

    up: str | None
    up_to: int | None
    down: str | None
    down_to: int | None
    predicted: float
    bytes_after: int

    def apply(self, bits: Mapping[str, int]) -> dict[str, int]:
        out = dict(bits)
        if self.up is not None:
            out[self.up] = _choice(self.up_to)
        if self.down is not None:
            out[self.down] = _choice(self.down_to)
        return out

    def as_dict(self, bits: Mapping[str, int]) -> dict[str, Any]:
        return {"up": self.up, "up_from": bits.get(self.up) if self.up else None, "up_to": self.up_to,
                "down": self.down, "down_from": bits.get(self.down) if self.down else None, "down_to": self.down_to,
                "predicted": self.predicted, "bytes": self.bytes_after}


@dataclass
class RefineResult:
    bits: dict[str, int]
    key: tuple
    scores: dict[str, Any]
    start_key: tuple
    evaluations: int
    wall_s: float
    accepted: list[dict[str, Any]] = field(default_factory=list)
    tried: list[dict[str, Any]] = field(default_factory=list)
    operating_point_evaluations: int = 0

    @property
    def improved(self) -> bool:
        return self.key < self.start_key

    def summary(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "operating_point_evaluations": self.operating_point_evaluations,
                "accepted_moves": len(self.accepted), "improved": self.improved, "wall_s": self.wall_s,
                "start_key": list(self.start_key), "final_key": list(self.key), "moves": self.accepted}


def _choice(key: Any) -> int | str:
    """A layer's choice as plans hold it: an int width, or a per-group weight option ``"4g64"``."""
    return key if isinstance(key, str) else int(key)


def _neighbours(choices: Sequence[int | str], current: int | str, size: Callable[[Any], Any] | None = None
                ) -> tuple[int | str | None, int | str | None]:
    """The next allowed choice above and below ``current`` (which need not be allowed itself), in the
    order of ``size`` (a layer's bytes at a choice; default the width itself). With per-group weight
    options (``"4g64"``, a few more bytes than ``4``) a step may change the option rather than the width."""
    size = size or (lambda b: b)
    here = size(current)
    above = [b for b in choices if size(b) > here]
    below = [b for b in choices if size(b) < here]
    return (min(above, key=size) if above else None), (max(below, key=size) if below else None)


def prior_value(prior: Mapping[str, Mapping[int, float]] | None, layer: str, bits: int) -> float:
    """The prior of ``layer`` at ``bits``; widths the table lacks are interpolated linearly between the
    nearest it has (clamped at the ends); 0 without a table for the layer."""
    row = (prior or {}).get(layer)
    if not row:
        return 0.0
    if bits in row:
        return float(row[bits])
    if isinstance(bits, str):  # a per-group option the table lacks: its width's per-channel value
        return prior_value(prior, layer, parse_weight_option(bits).bits)
    known = sorted(b for b in row if not isinstance(b, str))
    lower = [b for b in known if b < bits]
    upper = [b for b in known if b > bits]
    if not lower:
        return float(row[upper[0]])
    if not upper:
        return float(row[lower[-1]])
    lo, hi = lower[-1], upper[0]
    return float(row[lo] + (row[hi] - row[lo]) * (bits - lo) / (hi - lo))


def candidate_moves(bits: Mapping[str, int], choices: Mapping[str, Sequence[int]], cost: Callable[[str, int], int],
                    window: tuple[int, int], prior: Mapping[str, Mapping[int, float]] | None,
                    rng: random.Random) -> list[Move]:
    """Every single-step move and up/down pair that keeps the plan's bytes in ``window``, best
    predicted first (ties in a seeded random order)."""
    lo, hi = window
    total = sum(cost(l, b) for l, b in bits.items())
    layers = sorted(choices)
    ups, downs = [], []
    for l in layers:
        above, below = _neighbours(choices[l], bits[l], lambda b, l=l: cost(l, b))
        here = prior_value(prior, l, bits[l])
        if above is not None:
            ups.append((l, above, cost(l, above) - cost(l, bits[l]), prior_value(prior, l, above) - here))
        if below is not None:
            downs.append((l, below, cost(l, below) - cost(l, bits[l]), prior_value(prior, l, below) - here))
    moves = [Move(l, b, None, None, gain, total + d) for l, b, d, gain in ups if lo <= total + d <= hi]
    moves += [Move(None, None, l, b, gain, total + d) for l, b, d, gain in downs if lo <= total + d <= hi]
    for ul, ub, ud, ug in ups:
        for dl, db, dd, dg in downs:
            if ul != dl and lo <= total + ud + dd <= hi:
                moves.append(Move(ul, ub, dl, db, ug + dg, total + ud + dd))
    order = list(range(len(moves)))
    rng.shuffle(order)
    rank = {i: r for r, i in enumerate(order)}
    return [m for _, m in sorted(enumerate(moves), key=lambda im: (-im[1].predicted, rank[im[0]]))]


def operating_point_prior(bits: Mapping[str, int], choices: Mapping[str, Sequence[int]], score: Scorer,
                          base_key: tuple, budget: int, tick: Callable[[], None] = lambda: None,
                          cost: Callable[[str, Any], int] | None = None) -> tuple[dict[str, dict[int, float]], int]:
    """Each layer's measured one-step change at this plan (the others at their widths): a prior of
    ``-(key[0] - base key[0])`` per neighbour width, at most ``budget`` evaluations (layers in order)."""
    prior: dict[str, dict[int, float]] = {}
    used = 0
    for l in sorted(choices):
        row = {bits[l]: 0.0}
        for b in _neighbours(choices[l], bits[l], (lambda b, l=l: cost(l, b)) if cost else None):
            if b is None or used >= budget:
                continue
            key, _ = score({**bits, l: b})
            used += 1
            tick()
            row[b] = -(float(key[0]) - float(base_key[0]))
        prior[l] = row
    return prior, used


def refine(bits: Mapping[str, int], score: Scorer, choices: Mapping[str, Sequence[int]],
           cost: Callable[[str, int], int], window: tuple[int, int], *, evaluations: int,
           prior: Mapping[str, Mapping[int, float]] | None = None, seed: int = 0, operating_point: bool = False,
           start: tuple[tuple, dict[str, Any]] | None = None, progress: bool = False,
           desc: str = "refine", no_worse: Mapping[str, int] | None = None) -> RefineResult:
    """Local search from ``bits`` within ``window`` (bytes, by ``cost(layer, bits)``), at most
    ``evaluations`` calls of ``score`` (the start's score, when ``start`` is not given, is one of them).

    ``choices``: the widths each movable layer may take (layers not in it never move, e.g. protected
    ones). ``window``: (lo, hi) bytes; a plan below ``lo`` may stay where it is (moves then only
    need to land in ``[min(lo, its bytes), hi]``). ``no_worse``: scores (name -> +1 higher is better,
    -1 lower is better) a kept move must not make worse, beside improving the key (None: the key alone).
    """
    t0 = time.perf_counter()
    rng = random.Random(seed)
    bar = _bar(progress, evaluations, desc)
    used = 0
    if start is None:
        start = score(bits)
        used += 1
        bar.update(1)
    current, (key, scores) = dict(bits), start
    start_key = key
    total = sum(cost(l, b) for l, b in current.items())
    window = (min(window[0], total), window[1])
    op_used = 0
    if operating_point and used < evaluations:
        prior, op_used = operating_point_prior(current, choices, score, key, (evaluations - used) // 2,
                                               lambda: bar.update(1), cost)
        used += op_used
    result = RefineResult(current, key, scores, start_key, used, 0.0, operating_point_evaluations=op_used)
    seen: set[Hashable] = {_digest(current)}
    while used < evaluations:
        accepted = False
        for move in candidate_moves(current, choices, cost, window, prior, rng):
            trial = move.apply(current)
            if _digest(trial) in seen:
                continue
            seen.add(_digest(trial))
            trial_key, trial_scores = score(trial)
            used += 1
            bar.update(1)
            better = trial_key < key and (not no_worse or no_worse_than(trial_scores, scores, no_worse))
            record = move.as_dict(current) | {"key": list(trial_key), "accepted": better}
            result.tried.append(record)
            if better:
                current, key, scores = trial, trial_key, trial_scores
                result.accepted.append(record)
                bar.set_postfix_str(f"{key[0]:.5g}")
                accepted = True
                break
            if used >= evaluations:
                break
        if not accepted:
            break  # every move from this plan was tried (or the budget ran out)
    bar.close()
    result.bits, result.key, result.scores, result.evaluations = current, key, scores, used
    result.wall_s = time.perf_counter() - t0
    return result


def _digest(bits: Mapping[str, int]) -> Hashable:
    return tuple(sorted(bits.items()))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="eval", leave=False)
