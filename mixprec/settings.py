"""One typed settings object per stage: the keys ``stage.<key>`` may have, and their types.

The YAML files in ``conf/stage`` hold the defaults and say what each setting does; the dataclasses
here say which keys exist and what type each takes. :func:`check_stage` refuses a key a stage does
not have (``stage.weight_targt=5`` and ``+stage.weight_targt=5`` alike) with the list of valid
keys, and a value of the wrong type naming the setting and the type, before any work starts.
:func:`check_command_line` makes the same key check on ``sys.argv`` before Hydra composes the
config, so a typo gets this message instead of Hydra's advice to append the key with ``+``.
Nothing here imports torch. The training stages' settings are derived from the library's
training-config dataclasses (torch-free modules), which hold those knobs' names, types and defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from mixprec.compose.train_config import ComposeTrainConfig
from mixprec.tiny.train_config import TrainConfig

Number = Union[int, float]
# force: true (this stage and everything it depends on, measurements included), false, or the
# names of the stages to rerun
Force = Union[bool, str, list[str]]


@dataclasses.dataclass
class StageSettings:
    """Keys every stage has."""

    name: str
    force: Force = False
    # the name of the run record (<record>.json); the sweeps give each job its own
    record: Optional[str] = None


@dataclasses.dataclass
class InspectSettings(StageSettings):
    pass


@dataclasses.dataclass
class CalibrateSettings(StageSettings):
    batch_size: int = 8


@dataclasses.dataclass
class SensitivitySettings(StageSettings):
    batch_size: int = 8
    kinds: list[Literal["w", "a"]] = dataclasses.field(default_factory=list)
    layers: Optional[list[str]] = None
    weight_bits: Optional[list[int]] = None
    act_bits: Optional[list[int]] = None
    sqnr_cap_db: Number = 100.0
    shard: int = 0
    num_shards: int = 1
    merge_only: bool = False
    max_tasks: Optional[int] = None
    restart: bool = False
    progress: bool = True
    compile_decoder: Union[bool, Literal["auto"]] = "auto"
    decoder_channels_last: Union[bool, Literal["auto"]] = "auto"
    # (layer, bits) perturbations per batched generation; "auto" = batch_size // prompts, at least 1
    perturbations_per_batch: Union[int, Literal["auto"]] = "auto"


@dataclasses.dataclass
class AllocateSettings(StageSettings):
    kind: Union[Literal["weight", "act"], list[Literal["weight", "act"]]] = "weight"
    budget: Literal["mean_bits", "bytes", "latency"] = "mean_bits"
    target: Union[Number, list[Number], None] = 4.0
    budget_mib: Union[Number, list[Number], None] = None
    # milliseconds, or "<f>x": f times the latency table's 16-bit time ("1x": not slower than 16 bit)
    budget_ms: Union[Number, str, list[Union[Number, str]], None] = None
    program: Literal["split", "joint", "both"] = "split"
    content_metric: Literal["ssim", "ssim_db"] = "ssim"
    quality_metric: Literal["sqnr_db", "noise_power"] = "sqnr_db"
    latency_table: str = "layer_latency.json"
    latency_headroom: Optional[Number] = None
    K: Union[Number, list[Number]] = 1.0
    seed: Union[int, list[int]] = 0
    solver: Literal["cp-sat", "highs", "scip", "cbc"] = "cp-sat"
    time_limit_s: Number = 10.0
    tolerance: Number = 0.1
    bytes_tolerance: Number = 0.01
    metric_cap: Number = 100.0
    on_infeasible: Literal["raise", "skip"] = "raise"
    pareto: bool = False
    pareto_size_rtol: Number = 0.001


@dataclasses.dataclass
class SelectSettings(StageSettings):
    metric: Literal["auto", "adherence", "psnr", "ssim", "mse"] = "ssim"
    kinds: list[Literal["weight", "act"]] = dataclasses.field(default_factory=list)
    batch_size: int = 8
    progress: bool = True
    weight_target: Optional[Number] = 4
    act_target: Optional[Number] = 7
    output_dir: Optional[str] = None
    guard: bool = True
    refine: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InferSettings(StageSettings):
    use_act_plan: bool = True
    save_full_precision: bool = True
    batch_size: int = 8
    plan_dir: Optional[str] = None
    execution: Literal["fake", "kernels"] = "fake"
    kernels: Optional[dict[str, Any]] = None
    save_checkpoint: bool = False
    checkpoint: Optional[str] = None
    # adapters beside the layers for this stage's generations: [{path, weight, name}] (mixprec.lora)
    lora: list[Union[str, dict[str, Any]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ExportSettings(StageSettings):
    use_act_plan: bool = True
    plan_dir: Optional[str] = None
    activations: Literal["dynamic_int8", "weight_only"] = "dynamic_int8"
    output: str = "torchao_plan.json"


@dataclasses.dataclass
class ReportSettings(StageSettings):
    output: str = "report.html"
    images: bool = True
    prompt_set: str = "inference"
    max_prompts: int = 8
    batch_size: int = 8
    thumb_max_side: int = 256
    compare: list[str] = dataclasses.field(default_factory=list)
    compare_output: str = "compare.html"


@dataclasses.dataclass
class EvaluateSettings(StageSettings):
    points: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    K: list[Number] = dataclasses.field(default_factory=list)
    select_metric: Literal["auto", "adherence", "psnr", "ssim", "mse"] = "ssim"
    methods: Optional[list[Literal["uniform", "sqnr_only", "decoupled"]]] = None
    seed_offsets: list[int] = dataclasses.field(default_factory=list)
    solver: Literal["cp-sat", "highs", "scip", "cbc"] = "cp-sat"
    time_limit_s: Number = 10.0
    bytes_tolerance: Number = 0.01
    sqnr_cap_db: Number = 100.0
    variants: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    batch_size: int = 16
    progress: bool = True


@dataclasses.dataclass
class BenchmarkSettings(StageSettings):
    plans: list[str] = dataclasses.field(default_factory=list)
    calibration: Literal["workspace", "random"] = "workspace"
    resolutions: Optional[list[int]] = None
    batch_sizes: Optional[list[int]] = None
    # explicit "RESxBATCH" pairs instead of resolutions x batch_sizes (e.g. ["512x1", "1024x1", "512x4"])
    shapes: Optional[list[str]] = None
    dtype: Optional[str] = None
    compile: Optional[Literal["none", "default", "regional", "reduce-overhead", "max-autotune-no-cudagraphs"]] = None
    memory_format: Literal["channels_last", "contiguous"] = "channels_last"
    iters: Optional[int] = None
    warmup: Optional[int] = None
    end_to_end: bool = True
    end_to_end_repeats: Optional[int] = None
    end_to_end_compile_vae: bool = True
    # pipeline components replayed from CUDA graphs end to end (GPU only): text_encoder,
    # text_encoder_2, denoiser, vae_decode
    end_to_end_cuda_graphs: list[str] = dataclasses.field(
        default_factory=lambda: ["text_encoder", "text_encoder_2", "denoiser", "vae_decode"])
    # > 0: one more end-to-end run under cProfile, that many functions by own host time in the JSON
    end_to_end_host_profile: int = 0
    # one more end-to-end run under torch.profiler: timeline file, wall vs GPU-busy time in the JSON
    end_to_end_trace: bool = False
    save_checkpoint: Optional[str] = None
    kernels: Optional[dict[str, Any]] = None
    # what resolutions/batch_sizes/iters/warmup/end_to_end_repeats left at null mean, per device type
    sizes: Optional[dict[str, Any]] = None


@dataclasses.dataclass
class LatencyTableSettings(StageSettings):
    choices: list[str] = dataclasses.field(default_factory=list)
    resolution: Optional[int] = None
    batch_size: int = 1
    calibration: Literal["workspace", "random"] = "workspace"
    dtype: Optional[str] = None
    memory_format: Literal["channels_last", "contiguous"] = "channels_last"
    compile: str = "none"
    iters: int = 20
    warmup: int = 3
    kernels: Optional[dict[str, Any]] = None
    # time the table's fastest plan as a whole too: the overhead per quantized layer predictions add
    calibrate: bool = True


# ------------------------------------------------------------------ training stages
# train_tiny / train_compose: the library's training config (TrainConfig, ComposeTrainConfig: the one
# place that names each knob with its type and default; their Literal fields give the allowed
# values) plus the stage's own keys below, which say where and how the stage runs.

# What train_compose stores the weights in (the stage maps the name to torch's dtype).
SaveDtype = Literal["float32", "float16"]


@dataclasses.dataclass
class TrainStageKeys(StageSettings):
    """Keys of both training stages that are not training-config fields."""

    output: Optional[str] = None
    device: str = "auto"
    resume: bool = True
    progress: bool = True
    eval_heldout_prompts: int = 64


@dataclasses.dataclass
class TrainComposeStageKeys(TrainStageKeys):
    save_dtype: SaveDtype = "float16"


# Config fields whose stage setting differs from the field, as (type, default): `stage.arch` holds
# overrides deep-merged over the model's architecture (null: the shipped one), the config the result.
_SETTING_OF_FIELD: dict[str, tuple[Any, Any]] = {"arch": (Optional[dict[str, Any]], None)}


def train_settings(name: str, config: type, stage_keys: type[TrainStageKeys]) -> type[StageSettings]:
    """The settings class of a training stage: `stage_keys` plus one setting per field of the
    training-config dataclass `config`, with the field's type and default."""
    hints = typing.get_type_hints(config)
    clash = {f.name for f in dataclasses.fields(config)} & {f.name for f in dataclasses.fields(stage_keys)}
    if clash:
        raise TypeError(f"{config.__name__} fields {sorted(clash)} are also keys of {stage_keys.__name__}")
    fields = []
    for f in dataclasses.fields(config):
        if f.name in _SETTING_OF_FIELD:
            tp, default = _SETTING_OF_FIELD[f.name]
        elif f.default is dataclasses.MISSING:
            raise TypeError(f"{config.__name__}.{f.name} has no plain default: add its stage setting to _SETTING_OF_FIELD")
        else:
            tp, default = hints[f.name], f.default
        fields.append((f.name, tp, dataclasses.field(default=default)))
    doc = f"Settings of stage={name}: {stage_keys.__name__} plus the fields of {config.__module__}.{config.__name__}."
    return dataclasses.make_dataclass(f"{''.join(w.title() for w in name.split('_'))}Settings", fields,
                                      bases=(stage_keys,), namespace={"__module__": __name__, "__doc__": doc})


TrainTinySettings = train_settings("train_tiny", TrainConfig, TrainStageKeys)
TrainComposeSettings = train_settings("train_compose", ComposeTrainConfig, TrainComposeStageKeys)


@dataclasses.dataclass
class PipelineSettings(StageSettings):
    stages: list[str] = dataclasses.field(default_factory=list)
    always_run: list[str] = dataclasses.field(default_factory=list)
    # one entry per name in `stages`, each with the settings of the stage it runs (its `name`)
    calibrate: Optional[dict[str, Any]] = None
    sensitivity: Optional[dict[str, Any]] = None
    allocate_weight: Optional[dict[str, Any]] = None
    allocate_act: Optional[dict[str, Any]] = None
    select: Optional[dict[str, Any]] = None
    infer: Optional[dict[str, Any]] = None
    report: Optional[dict[str, Any]] = None


SCHEMAS: dict[str, type[StageSettings]] = {
    "inspect": InspectSettings, "calibrate": CalibrateSettings, "sensitivity": SensitivitySettings,
    "allocate": AllocateSettings, "select": SelectSettings, "infer": InferSettings, "report": ReportSettings,
    "evaluate": EvaluateSettings, "benchmark": BenchmarkSettings, "latency_table": LatencyTableSettings,
    "train_tiny": TrainTinySettings, "train_compose": TrainComposeSettings, "pipeline": PipelineSettings,
    "export": ExportSettings,
}
# pipeline entry -> the stage it runs (conf/stage/pipeline.yaml: allocate@allocate_weight, ...)
PIPELINE_ENTRIES = {"calibrate": "calibrate", "sensitivity": "sensitivity", "allocate_weight": "allocate",
                    "allocate_act": "allocate", "select": "select", "infer": "infer", "report": "report"}


class SettingsError(ValueError):
    """A stage setting that does not exist or has a value of the wrong type."""


def valid_keys(stage: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(SCHEMAS[stage]))


def _unknown_key(prefix: str, key: str, stage: str) -> SettingsError:
    return SettingsError(
        f"{prefix}{key} is not a setting of stage={stage}; valid keys: {', '.join(valid_keys(stage))}. "
        f"Fix the spelling (`python run.py stage={stage} --cfg job` prints them with their values).")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if not (a is int and float in typing.get_args(tp))]
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_type_name(typing.get_args(tp)[0])})"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, Sequence) and not isinstance(value, str) and \
            all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_stage(values: Mapping[str, Any], prefix: str = "stage.") -> StageSettings:
    """The typed settings of one stage's config node (plain dict); raises :class:`SettingsError`."""
    stage = values.get("name")
    if stage not in SCHEMAS:
        raise SettingsError(f"{prefix}name={stage!r} is not a stage; stages: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[stage]
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(prefix, key, stage)
        if not _matches(value, hints[key]):
            raise SettingsError(f"{prefix}{key}={value!r}: expected {_type_name(hints[key])}, got "
                                f"{type(value).__name__} (set it like `{prefix}{key}=<value>`; "
                                f"conf/stage/{stage}.yaml documents it)")
    if stage == "pipeline":
        for entry in PIPELINE_ENTRIES:
            if values.get(entry) is not None:
                check_stage(values[entry], f"{prefix}{entry}.")
    return schema(**values)


def _stage_of_command_line(overrides: Sequence[Any]) -> str | None:
    for o in overrides:
        if o.key_or_group == "stage" and not o.is_sweep_override() and o.value() is not None:
            return str(o.value())
    return "pipeline"


# Hydra flags followed by a value (``-cn allocate``, ``--cfg job``)
_FLAGS_WITH_VALUE = ("-cn", "-cd", "-cp", "-c", "-p", "-i", "--config-name", "--config-dir", "--config-path",
                     "--cfg", "--package", "--info", "--experimental-rerun")


def _plain_overrides(argv: Sequence[str]) -> list[str] | None:
    """The ``key=value`` arguments; None when another primary config decides the stage (sweeps)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _FLAGS_WITH_VALUE
        else:
            out.append(a)
    other_config = any(a.startswith(("-cn", "-cd", "-cp", "--config")) for a in argv)
    return None if other_config and not any(a.startswith("stage=") for a in out) else out


def check_command_line(argv: Sequence[str]) -> None:
    """Refuse ``stage.<typo>=`` and ``+stage.<typo>=`` in ``argv`` before Hydra composes anything.

    Only plain overrides are read; with another primary config (``-cn``/``-cd``) and no ``stage=``
    the composed config is checked later by the runner instead.
    """
    plain = _plain_overrides(argv)
    if plain is None:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception:  # Hydra reports its own syntax errors
        return
    stage = _stage_of_command_line(overrides)
    if stage not in SCHEMAS:
        return  # the runner names the valid stages
    for o in overrides:
        parts = o.key_or_group.split(".")
        if parts[0] != "stage" or len(parts) < 2 or o.is_delete():
            continue
        key, where = parts[1], stage
        if stage == "pipeline" and key in PIPELINE_ENTRIES and len(parts) > 2:
            key, where = parts[2], PIPELINE_ENTRIES[key]
            if parts[2] not in valid_keys(where):
                raise SystemExit(f"error: {_unknown_key(f'stage.{parts[1]}.', key, where)}")
            continue
        if key not in valid_keys(where):
            raise SystemExit(f"error: {_unknown_key('stage.', key, where)}")


def stage_config_files(conf_dir: str | Path) -> dict[str, Path]:
    """conf/stage/<name>.yaml for every stage (the test that YAML and schema agree uses it)."""
    return {p.stem: p for p in sorted(Path(conf_dir, "stage").glob("*.yaml"))}


def is_forced(force: Any, name: str) -> bool:
    """``stage.force``: true (every stage), false, one stage name or a list of them."""
    if isinstance(force, bool) or force is None:
        return bool(force)
    names = [force] if isinstance(force, str) else list(force)
    return name in names
