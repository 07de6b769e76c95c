"""Training of the compose model, few-step from the start (library code: no Hydra, no W&B here).

Two phases, one seed, as for the tiny model (mixprec.tiny.train, whose helpers this reuses):
1. the VAE (reconstruction + a small KL term) on rendered scenes;
2. the UNet and both text encoders on the frozen VAE's latents with the v-prediction loss --
   but only at the sampler's own timesteps (the 4 "trailing" steps 999, 749, 499, 249 of the zero
   terminal SNR schedule). The denoiser spends all its capacity where it will be sampled, which is
   how a model samples well in 4 steps without a teacher; it also means nothing downstream can
   average an error away, the property that makes SDXL-Turbo sensitive to quantization.

Every random draw of step k is a function of (seed, phase, k); a checkpoint holds weights,
optimizer and EMA state, so a run can span several jobs. On CUDA the forward passes run under
bf16 autocast (weights and optimizer state stay float32).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixprec.tiny.build import generate
from mixprec.workspace import atomic_write_text
from mixprec.tiny.train import (CHECKPOINT_NAME, LogFn, LogImagesFn, _atomic_torch_save, _deterministic,
                                _EMA, _lr_factor, _noise_scheduler, _step_seed, _to_model_range, resolve_device,
                                save_pipeline)

from . import scenes
from .build import build_pipeline
from .checker import ATTRIBUTES, check_batch
# the library's config and its allowed values, re-exported with the trainer
from .train_config import ACCELERATE_MODES, LAYOUTS, TIMESTEP_MODES, UNET_INITS, ComposeTrainConfig  # noqa: F401


def student_t_init_(unet: torch.nn.Module, dof: float, seed: int) -> None:
    """Redraw every Linear and Conv2d weight of `unet`, in place, from a Student-t distribution of
    `dof` (> 2) degrees of freedom scaled to the layer's current standard deviation (biases and
    all-zero weights are kept). Deterministic for a seed: one numpy generator walks the layers in
    module order."""
    rng = np.random.default_rng([seed, 0x57D7])
    unit = float(np.sqrt((dof - 2.0) / dof))  # a Student-t's std is sqrt(dof / (dof - 2))
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                std = float(module.weight.float().std())
                if std == 0.0:
                    continue
                draw = rng.standard_t(dof, size=tuple(module.weight.shape)) * (unit * std)
                module.weight.copy_(torch.from_numpy(draw).to(module.weight.dtype))


def evaluate_adherence(pipe, prompts: list[tuple[str, int]], num_inference_steps: int,
                       batch_size: int = 32) -> dict[str, Any]:
    """Scene-checker adherence of the pipeline's images for (caption, seed) pairs, plus the images."""
    caps = [c for c, _ in prompts]
    imgs = generate(pipe, caps, [s for _, s in prompts], num_inference_steps=num_inference_steps,
                    batch_size=batch_size)
    res = check_batch(imgs, caps)
    return res | {"images": imgs, "captions": caps}


def tokenize(tokenizer, captions: list[str], batch_size: int = 4096) -> torch.Tensor:
    """Token ids (n, model_max_length) as the SDXL pipeline's encode_prompt makes them."""
    parts = [tokenizer(captions[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids for i in range(0, len(captions), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, tokenizer.model_max_length, dtype=torch.long)


def encode_token_ids(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of StableDiffusionXLPipeline.encode_prompt for
    pre-tokenized captions (both tokenizers share the vocabulary, so one id tensor serves both):
    the penultimate hidden states of both encoders side by side, and the second's projection."""
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def _load_weights(pipe, folder: str) -> None:
    """Copy a saved compose pipeline's weights (VAE, UNet, both text encoders) and latent scale into
    `pipe`, refusing one of another architecture."""
    from .build import load_pipeline

    saved = load_pipeline(folder)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(saved, name).state_dict()
        if {k: tuple(v.shape) for k, v in mine.items()} != {k: tuple(v.shape) for k, v in theirs.items()}:
            raise ValueError(f"init_from={folder}: its {name} has another architecture than this config's arch; "
                             "start from a pipeline trained with the same arch, or set init_from: null")
        getattr(pipe, name).load_state_dict(theirs)
    pipe.vae.register_to_config(scaling_factor=float(saved.vae.config.scaling_factor))


class _Run:
    """The state of one training run: pipeline, optimizers, EMA, phase and step, checkpointing."""

    def __init__(self, cfg: ComposeTrainConfig, dev: torch.device, ckpt_path: Path):
        self.cfg, self.dev, self.ckpt_path = cfg, dev, ckpt_path
        self.fp = cfg.fingerprint()
        self.pipe = build_pipeline(cfg.arch, seed=cfg.seed)
        if cfg.unet_init == "student_t":
            student_t_init_(self.pipe.unet, cfg.unet_init_dof, cfg.seed)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(dev)
        p = self.pipe
        self.vae = p.vae
        self.modules = {"unet": p.unet, "text_encoder": p.text_encoder, "text_encoder_2": p.text_encoder_2}
        lc = self.vae.config.latent_channels
        moments = self.vae.quant_conv if getattr(self.vae, "quant_conv", None) is not None else self.vae.encoder.conv_out
        with torch.no_grad():  # a sharp initial posterior (see mixprec.tiny.train_config.TrainConfig)
            moments.weight[lc:].zero_()
            moments.bias[lc:].fill_(cfg.vae_logvar_init)
        if cfg.init_from:
            _load_weights(p, cfg.init_from)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=cfg.weight_decay)
        text = list(p.text_encoder.parameters()) + list(p.text_encoder_2.parameters())
        self.opt = torch.optim.AdamW([{"params": list(p.unet.parameters()), "lr": cfg.unet_lr},
                                      {"params": text, "lr": cfg.text_lr}], weight_decay=cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.ema: _EMA | None = None
        self.phase, self.step = "vae", 0

    def autocast(self):
        if self.dev.type == "cuda" and self.cfg.bf16:
            # No cast cache: the weights change every step anyway, and a CUDA graph capture needs it off.
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def load(self) -> None:
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("fingerprint") != self.fp:
            raise ValueError(f"checkpoint {self.ckpt_path} was written for another training config "
                             f"({ck.get('fingerprint')} != {self.fp}); delete it or set resume=false")
        self.phase, self.step = ck["phase"], int(ck["step"])
        self.vae.load_state_dict(ck["vae"])
        self.vae_opt.load_state_dict(ck["vae_opt"])
        if self.phase in ("unet", "done"):
            self.vae.register_to_config(scaling_factor=float(ck["scaling_factor"]))
            for n, m in self.modules.items():
                m.load_state_dict(ck[n])
            self.opt.load_state_dict(ck["opt"])
            self.ema = _EMA(self.modules, self.cfg.ema_decay)
            self.ema.shadow = {k: v.to(self.dev) for k, v in ck["ema"].items()}

    def save(self) -> None:
        ck = {"fingerprint": self.fp, "phase": self.phase, "step": self.step,
              "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict()}
        if self.phase in ("unet", "done"):
            ck.update({n: m.state_dict() for n, m in self.modules.items()})
            ck.update(opt=self.opt.state_dict(), ema=self.ema.shadow, scaling_factor=float(self.vae.config.scaling_factor))
        _atomic_torch_save(ck, self.ckpt_path)

    def checkpoint_due(self, total: int, stop: bool) -> bool:
        return self.step % self.cfg.checkpoint_every == 0 or self.step == total or stop

    def vae_step(self, images_u8: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        rng = np.random.default_rng(_step_seed(cfg.seed, "vae", self.step))
        idx = torch.from_numpy(rng.integers(0, images_u8.shape[0], cfg.vae_batch_size))
        x = _to_model_range(images_u8[idx.to(images_u8.device)]).to(self.dev)
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, "vae-noise", self.step))
        with self.autocast():
            post = self.vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(self.dev)
            recon = self.vae.decode(z).sample.float()
        rec = F.mse_loss(recon, x)
        kl = 0.5 * (post.mean.float().pow(2) + post.var.float() - 1.0 - post.logvar.float()).mean()
        loss = rec + cfg.l1_weight * F.l1_loss(recon, x) + cfg.kl_weight * kl
        for g in self.vae_opt.param_groups:
            g["lr"] = cfg.vae_lr * _lr_factor(self.step, cfg.vae_steps, cfg.warmup_steps)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.vae_opt.step()
        self.step += 1
        return {"vae/loss": loss.item(), "vae/recon_mse": rec.item(), "vae/kl": kl.item()}

    @torch.no_grad()
    def encode_latents(self, images_u8: torch.Tensor, captions: list[str], log: LogFn) -> torch.Tensor:
        """Posterior means of all images, scaled to unit variance (the scale is fixed once, then stored)."""
        self.vae.eval()
        self.vae.requires_grad_(False)
        parts = []
        for i in range(0, images_u8.shape[0], 256):
            with self.autocast():
                parts.append(self.vae.encode(_to_model_range(images_u8[i:i + 256]).to(self.dev)).latent_dist.mean.float())
        latents = torch.cat(parts)
        if self.ema is None:
            if not self.cfg.init_from:  # a started model keeps the latent scale it was trained with
                self.vae.register_to_config(scaling_factor=float(1.0 / latents.std().item()))
            self.ema = _EMA(self.modules, self.cfg.ema_decay)
        latents = latents * self.vae.config.scaling_factor
        recon = self.vae.decode(latents[:256] / self.vae.config.scaling_factor).sample.float()
        res = check_batch(((recon + 1) / 2).clamp(0, 1).cpu(), captions[:256])
        log({"vae/recon_adherence": res["all"], "vae/scaling_factor": float(self.vae.config.scaling_factor)},
            self.cfg.vae_steps)
        return latents


def _set_lr(group: dict, value: float) -> None:
    # A captured optimizer step reads its learning rate from a device tensor (updated in place);
    # a plain one from a float.
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def _make_capturable(opt: torch.optim.Optimizer, dev: torch.device) -> None:
    """Make AdamW replayable from a CUDA graph: learning rates and step counts as device tensors
    (also after loading a checkpoint that a plain optimizer wrote)."""
    for g in opt.param_groups:
        g["capturable"] = True
        g["lr"] = torch.tensor(float(g["lr"]), device=dev)
        for p in g["params"]:
            st = opt.state.get(p)
            if st and "step" in st:
                st["step"] = st["step"].to(device=dev, dtype=torch.float32)


class _CudaGraphStep:
    """Calls `fn(*inputs)` as a CUDA graph: a few eager warm-up calls on a side stream (real
    training steps: they initialise the optimizer state and the lazy CUDA handles), then one capture
    (which runs nothing), then each call copies its inputs into the captured ones and replays.
    `fn` must keep shapes fixed and never read values on the host."""

    def __init__(self, fn, warmup: int = 3):
        self.fn, self.warmup_left = fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_outputs = None

    def __call__(self, *inputs: torch.Tensor):
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_inputs = tuple(x.clone() for x in inputs)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = self.fn(*self.static_inputs)
        for dst, src in zip(self.static_inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        return tuple(o.clone() for o in self.static_outputs)


class _DenoiserTrainer:
    """Phase 2: one UNet + text-encoder step at a time, at the sampler's timesteps."""

    def __init__(self, run: _Run, latents: torch.Tensor, captions: list[str]):
        self.run, self.latents, self.captions = run, latents, captions
        cfg, pipe, dev = run.cfg, run.pipe, run.dev
        self.noise_sched = _noise_scheduler(cfg.arch)
        sampler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        sampler.set_timesteps(cfg.num_inference_steps, device="cpu")
        self.train_timesteps = torch.as_tensor(sampler.timesteps, dtype=torch.long)
        # Tokenized once: the slow CLIP tokenizer, called per step by encode_prompt, cost as much as
        # the rest of a step's overhead.
        self.token_ids = tokenize(pipe.tokenizer, captions).to(dev)
        size = cfg.arch["image_size"]
        self.add_time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                                   text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
                                                   ).to(dev)
        self.params = [p for m in run.modules.values() for p in m.parameters()]
        mode = cfg.accelerate if dev.type == "cuda" else "none"
        self.unet = torch.compile(pipe.unet) if mode == "compile" else pipe.unet
        if mode == "cuda_graph":
            _make_capturable(run.opt, dev)
            self.runner = _CudaGraphStep(self.update)
        else:
            for g in run.opt.param_groups:  # a checkpoint of a captured run stores tensor rates
                g["lr"], g["capturable"] = float(g["lr"]), False
            self.runner = self.update

    def timesteps(self, gen: torch.Generator, n: int) -> torch.Tensor:
        if self.run.cfg.timesteps == "inference":
            return self.train_timesteps[torch.randint(0, len(self.train_timesteps), (n,), generator=gen)]
        return torch.randint(0, self.noise_sched.config.num_train_timesteps, (n,), generator=gen)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, noise, timesteps, token ids) of the current step: a function of (seed, step) only."""
        run, cfg, dev = self.run, self.run.cfg, self.run.dev
        rng = np.random.default_rng(_step_seed(cfg.seed, "unet", run.step))
        idx = torch.from_numpy(rng.integers(0, self.latents.shape[0], cfg.unet_batch_size)).to(dev)
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, "unet-noise", run.step))
        x0 = self.latents[idx.to(self.latents.device)].to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        return x0, noise, self.timesteps(gen, x0.shape[0]).to(dev), self.token_ids[idx]

    def update(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ids: torch.Tensor):
        """One optimizer update from a batch; returns (loss, grad norm) as device tensors. No host
        synchronisation, no host-side branching on values: this is what the CUDA graph captures."""
        run, cfg = self.run, self.run.cfg
        xt = self.noise_sched.add_noise(x0, noise, t)
        target = self.noise_sched.get_velocity(x0, noise, t)
        run.opt.zero_grad(set_to_none=True)
        with run.autocast():
            embeds, pooled = encode_token_ids(run.pipe, ids)
            cond = {"text_embeds": pooled, "time_ids": self.add_time_ids.expand(x0.shape[0], -1)}
            pred = self.unet(xt, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample.float()
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            a = self.noise_sched.alphas_cumprod[t]
            snr = a / (1 - a).clamp_min(1e-8)
            per_sample = per_sample * snr.clamp(max=cfg.min_snr_gamma) / (snr + 1)
        loss = per_sample.mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        run.opt.step()
        return loss.detach(), grad_norm.detach()

    def step(self) -> dict[str, torch.Tensor | float]:
        """One training step; the losses come back as device tensors (read them only when logging:
        reading forces the host to wait for the GPU)."""
        run, cfg = self.run, self.run.cfg
        f = _lr_factor(run.step, cfg.unet_steps, cfg.warmup_steps)
        for g, base in zip(run.opt.param_groups, run.base_lrs):
            _set_lr(g, base * f)
        loss, grad_norm = self.runner(*self.batch())
        run.ema.update(run.modules, run.step)
        run.step += 1
        return {"unet/loss": loss, "unet/grad_norm": grad_norm, "unet/lr": run.base_lrs[0] * f}

    def sample_and_log(self, tag_step: int, log: LogFn, log_images: LogImagesFn | None) -> dict[str, float]:
        """Held-out adherence of the EMA weights (the live weights are put back afterwards)."""
        run = self.run
        with run.ema.applied(run.modules):
            res = evaluate_adherence(run.pipe, scenes.eval_prompts(run.cfg.eval_prompts, "heldout", seed=0),
                                     run.cfg.num_inference_steps)
        metrics = {f"eval/heldout_{k}": res[k] for k in ATTRIBUTES + ("all",)}
        log(metrics, tag_step)
        if log_images is not None:
            log_images("samples/heldout", res["images"][:16], res["captions"][:16])
        return metrics


def train_compose(out_dir, cfg: ComposeTrainConfig | None = None, *, work_dir=None, device="auto", resume: bool = True,
                  stop_after: int | None = None, stop_after_s: float | None = None, log_fn: LogFn | None = None, log_images_fn: LogImagesFn | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train the compose model and save it as a diffusers folder at out_dir (float32; see
    `save_dtype` of the stage for fp16). work_dir holds the resumable checkpoint (default:
    out_dir + ".work"); stop_after stops after that many global steps (VAE + UNet) with a
    checkpoint written, as an interruption would; stop_after_s does the same after that many seconds
    (a GPU job with a wall-clock limit). Returns a summary dict."""
    cfg = cfg or ComposeTrainConfig()
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    ctx = _deterministic(dev) if cfg.deterministic else contextlib.nullcontext()
    with ctx:
        deadline = None if stop_after_s is None else time.time() + float(stop_after_s)
        return _train(out_dir, cfg, dev, work / CHECKPOINT_NAME, resume, (stop_after, deadline), log_fn or (lambda m, s: None),
                      log_images_fn, progress)


def _train(out_dir: Path, cfg: ComposeTrainConfig, dev: torch.device, ckpt_path: Path, resume: bool,
           stop_at: tuple[int | None, float | None], log: LogFn, log_images: LogImagesFn | None,
           progress: bool) -> dict[str, Any]:
    t_start = time.time()
    run = _Run(cfg, dev, ckpt_path)
    if resume and ckpt_path.exists():
        run.load()
    images_u8, captions = scenes.make_dataset(cfg.dataset_size, seed=cfg.seed, split="train", layout=cfg.layout,
                                             jitter=cfg.layout_jitter)
    if dev.type == "cuda":
        images_u8 = images_u8.to(dev)
    summary: dict[str, Any] = {"device": str(dev), "fingerprint": run.fp, "finished": False,
                               "data_s": round(time.time() - t_start, 1)}
    offset = lambda: run.step if run.phase == "vae" else cfg.vae_steps + run.step  # noqa: E731
    bar = tqdm(total=cfg.vae_steps + cfg.unet_steps, initial=offset(), disable=not progress, desc="train_compose",
               dynamic_ncols=True)
    stop_after, deadline = stop_at
    stop = lambda: ((stop_after is not None and offset() >= stop_after)  # noqa: E731
                    or (deadline is not None and time.time() >= deadline))
    if run.phase == "vae" and not _vae_phase(run, images_u8, bar, log, stop, summary):
        return summary
    latents = run.encode_latents(images_u8, captions, log)
    del images_u8
    trainer = _DenoiserTrainer(run, latents, captions)
    if run.phase == "unet" and not _unet_phase(run, trainer, bar, log, log_images, stop, summary):
        summary["snapshot"] = str(_save_snapshot(run, out_dir))
        return summary
    bar.close()
    run.ema.copy_to(run.modules)
    for m in run.modules.values():
        m.eval()
    if cfg.eval_prompts:
        summary.update(trainer.sample_and_log(offset(), log, log_images))
    save_pipeline(run.pipe, out_dir)
    run.phase, run.step = "done", cfg.unet_steps
    run.save()
    summary.update(finished=True, total_time_s=time.time() - t_start)
    return summary


def _save_snapshot(run: _Run, out_dir: Path) -> Path:
    """The EMA weights of an interrupted UNet phase as a loadable pipeline in `<out>.partial`, with
    `partial.json` saying how far it got: a GPU job that hits its time limit still hands back
    something to inspect (its checkpoint, ~300 MB with the optimizer, may not leave the machine).
    Never written to `out_dir` itself, so it cannot pass for the finished model."""
    snap = out_dir.with_name(out_dir.name + ".partial")
    with run.ema.applied(run.modules):
        save_pipeline(run.pipe, snap)
    atomic_write_text(snap / "partial.json", json.dumps({"fingerprint": run.fp, "unet_step": run.step,
                                                         "unet_steps": run.cfg.unet_steps, "weights": "EMA"}))
    return snap


def _vae_phase(run: _Run, images_u8, bar, log: LogFn, stop, summary: dict) -> bool:
    """Train the VAE to the end (True) or until `stop()` (False, checkpoint written)."""
    cfg = run.cfg
    run.vae.train()
    t0 = time.time()
    while run.step < cfg.vae_steps:
        metrics = run.vae_step(images_u8)
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == cfg.vae_steps:
            bar.set_postfix(phase="vae", loss=f"{metrics['vae/loss']:.4f}")
            log(metrics | {"vae/steps_per_s": run.step / max(1e-9, time.time() - t0)}, run.step)
        if run.checkpoint_due(cfg.vae_steps, stop()):
            run.save()
        if stop():
            bar.close()
            return False
    summary["vae_time_s"] = round(time.time() - t0, 1)
    run.phase, run.step = "unet", 0
    return True


def _unet_phase(run: _Run, trainer: _DenoiserTrainer, bar, log: LogFn, log_images, stop, summary: dict) -> bool:
    """Train the UNet and text encoders to the end (True) or until `stop()` (False, checkpoint written)."""
    cfg = run.cfg
    for m in run.modules.values():
        m.train()
    t0, start = time.time(), run.step
    while run.step < cfg.unet_steps:
        metrics = trainer.step()
        bar.update(1)
        global_step = cfg.vae_steps + run.step
        if run.step % cfg.log_every == 0 or run.step == cfg.unet_steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix(phase="unet", loss=f"{metrics['unet/loss']:.4f}")
            log(metrics | {"unet/steps_per_s": (run.step - start) / max(1e-9, time.time() - t0)}, global_step)
            summary["final_loss"] = metrics["unet/loss"]
        if cfg.sample_every and run.step % cfg.sample_every == 0 and run.step < cfg.unet_steps:
            trainer.sample_and_log(global_step, log, log_images)
        if run.checkpoint_due(cfg.unet_steps, stop()):
            run.save()
        if stop() and run.step < cfg.unet_steps:
            bar.close()
            return False
    summary["unet_time_s"] = round(time.time() - t0, 1)
    return True


def main(argv=None) -> None:
    """`python -m mixprec.compose.train OUT [--config JSON]`: the same training without Hydra (for a
    GPU machine with only torch, diffusers and transformers); metrics go to stdout as JSON lines."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", help="folder for the trained pipeline")
    ap.add_argument("--config", default="{}", help="JSON object of ComposeTrainConfig overrides")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--stop-after-s", type=float, default=None, help="stop (checkpoint written) after this many seconds")
    args = ap.parse_args(argv)
    cfg = ComposeTrainConfig.from_dict(json.loads(args.config))
    summary = train_compose(args.out, cfg, device=args.device, stop_after=args.stop_after,
                            stop_after_s=args.stop_after_s, progress=False,
                            log_fn=lambda metrics, step: print(json.dumps({"step": step} | metrics), flush=True))
    print(json.dumps({"summary": summary, "fingerprint": cfg.fingerprint()}, default=str), flush=True)


if __name__ == "__main__":
    main()
