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

The package is split by concern: :mod:`.spec` (what a model is), :mod:`.loading` (building or
loading a pipeline), :mod:`.schedulers`, :mod:`.denoiser` (the denoiser inside a pipeline and its
inputs), :mod:`.census` (its quantizable layers), :mod:`.random_builders` (full-size random
architectures) and :mod:`.toy` (every toy-scale builder). Everything is importable from here.
"""

from __future__ import annotations

from .spec import (  # noqa: F401
    REFERENCE_DIR, ASSETS_DIR, BUILTIN_MODELS, SOURCES, ModelSpec, _DTYPES, _folder_digest, resolve_device,
)
from .denoiser import (  # noqa: F401
    DENOISER_ATTRIBUTES, denoiser_of, replace_denoiser, is_transformer, latent_input_name, text_starts_with_bos,
    denoiser_example_inputs, measure_act_elems, latent_size, PIXART_MAX_SEQUENCE_LENGTH, text_length,
)
from .schedulers import (  # noqa: F401
    scheduler_class, scheduler_overrides, configured_scheduler, make_scheduler,
)
from .loading import (  # noqa: F401
    check_model_files, load_pipeline,
)
from .random_builders import (  # noqa: F401
    build_random_pipeline, _family_configs, build_random_denoiser, family_text_length,
)
from .toy import (  # noqa: F401
    TINY_SD_FAMILIES, TINY_SD_ARCH, build_tiny_sd_pipeline, build_tiny_pixart_pipeline, TINY_ARCH, MICRO_ARCH,
    build_tiny_sdxl_pipeline, TINY_UNET, build_unet, build_toy_pipeline,
)
from .census import (  # noqa: F401
    LayerInfo, CENSUS_COLUMNS, _matches, layer_group, block_of, census,
)
