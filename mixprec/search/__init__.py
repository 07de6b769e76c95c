"""Bit allocation: sensitivities -> mixed-precision plans (pure library, no Hydra).

Usable from a notebook::

    from mixprec.search import bootstrap_metric, solve_mean_bits, write_plan, Plan
    metric = {g: bootstrap_metric(per_prompt[g], seed=0, cap=100.0) for g in ("content", "quality")}
    sol = solve_mean_bits(metric, sizes, groups, {"content": (2, 4, 8), "quality": (4, 8)}, target=4.0, K=2.0)
"""

from .budget import (DEFAULT_BYTES_RTOL, FULL_PRECISION_BITS, LayerSizes, act_layer_bytes, act_plan_bytes,
                     byte_window, same_bytes, uniform_plan, weight_layer_bytes, weight_plan_bytes)
from .bootstrap import CONTENT_METRICS, QUALITY_METRICS, bootstrap_metric, noise_power, resample_indices, ssim_db
from .pareto import pareto_front, plot_pareto, write_pareto_csv
from .plan import (Plan, atomic_write_text, natural_key, plan_dirname, plan_to_yaml, plans_digest, read_plan,
                   write_plan)
from .program import (
    GROUPS,
    MIB,
    PROTECTED_BITS,
    SOLVERS,
    AllocationError,
    InfeasibleBudgetError,
    PlanVerificationError,
    SensitivityError,
    Solution,
    SolverError,
    group_weights,
    layer_bytes,
    mean_bits,
    normalized_tables,
    option_bits,
    option_keys,
    plan_bytes,
    plan_objective,
    reachable_mean,
    solve_budget,
    solve_bytes,
    solve_group,
    solve_mean_bits,
    split_option,
    split_target,
    with_grouped_options,
)

__all__ = [
    "DEFAULT_BYTES_RTOL", "FULL_PRECISION_BITS", "LayerSizes", "act_layer_bytes", "act_plan_bytes", "byte_window",
    "same_bytes", "solve_budget", "uniform_plan", "weight_layer_bytes", "weight_plan_bytes",
    "GROUPS", "MIB", "PROTECTED_BITS", "SOLVERS", "AllocationError", "InfeasibleBudgetError",
    "PlanVerificationError", "SensitivityError", "Solution", "SolverError", "Plan", "atomic_write_text",
    "CONTENT_METRICS", "QUALITY_METRICS", "bootstrap_metric", "noise_power", "ssim_db", "group_weights",
    "layer_bytes", "mean_bits", "natural_key", "normalized_tables",
    "pareto_front", "plan_bytes", "plan_dirname", "plan_objective", "plan_to_yaml", "plans_digest", "plot_pareto",
    "reachable_mean",
    "read_plan", "resample_indices", "solve_bytes", "solve_group", "solve_mean_bits", "split_target",
    "write_pareto_csv", "write_plan", "option_bits", "option_keys", "split_option", "with_grouped_options",
]
