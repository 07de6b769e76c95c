"""The stage context and what most stages share: the config turned into fingerprints, a loaded,
quantizable model, prompt sets, and a tracker.

The runner builds one :class:`StageContext` per stage and passes it in; there is no module-level
state. The Hydra config is read here, once, at the edge (:func:`run_settings`, :func:`fingerprints`,
:func:`workspace`, :func:`open_tracker`): stages read their typed settings (``ctx.settings``,
:mod:`mixprec.settings`) and the typed run settings (``ctx.run``: model spec, quantization recipe,
prompt sets, device, seed), and everything they call takes plain arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mixprec import calibration
from mixprec.artifacts import QUANT_PARAMS
from mixprec.generation import Sampler
from mixprec.lora import check_calibrated_adapters
from mixprec.models import ModelSpec, _matches, census, check_model_files, denoiser_of, latent_size, load_pipeline, \
    measure_act_elems, resolve_device, text_length, text_starts_with_bos
from mixprec.prompts import resolve_prompt_set
from mixprec.quantizers import QuantLayer, quantize_
from mixprec.recipe import QuantRecipe
from mixprec.settings import StageSettings
from mixprec.tracking import Tracker, start_run
from mixprec.workspace import Workspace, check_safetensors, fingerprint



def to_dict(node: Any) -> Any:
    """A plain Python value of a config node (anything else as it is)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_spec(cfg: DictConfig) -> ModelSpec:
    return ModelSpec.from_dict(to_dict(cfg.model))


def quant_recipe(cfg: DictConfig) -> QuantRecipe:
    """The ``quant`` config as a checked :class:`~mixprec.recipe.QuantRecipe` (timestep groups checked
    against the model's sampler steps)."""
    return QuantRecipe.from_dict(to_dict(cfg.quant), num_inference_steps=int(cfg.model.num_inference_steps))


@dataclass(frozen=True)
class RunSettings:
    """What every stage may use besides its own settings, typed: the model, the quantization recipe,
    the prompt sets, the device and the global seed (the config groups ``model``, ``quant``,
    ``prompts`` and the keys ``device``, ``seed``). Built by the runner (:func:`run_settings`) or by
    hand in a notebook."""

    model: ModelSpec
    quant: QuantRecipe
    prompts: Mapping[str, Any] = field(default_factory=dict)  # prompt-set configs by name (mixprec.prompts)
    device: str = "auto"
    seed: int = 0
    # the model config as given, recorded beside calibrations and checkpoints
    model_config: Mapping[str, Any] = field(default_factory=dict)

    def prompt_set(self, name: str) -> list[tuple[str, int]]:
        """The (prompt, seed) pairs of one prompt set (``prompts.<name>``)."""
        if name not in self.prompts:
            raise KeyError(f"the prompts config {self.prompts.get('name')!r} has no {name!r} set")
        return resolve_prompt_set(self.prompts[name], name)


def run_settings(cfg: DictConfig | RunSettings) -> RunSettings:
    """The typed :class:`RunSettings` of a composed config (a RunSettings is returned as it is)."""
    if isinstance(cfg, RunSettings):
        return cfg
    model = to_dict(cfg.model)
    return RunSettings(model=ModelSpec.from_dict(model), quant=quant_recipe(cfg), prompts=to_dict(cfg.prompts),
                       device=str(cfg.device), seed=int(cfg.seed), model_config=model)


def _device_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def fingerprints(cfg: DictConfig) -> dict[str, str]:
    spec = model_spec(cfg)
    q = quant_recipe(cfg)
    model_fp = fingerprint(spec.fingerprint_data(device_type=_device_type(str(cfg.device))))
    calib = resolve_prompt_set(to_dict(cfg.prompts.calibration), "calibration")
    recipe = q.identity()
    sampling = {k: v for k, v in (("guidance_scale", spec.guidance_scale), ("scheduler", spec.scheduler)) if v}
    quant_fp = fingerprint({"model": model_fp, "quant": recipe,
                            "calibration": calib, "steps": spec.num_inference_steps,
                            "resolution": spec.resolution, "exclude": spec.exclude_patterns, **sampling})
    return {"model": model_fp, "quant": quant_fp}


def workspace(cfg: DictConfig) -> Workspace:
    """The stage's workspace, after the cheap checks that would otherwise fail after minutes of work:
    a readable model folder and a workspace this process can write."""
    check_model_files(model_spec(cfg))
    return Workspace(cfg.paths.workspace, fingerprints=fingerprints(cfg)).check_writable()


@contextlib.contextmanager
def open_tracker(cfg: DictConfig, ws: Workspace, job_type: str,
                 extra_config: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """One W&B run (or a disabled tracker), finished (marked failed when the block raises) on exit."""
    t = cfg.tracking
    run = start_run(
        t.mode, project=t.project, entity=t.entity, group=t.group or ws.root.name, job_type=job_type,
        config={**to_dict(cfg), **(extra_config or {})}, directory=t.dir,
        tags=[str(cfg.model.name)], quiet=bool(t.get("quiet", True)),
    )
    with run:
        yield run


@dataclass
class StageContext:
    """What the runner hands every stage: its typed settings (:mod:`mixprec.settings`: ``stage.*``
    checked for unknown keys and types), the typed run settings, the workspace the stage reads and
    writes and the stage's tracker (one W&B run per stage). ``cfg`` is the composed config the
    runner records (the pipeline stage, which builds sub-stage configs for the runner, reads it); every
    other stage reads ``settings`` and ``run``."""

    settings: StageSettings
    run: RunSettings
    workspace: Workspace
    tracker: Tracker
    cfg: DictConfig | None = None


@dataclass
class ModelBundle:
    """A loaded pipeline with its denoiser's quantizable layers wrapped, and a sampler."""

    spec: ModelSpec
    pipe: Any
    layers: dict[str, QuantLayer]
    sampler: Sampler
    device: torch.device
    quant: QuantRecipe
    calib_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self):
        return denoiser_of(self.pipe)

    def census(self, protected: set[str] | None = None) -> list:
        denoiser = self.denoiser
        acts = measure_act_elems(denoiser, latent_size(self.pipe, self.spec.resolution), text_length(self.pipe))
        rows = census(denoiser, self.spec.content_patterns, self.spec.exclude_patterns, acts)
        for r in rows:
            r.excluded = r.name not in self.layers
            r.protected = bool(protected and r.name in protected)
        return rows


def load_model(run: RunSettings | DictConfig, batch_size: int | None = None) -> ModelBundle:
    """The run's pipeline with its denoiser's quantizable layers wrapped (not calibrated)."""
    run = run_settings(run)
    spec, q = run.model, run.quant
    device = resolve_device(run.device)
    pipe = load_pipeline(spec, device=device)
    torch.manual_seed(run.seed)
    excl = spec.exclude_patterns
    # A T5 prompt has no BOS token, so there is no outlier token to keep out of the K/V ranges.
    skip_bos = q.skip_bos and text_starts_with_bos(pipe)
    layers = quantize_(denoiser_of(pipe), (lambda n, m: not _matches(n, excl)) if excl else None, skip_bos=skip_bos)
    sampler = Sampler(pipe, spec.resolution, spec.num_inference_steps, spec.guidance_scale,
                      batch_size=batch_size or 8)
    return ModelBundle(spec, pipe, layers, sampler, device, q)


@dataclass
class Calibration:
    """The workspace's calibration file, read and checked against this run (no model needed)."""

    path: Any
    params: dict[str, Any]
    meta: dict[str, Any]

    @property
    def layer_names(self) -> list[str]:
        return list(self.params)


def read_calibration(run: RunSettings | DictConfig, ws: Workspace) -> Calibration:
    run = run_settings(run)
    path = check_safetensors(ws.require(QUANT_PARAMS, "calibrate"), "`python run.py stage=calibrate`")
    params, meta = calibration.load_params(path)
    # Before the fingerprints: a grouping mismatch also changes them, and this says what to do.
    calibration.check_timestep_groups(meta, run.quant.act_timestep_groups, path)
    calibration.check_weight_recipe(meta, run.quant.rounding, run.quant.weight_group_sizes, asdict(run.quant.gptq), path)
    check_calibrated_adapters((meta.get("model") or {}).get("lora"), run.model.lora, QUANT_PARAMS)
    ws.check_fingerprints(meta.get("fingerprints"), QUANT_PARAMS, "calibrate")
    return Calibration(path, params, meta)


def load_calibrated(run: RunSettings | DictConfig, ws: Workspace, batch_size: int | None = None,
                    calib: Calibration | None = None) -> ModelBundle:
    """The model with the workspace's calibration attached (checked against this run's fingerprints)."""
    run = run_settings(run)
    calib = calib or read_calibration(run, ws)
    path, params, meta = calib.path, calib.params, calib.meta
    bundle = load_model(run, batch_size)
    q = bundle.quant
    calibration.check_bits_available(meta, q.weight_bits, q.act_bits, path)
    step_groups = calibration.step_groups_from_meta(meta)
    if step_groups is not None:
        step_groups.install(bundle.denoiser, bundle.layers.values())
    calibration.attach_params(bundle.layers, params, step_groups=step_groups)
    bundle.calib_meta = meta
    return bundle


def load_for_kernels(run: RunSettings, ws: Workspace, latent: int, calibration_source: str,
                     dtype_name: str | None) -> tuple[ModelBundle, torch.dtype]:
    """The model in ``dtype_name`` (None: as loaded), calibrated from the workspace
    (``calibration_source="workspace"``) or with observers on random denoiser inputs at ``latent`` size
    (``"random"``): what the stages that run real kernels (benchmark, latency_table) start from."""
    from mixprec.kernels.probing import cast_floating_, denoiser_inputs

    if calibration_source == "workspace":
        bundle = load_calibrated(run, ws)
    elif calibration_source == "random":
        bundle = load_model(run)
    else:
        raise ValueError(f"stage.calibration must be 'workspace' or 'random', got {calibration_source!r}")
    denoiser = bundle.denoiser
    dtype = getattr(torch, dtype_name) if dtype_name else next(denoiser.parameters()).dtype
    if next(denoiser.parameters()).dtype != dtype:
        # every component, so the end-to-end pipeline stays in one dtype
        for comp in bundle.pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                cast_floating_(comp, dtype)
    if calibration_source == "random":
        text_len = text_length(bundle.pipe)
        calib = [denoiser_inputs(denoiser, 1, latent, text_len, seed=100 + i, device=bundle.device, dtype=dtype)
                 for i in range(2)]
        q = bundle.quant
        calibration.calibrate_layers(bundle.layers, lambda: [denoiser(**c) for c in calib], q.weight_bits,
                                     q.act_bits, momentum=q.act_momentum, weight_clip=q.weight_clip,
                                     group_sizes=q.weight_group_sizes, rounding=q.rounding,
                                     gptq_damp=q.gptq.damp, gptq_block=q.gptq.block_size,
                                     gptq_max_columns=q.gptq.max_columns)
    return bundle, dtype


def prompt_set(run: RunSettings | DictConfig, name: str) -> list[tuple[str, int]]:
    return run_settings(run).prompt_set(name)
