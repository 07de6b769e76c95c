"""Deterministic generation through the pipeline's standard ``__call__``.

Prompts are encoded once and cached; initial latents come from one CPU generator per seed, so an
image depends only on (prompt, seed), not on batch composition or device; samplers that add noise
between steps (LCM) draw it from the same per-seed generator. The denoiser's outputs at every
sampler step can be captured (quality metric: SQNR of the denoiser output); with classifier-free
guidance the captured output is the guided prediction the scheduler steps with.

The denoiser is a UNet (SD, SDXL) or a diffusion transformer (PixArt), called through the same
pipeline ``__call__``. PixArt predicts a learned variance next to the noise (twice the latent
channels); its pipeline drops the variance after the call, so the captured output keeps only the
noise channels the sampler uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixprec.models import PIXART_MAX_SEQUENCE_LENGTH, denoiser_of


@dataclass
class GenerationOutput:
    images: torch.Tensor | None  # [N, 3, H, W] in [0, 1], float32
    denoiser: torch.Tensor | None  # [N, steps, C, h, w]: the (guided) denoiser output (noise channels) at each step
    latents: torch.Tensor | None  # [N, C, h, w]: final latents


class Sampler:
    """Runs a text-to-image pipeline on fixed prompts and seeds."""

    def __init__(self, pipe, resolution: int, num_inference_steps: int, guidance_scale: float = 0.0,
                 batch_size: int = 8):
        self.pipe = pipe
        self.resolution = resolution
        self.steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.batch_size = max(1, int(batch_size))
        self.is_xl = hasattr(pipe, "text_encoder_2")
        self.max_sequence_length = PIXART_MAX_SEQUENCE_LENGTH.get(type(pipe).__name__)
        self.is_pixart = self.max_sequence_length is not None
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        # Per batch of seeds: the initial latents on the device and each generator's state after drawing them.
        self._latents: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        # One-step replay (denoiser_outputs): the key it was captured for and the denoiser calls.
        self._replay: tuple[tuple, list[tuple[tuple, dict]]] | None = None

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the pipeline doubles the batch for guidance: as diffusers decides it, so guidance-
        distilled denoisers (LCM: ``time_cond_proj_dim``) take the scale as an embedding instead."""
        return self.guidance_scale > 1.0 and getattr(self.denoiser.config, "time_cond_proj_dim", None) is None

    def timesteps(self) -> list[float]:
        """The scheduler's timesteps for this sampler's step count, in sampling order."""
        import copy

        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(self.steps, device="cpu")
        return [float(t) for t in scheduler.timesteps]

    def optimize_decoder(self, channels_last: bool = True, compile: bool = False) -> None:
        """Speed up the VAE decode, which dominates a content-layer evaluation on large models.

        channels_last lets cuDNN pick NHWC convolution kernels; compile fuses the decoder's
        normalisations and activations (a one-time cost of about a minute for SDXL's VAE).
        """
        vae = self.pipe.vae
        if channels_last:
            vae.to(memory_format=torch.channels_last)
        if compile:
            vae.decoder = torch.compile(vae.decoder, dynamic=False)

    @property
    def denoiser(self):
        return denoiser_of(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def _encode_one(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt not in self._cache:
            with torch.no_grad():
                cfg = self.classifier_free_guidance
                if self.is_pixart:
                    pe, pam, npe, npam = self.pipe.encode_prompt(
                        prompt, do_classifier_free_guidance=cfg, num_images_per_prompt=1, device=self.device,
                        clean_caption=False, max_sequence_length=self.max_sequence_length)
                    enc = {"prompt_embeds": pe, "prompt_attention_mask": pam}
                    if cfg:
                        enc.update(negative_prompt_embeds=npe, negative_prompt_attention_mask=npam)
                elif self.is_xl:
                    pe, npe, ppe, nppe = self.pipe.encode_prompt(prompt, device=self.device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=cfg)
                    enc = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
                    if cfg:
                        enc.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
                else:
                    pe, npe = self.pipe.encode_prompt(prompt, self.device, 1, cfg)
                    enc = {"prompt_embeds": pe}
                    if cfg:
                        enc["negative_prompt_embeds"] = npe
            self._cache[prompt] = enc
        return self._cache[prompt]

    def clear_prompt_cache(self) -> None:
        """Forget cached text embeddings: the next encode runs the text encoders again."""
        self._cache.clear()

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        parts = [self._encode_one(p) for p in prompts]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def initial_latents(self, seeds: Sequence[int], generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Initial noise, one CPU generator per seed (``generators``: those generators, which go on to
        draw the sampler's per-step noise)."""
        size = self.resolution // self.pipe.vae_scale_factor
        shape = (self.denoiser.config.in_channels, size, size)
        generators = generators or [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = [torch.randn(shape, generator=g) for g in generators]
        return torch.stack(noise).to(self.device, self.dtype)

    def _initial_latents_cached(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """initial_latents for a batch, drawn once per batch of seeds (sweeps regenerate the same
        batch thousands of times); the generators continue from where the draw left them."""
        key = tuple(int(s) for s in seeds)
        if key not in self._latents:
            generators = [torch.Generator("cpu").manual_seed(s) for s in key]
            latents = self.initial_latents(key, generators)
            if len(self._latents) >= 16:
                self._latents.pop(next(iter(self._latents)))
            self._latents[key] = (latents, [g.get_state() for g in generators])
        latents, states = self._latents[key]
        generators = []
        for state in states:
            g = torch.Generator("cpu")
            g.set_state(state)
            generators.append(g)
        return latents.clone(), generators

    def _noise_prediction(self, out) -> torch.Tensor:
        """The denoiser output's noise channels (PixArt also predicts a variance the sampler drops)."""
        out = (out[0] if isinstance(out, tuple) else out.sample).detach()
        channels = self.denoiser.config.in_channels
        return out[:, :channels] if self.denoiser.config.out_channels == 2 * channels else out

    def _guided(self, c: torch.Tensor) -> torch.Tensor:
        # With classifier-free guidance the batch is [uncond; cond]: combine as the pipeline does
        # before the scheduler step.
        if not self.classifier_free_guidance:
            return c
        uncond, cond = c.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def denoiser_outputs(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """``generate(..., capture_denoiser=True, keep_on_device=True).denoiser``, faster for one step.

        A one-step sampler's denoiser inputs (initial latents, text embeddings, timestep) do not
        depend on the denoiser. They are captured on the first call for these prompts and seeds, and
        later calls run the denoiser on them directly: the same values without the pipeline around
        the call (a quality-layer sensitivity evaluation is one such call).
        """
        if self.steps != 1:
            return self.generate(prompts, seeds, decode=False, capture_denoiser=True, keep_on_device=True).denoiser
        key = (tuple(prompts), tuple(int(s) for s in seeds), self.batch_size)
        if self._replay is None or self._replay[0] != key:
            calls: list[tuple[tuple, dict]] = []

            def grab(_m, args, kwargs):
                calls.append(clone_tensors((args, kwargs)))

            handle = self.denoiser.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                out = self.generate(prompts, seeds, decode=False, capture_denoiser=True, keep_on_device=True)
            finally:
                handle.remove()
            self._replay = (key, calls)
            return out.denoiser
        model = self.denoiser
        outs = [self._guided(self._noise_prediction(model(*args, **kwargs))) for args, kwargs in self._replay[1]]
        return torch.cat(outs).unsqueeze(1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], decode: bool = True,
                 capture_denoiser: bool = False, keep_on_device: bool = False) -> GenerationOutput:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images, denoiser, finals = [], [], []
        captured: list[torch.Tensor] = []

        model = self.denoiser

        def hook(_m, _args, out):
            captured.append(self._noise_prediction(out))

        handle = model.register_forward_hook(hook) if capture_denoiser else None
        # PixArt's defaults would clean captions (needs bs4/ftfy), snap the size to its aspect-ratio
        # bins, and refuse the cached negative embeddings next to its default negative prompt "".
        extra = ({"negative_prompt": None, "clean_caption": False, "use_resolution_binning": False,
                  "max_sequence_length": self.max_sequence_length} if self.is_pixart else {})
        try:
            for i in range(0, len(prompts), self.batch_size):
                p, s = list(prompts[i:i + self.batch_size]), list(seeds[i:i + self.batch_size])
                captured.clear()
                latents, generators = self._initial_latents_cached(s)
                out = self.pipe(
                    **self.encode(p), latents=latents, generator=generators,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale, height=self.resolution, width=self.resolution,
                    output_type="pt" if decode else "latent", return_dict=True, **extra,
                )
                move = (lambda t: t) if keep_on_device else (lambda t: t.float().cpu())
                if decode:
                    images.append(move(out.images))
                else:
                    finals.append(move(out.images))
                if capture_denoiser:
                    steps = [self._guided(c) for c in captured]
                    denoiser.append(move(torch.stack(steps, dim=1)))
        finally:
            if handle is not None:
                handle.remove()
        return GenerationOutput(
            images=torch.cat(images) if images else None,
            denoiser=torch.cat(denoiser) if denoiser else None,
            latents=torch.cat(finals) if finals else None,
        )


def clone_tensors(obj, dtype: torch.dtype | None = None):
    """Copies of the tensors in a nested tuple / list / dict (captured denoiser calls), floating ones
    cast to ``dtype`` when given; everything else as is."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().clone()
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: clone_tensors(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tensors(v, dtype) for v in obj)
    return obj


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
