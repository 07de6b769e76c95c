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

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], decode: bool = True,
                 capture_denoiser: bool = False, keep_on_device: bool = False) -> GenerationOutput:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images, denoiser, finals = [], [], []
        captured: list[torch.Tensor] = []

        model = self.denoiser
        noise_channels = model.config.in_channels
        learned_sigma = model.config.out_channels == 2 * noise_channels

        def hook(_m, _args, out):
            out = (out[0] if isinstance(out, tuple) else out.sample).detach()
            captured.append(out[:, :noise_channels] if learned_sigma else out)

        cfg, g = self.classifier_free_guidance, self.guidance_scale

        def guided(c: torch.Tensor) -> torch.Tensor:
            # The batch is [uncond; cond]: combine as the pipeline does before the scheduler step.
            if not cfg:
                return c
            uncond, cond = c.chunk(2)
            return uncond + g * (cond - uncond)

        handle = model.register_forward_hook(hook) if capture_denoiser else None
        # PixArt's defaults would clean captions (needs bs4/ftfy), snap the size to its aspect-ratio
        # bins, and refuse the cached negative embeddings next to its default negative prompt "".
        extra = ({"negative_prompt": None, "clean_caption": False, "use_resolution_binning": False,
                  "max_sequence_length": self.max_sequence_length} if self.is_pixart else {})
        try:
            for i in range(0, len(prompts), self.batch_size):
                p, s = list(prompts[i:i + self.batch_size]), list(seeds[i:i + self.batch_size])
                captured.clear()
                generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in s]
                out = self.pipe(
                    **self.encode(p), latents=self.initial_latents(s, generators), generator=generators,
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
                    steps = [guided(c) for c in captured]
                    denoiser.append(move(torch.stack(steps, dim=1)))
        finally:
            if handle is not None:
                handle.remove()
        return GenerationOutput(
            images=torch.cat(images) if images else None,
            denoiser=torch.cat(denoiser) if denoiser else None,
            latents=torch.cat(finals) if finals else None,
        )


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
