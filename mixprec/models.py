"""Loading text-to-image pipelines and taking the census of their quantizable layers.

A model is described by a :class:`ModelSpec` (the ``model`` config group). Sources:
- ``builtin``: the project's trained tiny model shipped in ``mixprec/assets/tiny`` (or ``path``);
- ``tiny_random``: a pipeline of the ``family``'s structure with a small config and random
  weights (tests): SDXL (``sdxl``), SD 2.1 / SD-Turbo (``sd``), SD 1.5 / LCM (``sd15``) or
  PixArt-alpha (``pixart``);
- ``diffusers``: a hub id or a local folder through ``DiffusionPipeline.from_pretrained``; with
  ``weights: random`` the full-size architecture is built from configs shipped in
  ``mixprec/reference`` instead (speed and memory work where no checkpoint can be downloaded).
Nothing is fetched from a hub unless the spec names a hub id and the user did not set
``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mixprec.workspace import safetensors_problem

REFERENCE_DIR = Path(__file__).parent / "reference"
ASSETS_DIR = Path(__file__).parent / "assets"
SOURCES = ("builtin", "tiny_random", "diffusers")


@dataclass
class ModelSpec:
    name: str
    source: str = "diffusers"
    hub_id: str | None = None
    path: str | None = None
    weights: str = "pretrained"  # or "random"
    family: str = "sdxl"  # which shipped configs build the random-weight architecture
    arch: dict[str, Any] = field(default_factory=dict)  # tiny_random architecture
    seed: int = 0  # random-weight init seed
    dtype: str = "float32"
    resolution: int = 512
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    content_patterns: list[str] = field(default_factory=lambda: ["attn2", "ff"])
    exclude_patterns: list[str] = field(default_factory=list)
    # A deterministic content checker for caption adherence ("tiny_shapes" for the built-in model).
    checker: str | None = None
    # Scheduler overrides applied after the pipeline is built or loaded: ``class`` swaps the
    # scheduler class (a diffusers scheduler name), every other key overrides its config, e.g.
    # {class: EulerDiscreteScheduler, timestep_spacing: leading}. Empty: the pipeline's own.
    scheduler: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model.source must be one of {SOURCES}, got {self.source!r}")
        if self.weights not in ("pretrained", "random"):
            raise ValueError(f"model.weights must be 'pretrained' or 'random', got {self.weights!r}")
        if self.source == "diffusers" and self.weights == "pretrained" and not (self.path or self.hub_id):
            raise ValueError(f"model {self.name!r} needs model.path (a local folder) or model.hub_id")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"model.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.scheduler:
            scheduler_overrides(self.scheduler)  # raises on an unknown class or option

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def fingerprint_data(self, device_type: str | None = None) -> dict[str, Any]:
        """What identifies the model's weights (not how it is sampled).

        Full-size random weights are drawn on the device the run uses (``device_type``), and the same
        seed gives other weights on CPU than on CUDA: the device is part of their identity.
        """
        data = {k: v for k, v in asdict(self).items()
                if k in ("name", "source", "hub_id", "path", "weights", "family", "arch", "seed")}
        if self.source == "diffusers" and self.weights == "random" and device_type is not None:
            data["random_weights_drawn_on"] = device_type
        if self.source == "builtin":
            data["weights_digest"] = _folder_digest(self.resolved_path())
        return data

    def resolved_path(self) -> Path | None:
        if self.source == "builtin":
            return Path(self.path) if self.path else ASSETS_DIR / "tiny"
        return Path(self.path) if self.path else None


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _folder_digest(folder: Path | None) -> str | None:
    """Cheap identity of a saved pipeline: names and sizes of its weight files."""
    if folder is None or not folder.exists():
        return None
    files = sorted(p for p in folder.rglob("*.safetensors"))
    return ";".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in files)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but CUDA is not available; use device=cpu or auto")
    return torch.device(device)


# --------------------------------------------------------------------------- denoiser
DENOISER_ATTRIBUTES = ("unet", "transformer")


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` (SD, SDXL) or ``pipe.transformer`` (PixArt)."""
    attr = _denoiser_attribute(pipe)
    return getattr(pipe, attr)


def replace_denoiser(pipe, module: nn.Module) -> nn.Module:
    """Put ``module`` in the denoiser's place (``pipe.unet`` or ``pipe.transformer``); returns the one it replaced."""
    attr = _denoiser_attribute(pipe)
    previous = getattr(pipe, attr)
    setattr(pipe, attr, module)
    return previous


def _denoiser_attribute(pipe) -> str:
    for attr in DENOISER_ATTRIBUTES:
        if getattr(pipe, attr, None) is not None:
            return attr
    raise TypeError(f"{type(pipe).__name__} has no denoiser (neither 'unet' nor 'transformer'); mixprec needs a "
                    f"text-to-image diffusion pipeline with a UNet or a diffusion transformer")


def is_transformer(denoiser: nn.Module) -> bool:
    """A patch-based diffusion transformer (PixArt): latents go in as ``hidden_states``, not ``sample``."""
    return "hidden_states" in _forward_parameters(denoiser) and "sample" not in _forward_parameters(denoiser)


def latent_input_name(denoiser: nn.Module) -> str:
    return "hidden_states" if is_transformer(denoiser) else "sample"


def _forward_parameters(denoiser: nn.Module) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(type(denoiser).forward).parameters)


def text_starts_with_bos(pipe) -> bool:
    """Whether prompts are encoded with a leading BOS token (CLIP: yes; T5: no).

    Cross-attention K/V keep that token in full precision (``quant.skip_bos``) because CLIP's BOS
    state is a huge, prompt-independent outlier; without a BOS the first token is an ordinary word.
    """
    tok = getattr(pipe, "tokenizer", None)
    if tok is None or tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tok.bos_token_id


# --------------------------------------------------------------------------- loading
def load_pipeline(spec: ModelSpec, device: str | torch.device = "cpu"):
    """Build or load the pipeline described by ``spec`` and move it to ``device``."""
    from diffusers import DiffusionPipeline

    if spec.source == "tiny_random":
        if spec.family in TINY_SD_FAMILIES:
            pipe = build_tiny_sd_pipeline(spec.arch, seed=spec.seed, family=spec.family)
        elif spec.family == "pixart":
            pipe = build_tiny_pixart_pipeline(spec.arch, seed=spec.seed)
        else:
            from mixprec.tiny.build import build_pipeline

            pipe = build_pipeline(spec.arch, seed=spec.seed)
    elif spec.source == "builtin":
        folder = spec.resolved_path()
        _check_pipeline_folder(folder, spec.name)
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=spec.torch_dtype, local_files_only=True)
        _check_tokenizers(pipe, folder)
    elif spec.weights == "random":
        # Initialising billions of parameters is single-threaded on CPU (minutes for PixArt's T5-XXL):
        # build where it will run.
        pipe = build_random_pipeline(spec.family, seed=spec.seed, device=device)
    else:
        pipe = _load_diffusers(spec)
    try:
        denoiser = denoiser_of(pipe)
    except TypeError as exc:
        raise TypeError(f"model {spec.name!r}: {exc}") from None
    if spec.scheduler:
        pipe.scheduler = configured_scheduler(pipe.scheduler, spec.scheduler)
    if denoiser.dtype != spec.torch_dtype:
        pipe = pipe.to(dtype=spec.torch_dtype)
    pipe = pipe.to(torch.device(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_diffusers(spec: ModelSpec):
    from diffusers import DiffusionPipeline

    if spec.path:
        folder = Path(spec.path)
        _check_pipeline_folder(folder, spec.name)
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=spec.torch_dtype, local_files_only=True)
        _check_tokenizers(pipe, folder)
        return pipe
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return DiffusionPipeline.from_pretrained(spec.hub_id, torch_dtype=spec.torch_dtype, local_files_only=offline)
    except Exception as exc:  # the hub client's errors are many; the advice is the same
        raise RuntimeError(
            f"could not load {spec.hub_id!r} from the hub{' (HF_HUB_OFFLINE is set, so only the local cache was tried)' if offline else ''}: "
            f"{exc}. Download it elsewhere and pass model.path=<folder>, or use model.weights=random for "
            f"speed/memory work."
        ) from exc


def _check_pipeline_folder(folder: Path | None, name: str) -> None:
    if folder is None or not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"model {name!r}: {folder} is not a diffusers pipeline folder (no model_index.json). "
            + ("The built-in tiny model is trained by `python run.py stage=train_tiny`." if name == "tiny" else
               "Pass model.path=<folder saved with save_pretrained>.")
        )


def check_model_files(spec: "ModelSpec") -> None:
    """A local model folder that cannot load: say which file and why before any stage starts work."""
    local = spec.source == "builtin" or (spec.source != "tiny_random" and spec.path and spec.weights != "random")
    if not local:
        return
    folder = spec.resolved_path()
    _check_pipeline_folder(folder, spec.name)
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model {spec.name!r}: {index} is not valid JSON ({exc}); the folder is damaged: save the "
                         f"pipeline again with save_pretrained, or point model.path at a complete copy") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ValueError(f"model {spec.name!r}: {index} is not a diffusers model index (no _class_name); point "
                         f"model.path at a folder written by save_pretrained")
    fix = ("`python run.py stage=train_tiny` writes the built-in model again" if spec.source == "builtin" else
           "save the pipeline again with save_pretrained, or point model.path at a complete copy")
    for weights in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ValueError(f"model {spec.name!r}: the weights {weights} are unreadable: {problem}. {fix}.")


def _check_tokenizers(pipe, folder: Path) -> None:
    """A tokenizer folder that is missing or empty can load as a tokenizer that maps everything to UNK."""
    for attr in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, attr, None)
        if tok is None:
            continue
        ids = tok("a red circle", add_special_tokens=False).input_ids
        if len(tok) < 10 or not ids or all(i == tok.unk_token_id for i in ids):
            raise ValueError(f"{folder}/{attr} did not load a working tokenizer (vocabulary of {len(tok)}, "
                             f"'a red circle' -> {ids}); the folder is incomplete")


def scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") or n.endswith("SchedulerMultistep"))
        raise ValueError(f"model.scheduler.class={name!r} is not a diffusers scheduler; known: {', '.join(known)}")
    return cls


def _check_scheduler_options(cls: type, options: dict[str, Any]) -> None:
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - accepted)
    if unknown:  # from_config would drop them silently
        raise ValueError(f"model.scheduler options {unknown} are not options of {cls.__name__}; "
                         f"it takes {sorted(accepted)}")


def scheduler_overrides(overrides: dict[str, Any]) -> tuple[type | None, dict[str, Any]]:
    """(class or None, config overrides) of a ``model.scheduler`` mapping, checked against the class."""
    rest = dict(overrides)
    name = rest.pop("class", None)
    cls = scheduler_class(name) if name is not None else None
    if cls is not None:
        _check_scheduler_options(cls, rest)
    return cls, rest


def configured_scheduler(current, overrides: dict[str, Any]):
    """``current`` with ``overrides`` (see ModelSpec.scheduler) applied; a new scheduler object."""
    cls, rest = scheduler_overrides(overrides)
    cls = cls or type(current)
    _check_scheduler_options(cls, rest)
    return cls.from_config({**dict(current.config), **rest})


def make_scheduler(config: dict[str, Any]):
    """A scheduler from a shipped config (``_class_name`` picks the class)."""
    config = dict(config)
    return scheduler_class(config.pop("_class_name", "EulerDiscreteScheduler")).from_config(config)


def build_random_pipeline(family: str, seed: int = 0, device: str | torch.device = "cpu"):
    """The full-size architecture of ``family`` with random weights, from configs shipped in the package.

    Random weights are meaningless for image quality but exact for layer census, speed and memory.
    The tokenizer is the tiny model's (real CLIP and T5 vocabularies cannot be shipped); prompts of
    its vocabulary work, and the text encoders keep the full-size architecture.
    """
    cfg = _family_configs(family)
    if "transformer" in cfg:
        return _build_random_pixart_pipeline(cfg, seed, device)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mixprec.tiny.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])) if "text_encoder_2" in cfg else None
    tok = build_tokenizer(model_max_length=77)
    scheduler = make_scheduler(cfg["scheduler"])
    if te2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _build_random_pixart_pipeline(cfg: dict[str, Any], seed: int, device: str | torch.device):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from mixprec.tiny.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = PixArtTransformer2DModel.from_config(cfg["transformer"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = T5EncoderModel(T5Config(**cfg["text_encoder"]))
    tok = build_tokenizer(model_max_length=cfg.get("max_sequence_length", 120))
    scheduler = DPMSolverMultistepScheduler.from_config(cfg["scheduler"])
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


# Tiny StableDiffusionPipeline structures: SD 2.1 / SD-Turbo (linear projections, 2 heads) and
# SD 1.5 (1x1-conv projections in the transformer blocks, as LCM-distilled SD 1.5 has).
TINY_SD_FAMILIES: dict[str, dict[str, Any]] = {
    "sd": {"use_linear_projection": True},
    "sd15": {"use_linear_projection": False},
}
TINY_SD_ARCH: dict[str, Any] = {
    "image_size": 32, "channels": [8, 16], "text_hidden": 16, "heads": 2,
    # A guidance-embedding input (LCM) of this width; null: none.
    "time_cond_proj_dim": None,
}


def build_tiny_sd_pipeline(arch: dict[str, Any] | None = None, seed: int = 0, family: str = "sd"):
    """A StableDiffusionPipeline of ``family``'s structure at toy scale with random weights (tests).

    Same block types as SD (cross-attention in every level but the last, one text encoder whose
    last hidden state conditions the UNet, no added conditioning). ``sd``: SD 2.1 / SD-Turbo
    (linear projections); ``sd15``: SD 1.5 (1x1-conv projections); ``arch.time_cond_proj_dim``
    adds LCM's guidance embedding. The scheduler is Euler (trailing); ``model.scheduler`` swaps it.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mixprec.tiny.tokenizer import build_tokenizer

    if family not in TINY_SD_FAMILIES:
        raise ValueError(f"no tiny StableDiffusionPipeline structure for family {family!r}; known: "
                         f"{sorted(TINY_SD_FAMILIES)}")
    unknown = set(arch or {}) - set(TINY_SD_ARCH) - set(TINY_SD_FAMILIES[family])
    if unknown:
        raise ValueError(f"unknown model.arch option(s) {sorted(unknown)} for a tiny {family} model; "
                         f"known: {sorted(set(TINY_SD_ARCH) | set(TINY_SD_FAMILIES[family]))}")
    a = {**TINY_SD_ARCH, **TINY_SD_FAMILIES[family], **(arch or {})}
    tok = build_tokenizer()
    levels = len(a["channels"])
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=a["text_hidden"], intermediate_size=2 * a["text_hidden"],
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=a["image_size"] // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=tuple(a["channels"]),
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=a["heads"], norm_num_groups=4, cross_attention_dim=a["text_hidden"],
            use_linear_projection=bool(a["use_linear_projection"]), time_cond_proj_dim=a["time_cond_proj_dim"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=a["image_size"])
    finally:
        torch.random.set_rng_state(state)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="trailing")
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_pixart_pipeline(arch: dict[str, Any] | None = None, seed: int = 0):
    """A PixArt-alpha-structured PixArtAlphaPipeline at toy scale with random weights (tests).

    Same module types and names as PixArt-alpha: patch-embedding conv, ``adaln_single`` timestep
    modulation, ``caption_projection`` of T5 states, transformer blocks with self-attention
    (``attn1``), cross-attention (``attn2``) and a GELU feed-forward (``ff``), learned-sigma output
    (twice the latent channels), a T5 encoder and DPM-Solver++.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from mixprec.tiny.tokenizer import build_tokenizer

    a = {"image_size": 64, "layers": 2, "heads": 2, "head_dim": 8, "text_hidden": 16, "text_layers": 2, **(arch or {})}
    if a["image_size"] % 16:
        raise ValueError(f"tiny PixArt image_size must be a multiple of 16 (VAE factor 8 x patch 2), got {a['image_size']}")
    tok = build_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tok), d_model=a["text_hidden"], d_ff=2 * a["text_hidden"], d_kv=a["text_hidden"] // 2,
            num_layers=a["text_layers"], num_heads=2, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        transformer = PixArtTransformer2DModel(
            num_attention_heads=a["heads"], attention_head_dim=a["head_dim"], in_channels=4, out_channels=8,
            num_layers=a["layers"], cross_attention_dim=a["heads"] * a["head_dim"],
            sample_size=a["image_size"] // 8, patch_size=2, caption_channels=a["text_hidden"],
            use_additional_conditions=False)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=a["image_size"])
    finally:
        torch.random.set_rng_state(state)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def _family_configs(family: str) -> dict[str, dict[str, Any]]:
    path = REFERENCE_DIR / f"{family}_configs.json"
    if not path.exists():
        known = sorted(p.name[: -len("_configs.json")] for p in REFERENCE_DIR.glob("*_configs.json"))
        raise ValueError(f"no shipped configs for model family {family!r}; known: {known}")
    configs = json.loads(path.read_text())
    if "unet_file" in configs:
        configs["unet"] = json.loads((REFERENCE_DIR / configs.pop("unet_file")).read_text())
    return configs


def build_random_denoiser(family: str, device: str | torch.device = "meta") -> nn.Module:
    """Only the denoiser of ``family`` (UNet or transformer); on the meta device it costs no memory (census)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    cfg = _family_configs(family)
    with torch.device(device):
        if "transformer" in cfg:
            return PixArtTransformer2DModel.from_config(cfg["transformer"])
        return UNet2DConditionModel.from_config(cfg["unet"])


def family_text_length(family: str) -> int:
    """Tokens of the text encoder's output the denoiser attends to (CLIP: 77; PixArt-alpha's T5: 120)."""
    return int(_family_configs(family).get("max_sequence_length", 77))


# --------------------------------------------------------------------------- census
@dataclass
class LayerInfo:
    name: str
    type: str  # "Linear" | "Conv2d"
    group: str  # "content" | "quality"
    params: int
    out_channels: int
    in_features: int
    kernel: str  # "1x1", "3x3" or "" for Linear
    act_elems: int  # input-activation elements per image (0 when not measured)
    block: str  # coarse position: down_blocks.1, mid_block, up_blocks.0, conv_in, transformer_blocks.3, ...
    excluded: bool = False
    protected: bool = False

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


CENSUS_COLUMNS = list(LayerInfo.__dataclass_fields__)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a whole dotted component (``ff`` matches ``...ff.net.2`` but not ``buff``),
    or, when it contains a dot or regex characters, is searched as a regular expression."""
    parts = name.split(".")
    for pat in patterns:
        if re.fullmatch(r"[A-Za-z0-9_]+", pat):
            if pat in parts:
                return True
        elif re.search(pat, name):
            return True
    return False


def layer_group(name: str, content_patterns: Sequence[str]) -> str:
    return "content" if _matches(name, content_patterns) else "quality"


def block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks", "transformer_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def census(denoiser: nn.Module, content_patterns: Sequence[str], exclude_patterns: Sequence[str] = (),
           act_elems: dict[str, int] | None = None) -> list[LayerInfo]:
    """Every Linear/Conv2d of the denoiser (QuantLayer wrappers are looked through), in module order."""
    from mixprec.quantizers import QuantLayer

    rows: list[LayerInfo] = []
    for name, module in denoiser.named_modules():
        if isinstance(module, QuantLayer):
            name, module = module.name, module.inner
        elif not isinstance(module, (nn.Linear, nn.Conv2d)) or name.endswith(".inner"):
            continue
        is_conv = isinstance(module, nn.Conv2d)
        rows.append(LayerInfo(
            name=name,
            type="Conv2d" if is_conv else "Linear",
            group=layer_group(name, content_patterns),
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            out_channels=module.out_channels if is_conv else module.out_features,
            in_features=(module.in_channels * module.kernel_size[0] * module.kernel_size[1]) if is_conv else module.in_features,
            kernel=f"{module.kernel_size[0]}x{module.kernel_size[1]}" if is_conv else "",
            act_elems=int((act_elems or {}).get(name, 0)),
            block=block_of(name),
            excluded=_matches(name, exclude_patterns) if exclude_patterns else False,
        ))
    return rows


def denoiser_example_inputs(denoiser: nn.Module, batch: int, latent_size: int, text_len: int = 77,
                            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            generator: torch.Generator | None = None) -> dict[str, Any]:
    """Keyword inputs of the right shapes for one denoiser call, as its pipeline passes them.

    UNets get SD or SDXL conditioning; PixArt transformers get a per-sample timestep, the
    resolution / aspect-ratio micro-conditions when the model uses them (1024 px models), and an
    all-ones text mask (the pipeline always passes one, and a mask can change which attention
    kernel runs). Zeros, or standard normal values drawn from ``generator`` (timestep 999 either way).
    """
    cfg = denoiser.config

    def values(*shape):
        if generator is None:
            return torch.zeros(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator).to(device, dtype)

    pixels = latent_size * 8
    text_dim = cfg.caption_channels if is_transformer(denoiser) else cfg.cross_attention_dim
    kwargs: dict[str, Any] = {
        latent_input_name(denoiser): values(batch, cfg.in_channels, latent_size, latent_size),
        "encoder_hidden_states": values(batch, text_len, text_dim),
    }
    if is_transformer(denoiser):
        kwargs["timestep"] = torch.full((batch,), 999, device=device, dtype=torch.long)
        kwargs["encoder_attention_mask"] = torch.ones(batch, text_len, device=device, dtype=torch.long)
        if getattr(denoiser, "use_additional_conditions", False):
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.tensor([[pixels, pixels]] * batch, device=device, dtype=dtype),
                "aspect_ratio": torch.ones(batch, 1, device=device, dtype=dtype),
            }
        else:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kwargs
    kwargs["timestep"] = torch.tensor(999, device=device)
    if cfg.addition_embed_type == "text_time":
        n_time = 6
        pooled_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": values(batch, pooled_dim),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=dtype),
        }
    if getattr(cfg, "time_cond_proj_dim", None):
        # LCM's guidance embedding: without it the denoiser skips its cond_proj layer.
        kwargs["timestep_cond"] = values(batch, cfg.time_cond_proj_dim)
    return kwargs


def measure_act_elems(denoiser: nn.Module, latent_size: int, text_len: int = 77) -> dict[str, int]:
    """Input-activation elements per image of every Linear/Conv2d, from one forward of batch 1.

    Works on the meta device (shapes only), so full-size models cost no memory or time.
    """
    from mixprec.quantizers import QuantLayer

    device = next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    sizes: dict[str, int] = {}
    hooks = []
    for name, module in denoiser.named_modules():
        if isinstance(module, QuantLayer):
            key, target = module.name, module
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not name.endswith(".inner"):
            key, target = name, module
        else:
            continue

        def hook(_m, args, _key=key):
            sizes[_key] = sizes.get(_key, 0) + int(args[0].numel())
        hooks.append(target.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            denoiser(**denoiser_example_inputs(denoiser, 1, latent_size, text_len, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def latent_size(pipe, resolution: int) -> int:
    return resolution // pipe.vae_scale_factor


# PixArt pipelines pad prompts to a fixed length that is a pipeline argument, not a tokenizer property.
PIXART_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def text_length(pipe) -> int:
    """Text tokens the denoiser's cross-attention sees per prompt."""
    if type(pipe).__name__ in PIXART_MAX_SEQUENCE_LENGTH:
        return PIXART_MAX_SEQUENCE_LENGTH[type(pipe).__name__]
    tok = getattr(pipe, "tokenizer", None)
    return int(tok.model_max_length) if tok is not None else 77
