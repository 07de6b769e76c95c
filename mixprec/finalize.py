"""From candidate plans to the final plan: the uniform guard and the refinement (no Hydra).

Used by ``stage=select`` and ``stage=evaluate`` alike, so that what the ablation measures is what
the pipeline ships:

1. **Guard** (:func:`uniform_candidate`): the uniform plan of the same budget (every layer at the
   widest width whose bytes stay within the budget; protected activations at 16) joins the
   candidates, so selection can never return a plan that loses to uniform on the selection prompts.
2. **Selection**: every candidate generates the selection prompts with the plan applied and is
   ranked by :func:`mixprec.selection.sort_key` (the stage's metric).
3. **Refinement** (:func:`refine_plan`): a bounded local search from the winner
   (:func:`mixprec.search.refine.refine`) scored by the same joint generation, within the byte window
   of the budget (:mod:`mixprec.search.budget`).

:class:`JointScorer` counts the evaluations and their wall time: the cost every artifact records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mixprec import artifacts, search
from mixprec.artifacts import Budget, CensusLayer
from mixprec.quant.options import option_order
from mixprec.search import FULL_PRECISION_BITS, LayerSizes, Plan
from mixprec.search.refine import SELECTION_SCORES, RefineResult, refine
from mixprec.selection import generate_and_score, sort_key

UNIFORM_WIDTHS = tuple(range(8, 1, -1))  # widest first: the guard takes the widest that fits


@dataclass(frozen=True)
class RefineOptions:
    """``stage.refine``: joint-generation evaluations of the local search (0 = off), its seed, and
    whether to measure sensitivities at the operating point first (two evaluations per layer, out
    of the same budget), and which moves it keeps: ``no_worse`` (the default) those that improve the
    ranking and leave no selection score (SSIM, PSNR, MSE, adherence) worse; ``key``: those that
    improve the ranking alone (before session 28)."""

    evaluations: int = 0
    seed: int = 0
    operating_point: bool = False
    accept: str = "no_worse"

    @classmethod
    def of(cls, node: Mapping[str, Any] | None) -> "RefineOptions":
        node = dict(node or {})
        unknown = sorted(set(node) - {"evaluations", "seed", "operating_point", "accept"})
        if unknown:
            raise ValueError(f"stage.refine has no setting(s) {unknown}; it takes evaluations, seed, "
                             f"operating_point, accept")
        opts = cls(int(node.get("evaluations", 0)), int(node.get("seed", 0)), bool(node.get("operating_point", False)),
                   str(node.get("accept", "no_worse")))
        if opts.accept not in ("no_worse", "key"):
            raise ValueError(f"stage.refine.accept must be no_worse (keep a move only if no selection score gets "
                             f"worse) or key (the ranking alone), got {opts.accept!r}")
        if opts.evaluations < 0:
            raise ValueError(f"stage.refine.evaluations must be >= 0 (0 turns refinement off), got {opts.evaluations}")
        return opts


def budget_bytes(kind: str, budget: Budget, sizes: LayerSizes, layers: Sequence[str],
                 protected: Sequence[str] = ()) -> int:
    """The budget in bytes: MiB as given, or a mean-bit target as :meth:`LayerSizes.target_bytes`."""
    if budget.unit == "MiB":
        return int(math.floor(budget.value * search.MIB + 1e-6))  # MiB of an exact byte count round-trips
    return sizes.target_bytes(kind, float(budget.value), layers, protected)


def uniform_width(kind: str, budget: Budget, sizes: LayerSizes, layers: Sequence[str],
                  protected: Sequence[str] = (), widths: Sequence[int] = UNIFORM_WIDTHS) -> int | None:
    """The widest of ``widths`` whose uniform plan fits the budget's bytes; None if none does."""
    limit = budget_bytes(kind, budget, sizes, layers, protected)
    for b in sorted(widths, reverse=True):
        if sizes.plan_bytes(kind, search.uniform_plan(layers, b, protected)) <= limit:
            return b
    return None


def uniform_candidate(kind: str, budget: Budget, census: Sequence[CensusLayer], protected: Sequence[str] = (),
                      fingerprints: Mapping[str, str] | None = None,
                      widths: Sequence[int] = UNIFORM_WIDTHS) -> Plan | None:
    """The guard's candidate: the uniform plan of this budget, with a header like the allocated ones.

    ``widths``: the widths the calibration holds (``quant.weight_bits`` / ``quant.act_bits``), so that
    the final plan runs wherever the recipe's plans run (infer, kernels, export)."""
    sizes = LayerSizes.of(census)
    names = [c.name for c in census]
    prot = [p for p in protected if p in set(names)] if kind == "act" else []
    width = uniform_width(kind, budget, sizes, names, prot, widths)
    if width is None:
        return None
    bits = search.uniform_plan(names, width, prot)
    size = sizes.describe(kind, bits)
    fp = dict(fingerprints or {})
    header = {**artifacts.plan_header_fields(kind, budget, 1.0, 0), "method": "uniform", "uniform_bits": width,
              "achieved_mean_bits": {"overall": size["mean_bits"]}, "bytes": size["bytes"], "mib": size["mib"],
              "objective": None, "score": None, "solver": None, "status": "UNIFORM", "protected": len(prot),
              "protected_bits": FULL_PRECISION_BITS, "model_fingerprint": fp.get("model"),
              "quant_fingerprint": fp.get("quant")}
    return Plan(header, bits)


def uniform_path(kind: str, budget: Budget) -> str:
    """How the guard's candidate is named in tables (it is not a file under plans/)."""
    unit = "MiB" if budget.unit == "MiB" else ""
    return f"uniform/{kind}_{budget.value:g}{unit}"


@dataclass
class JointScorer:
    """Score a plan by generating the selection prompts with it (the other kind fixed): the one score
    selection and refinement share. Counts evaluations and their wall time."""

    sampler: Any
    layers: Mapping[str, Any]
    prompts: Sequence[str]
    seeds: Sequence[int]
    reference: Any
    checker: str | None
    metric: str
    kind: str
    fixed: Mapping[str, int] | None = None
    fixed_groups: Mapping[str, int] | None = None  # the fixed weight plan's per-group layers (kind act)
    evaluations: int = 0
    wall_s: float = 0.0
    cache: dict[tuple, tuple[tuple, dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[tuple, float] = field(default_factory=dict)

    def __call__(self, bits: Mapping[str, int | str]) -> tuple[tuple, dict[str, Any]]:
        """``bits``: layer -> width, or a per-group weight option ``"4g64"`` (:func:`search.option_bits`)."""
        digest = _digest(bits)
        if digest in self.cache:  # a plan scored before (another variant's candidate): same images, same score
            return self.cache[digest]
        t0 = time.perf_counter()
        plan, groups = search.option_bits(bits)
        weight, act = (plan, self.fixed) if self.kind == "weight" else (self.fixed, plan)
        scores = generate_and_score(self.sampler, self.layers, self.prompts, self.seeds, self.reference,
                                    self.checker, weight, act,
                                    weight_groups=groups if self.kind == "weight" else self.fixed_groups).scores
        scores = {k: v for k, v in scores.items() if k != "per_image"}
        self.seconds[digest] = time.perf_counter() - t0
        self.evaluations += 1
        self.wall_s += self.seconds[digest]
        self.cache[digest] = (sort_key(scores, self.metric), scores)
        return self.cache[digest]

    def cost_of(self, plans: Sequence[Mapping[str, int]]) -> dict[str, Any]:
        """What scoring these plans costs on its own (distinct plans, the seconds each took when first scored)."""
        distinct = {_digest(p) for p in plans}
        return {"evaluations": len(distinct), "wall_s": sum(self.seconds.get(d, 0.0) for d in distinct)}


def _digest(bits: Mapping[str, int | str]) -> tuple:
    return tuple(sorted((k, v if isinstance(v, str) else int(v)) for k, v in bits.items()))


def sensitivity_prior(per_prompt: Mapping[str, Mapping[str, Mapping[Any, list[float]]]],
                      bits_by_group: Mapping[str, Sequence[int]], groups: Mapping[str, str],
                      protected: Sequence[str] = (), metric_cap: float = 100.0,
                      group_sizes: Sequence[int] = ()) -> dict[str, dict[int | str, float]]:
    """The allocation's view of each layer at each width: the normalised seed-0 table with K = 1
    weights (what :func:`mixprec.search.plan_objective` sums), the refinement's move prior.
    ``group_sizes``: per-group weight options (``"4g64"``) in the table join their layers' rows."""
    prot = set(protected)
    metric = {g: search.bootstrap_metric(per_prompt[g], 0, cap=metric_cap) for g in search.GROUPS}
    by_group = {g: [l for l, gg in groups.items() if gg == g and l not in prot and l in metric[g]]
                for g in search.GROUPS}
    norm = search.normalized_tables(metric, by_group, bits_by_group, metric_cap, group_sizes)
    weights = search.group_weights(1.0, {g: len(v) for g, v in by_group.items()})
    return {l: {b: weights[g] * v for b, v in row.items()} for g in search.GROUPS for l, row in norm[g].items()}


def refine_plan(bits: Mapping[str, int], start: tuple[tuple, dict[str, Any]], scorer: JointScorer, kind: str,
                budget: Budget, census: Sequence[CensusLayer], bits_by_group: Mapping[str, Sequence[int]],
                options: RefineOptions, prior: Mapping[str, Mapping[int, float]] | None = None,
                protected: Sequence[str] = (), bytes_rtol: float = search.DEFAULT_BYTES_RTOL,
                progress: bool = False, group_size: Mapping[str, int] | None = None) -> RefineResult:
    """Local search from ``bits`` within the budget's byte window (protected activations never move).

    ``group_size``: the start plan's per-group weight layers. Weight layers whose ``prior`` row holds
    per-group options (``"4g64"``, :func:`sensitivity_prior` with group sizes) may also move to and from
    them; the result's ``bits`` then hold such keys (:func:`mixprec.search.option_bits` splits them)."""
    sizes = LayerSizes.of(census)
    names = [c.name for c in census]
    prot = set(protected) if kind == "act" else set()
    bits, grouped = search.option_bits(bits)  # ``bits`` may already hold "4g64" choices
    start_plan = search.option_keys(bits, {**grouped, **dict(group_size or {})})

    def layer_choices(layer: str, group: str) -> tuple:
        measured = sorted((k for k in (prior or {}).get(layer, {}) if isinstance(k, str)), key=option_order)
        return tuple(bits_by_group[group]) + (tuple(measured) if kind == "weight" else ())

    choices = {c.name: layer_choices(c.name, c.group) for c in census if c.name not in prot
               and int(bits[c.name]) < FULL_PRECISION_BITS}
    window = search.byte_window(budget_bytes(kind, budget, sizes, names, sorted(prot)), bytes_rtol)
    return refine(start_plan, scorer, choices, lambda l, k: sizes.layer_bytes(kind, l, *search.split_option(k)),
                  window, evaluations=options.evaluations,
                  prior=prior, seed=options.seed, operating_point=options.operating_point, start=start,
                  progress=progress, desc=f"refine {kind}",
                  no_worse=SELECTION_SCORES if options.accept == "no_worse" else None)
