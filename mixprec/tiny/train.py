"""Training of the built-in tiny text-to-image model (library code: no Hydra, no W&B here).

Two phases, one seed:
1. the VAE (reconstruction + a small KL term) on generator images;
2. the UNet and both text encoders on the frozen VAE's latents, with the v-prediction diffusion
   loss; the conditioning goes through the SDXL pipeline's own `encode_prompt` and
   `_get_add_time_ids`, so training sees exactly what sampling will feed the UNet.

Every random draw of step k is a pure function of (seed, phase, k) -- the data set is rendered
from the seed, the batch indices, noise and timesteps come from per-step generators. A checkpoint
therefore needs only weights, optimizer and EMA state and the step number, and a resumed run
retraces an uninterrupted one exactly (on the same device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from tqdm.auto import tqdm

from mixprec.workspace import atomic_path

from . import shapes
from .adherence import check_batch

from .build import build_pipeline, generate
from .train_config import TrainConfig

LogFn = Callable[[dict, int], None]
LogImagesFn = Callable[[str, list, list], None]

CHECKPOINT_NAME = "checkpoint.pt"


# ---------------------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _step_seed(seed: int, phase: str, step: int) -> int:
    h = hashlib.sha256(f"{seed}/{phase}/{step}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div(127.5).sub(1.0)


class _EMA:
    """Exponential moving average of all float parameters and buffers (warm-up: decay grows with step)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {f"{n}.{k}": v.detach().clone().float()
                       for n, m in modules.items() for k, v in m.state_dict().items()}

    def _pairs(self, modules):
        # Cached: state_dict() of ~1,000 tensors costs milliseconds, a whole step on the GPU. The
        # tensors stay the same objects (load_state_dict copies in place).
        key = (id(self.shadow),) + tuple(id(m) for m in modules.values())
        if getattr(self, "_pairs_key", None) != key:
            self._pairs_key, self._pairs_cache = key, self._collect_pairs(modules)
        return self._pairs_cache

    def _collect_pairs(self, modules):
        live, shadow = [], []
        for n, m in modules.items():
            for k, v in m.state_dict().items():
                if v.dtype.is_floating_point:
                    live.append(v)
                    shadow.append(self.shadow[f"{n}.{k}"])
        return live, shadow

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        live, shadow = self._pairs(modules)
        torch._foreach_lerp_(shadow, live, 1 - d)

    @contextlib.contextmanager
    def applied(self, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
        """The averaged weights in the modules, in eval mode, for the block; the live weights and
        train mode put back afterwards (evaluation and snapshots in the middle of training)."""
        live = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
        self.copy_to(modules)
        for m in modules.values():
            m.eval()
        try:
            yield
        finally:
            for n, m in modules.items():
                m.load_state_dict(live[n])
                m.train()

    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for n, m in modules.items():
            m.load_state_dict({k: self.shadow[f"{n}.{k}"].to(v.dtype) for k, v in m.state_dict().items()})


def _noise_scheduler(arch: dict) -> DDPMScheduler:
    s = {k: v for k, v in arch["scheduler"].items() if k not in ("class", "timestep_spacing")}
    return DDPMScheduler(**s)


def evaluate_adherence(pipe: StableDiffusionXLPipeline, prompts: list[tuple[str, int]], num_inference_steps: int,
                       batch_size: int = 32) -> dict[str, Any]:
    """Adherence rates of the pipeline's images for (caption, seed) pairs, plus the images."""
    caps = [c for c, _ in prompts]
    imgs = generate(pipe, caps, [s for _, s in prompts], num_inference_steps=num_inference_steps,
                    batch_size=batch_size)
    res = check_batch(imgs, caps)
    res["images"] = imgs
    res["captions"] = caps
    return res


# ---------------------------------------------------------------------------------------- training
def train_tiny(
    out_dir: str | os.PathLike,
    cfg: TrainConfig | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    resume: bool = True,
    stop_after: int | None = None,
    log_fn: LogFn | None = None,
    log_images_fn: LogImagesFn | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tiny model and save it as a diffusers folder at out_dir.

    work_dir holds the resumable checkpoint (default: out_dir + ".work"). stop_after stops after
    that many global steps (VAE steps + UNet steps) with a checkpoint written, as an interruption
    would. Returns a summary dict (losses, held-out adherence, timings, 'finished').
    """
    cfg = cfg or TrainConfig()
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / CHECKPOINT_NAME
    with _deterministic(dev):
        return _train(out_dir, cfg, dev, work, ckpt_path, resume, stop_after, log_fn, log_images_fn, progress)


@contextlib.contextmanager
def _deterministic(dev: torch.device) -> Iterator[None]:
    """Same seed, same device, same weights: no nondeterministic CUDA kernels while training; the
    caller's global torch settings are restored afterwards."""
    if dev.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


@dataclass
class _Run:
    """Everything one training run carries from phase to phase."""

    cfg: TrainConfig
    dev: torch.device
    pipe: StableDiffusionXLPipeline
    vae_opt: torch.optim.Optimizer
    opt: torch.optim.Optimizer
    base_lrs: list[float]
    ckpt_path: Path
    fp: str
    log: LogFn
    log_images_fn: LogImagesFn | None
    stop_after: int | None
    ema: _EMA | None = None
    phase: str = "vae"
    step: int = 0
    global_step: int = 0
    bar: Any = None
    images_u8: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def dm_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder,
                "text_encoder_2": self.pipe.text_encoder_2}

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.global_step >= self.stop_after

    def tick(self) -> None:
        self.step += 1
        self.global_step += 1
        self.bar.update(1)


def _setup(cfg: TrainConfig, dev: torch.device, ckpt_path: Path, log_fn: LogFn | None,
           log_images_fn: LogImagesFn | None, stop_after: int | None) -> _Run:
    """The pipeline to train, its optimizers, and the VAE's posterior initialised narrow."""
    pipe = build_pipeline(cfg.arch, seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    vae, unet, te, te2 = pipe.vae, pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    lc = vae.config.latent_channels
    # The posterior's (mean, logvar) come out of quant_conv when the VAE has one, else the encoder.
    moments = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    with torch.no_grad():
        moments.weight[lc:].zero_()
        moments.bias[lc:].fill_(cfg.vae_logvar_init)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "lr": cfg.unet_lr},
         {"params": list(te.parameters()) + list(te2.parameters()), "lr": cfg.text_lr}],
        weight_decay=cfg.weight_decay,
    )
    return _Run(cfg, dev, pipe, vae_opt, opt, [g["lr"] for g in opt.param_groups], ckpt_path, cfg.fingerprint(),
                log_fn or (lambda metrics, step: None), log_images_fn, stop_after)


def _resume(run: _Run) -> None:
    """Load the checkpoint of an interrupted run of the same config (phase, step, weights, optimizers)."""
    ck = torch.load(run.ckpt_path, map_location="cpu", weights_only=True)
    if ck.get("fingerprint") != run.fp:
        raise ValueError(
            f"checkpoint {run.ckpt_path} was written for another training config "
            f"({ck.get('fingerprint')} != {run.fp}); delete it or set resume=false"
        )
    run.phase, run.step = ck["phase"], int(ck["step"])
    run.pipe.vae.load_state_dict(ck["vae"])
    run.vae_opt.load_state_dict(ck["vae_opt"])
    if run.phase in ("unet", "done"):
        run.pipe.vae.register_to_config(scaling_factor=float(ck["scaling_factor"]))
        for n, m in run.dm_modules.items():
            m.load_state_dict(ck[n])
        run.opt.load_state_dict(ck["opt"])
        run.ema = _EMA(run.dm_modules, run.cfg.ema_decay)
        run.ema.shadow = {k: v.to(run.dev) for k, v in ck["ema"].items()}


def _save_checkpoint(run: _Run, phase: str, step: int) -> None:
    vae = run.pipe.vae
    ck = {"fingerprint": run.fp, "phase": phase, "step": step,
          "vae": vae.state_dict(), "vae_opt": run.vae_opt.state_dict()}
    if phase in ("unet", "done"):
        ck.update({n: m.state_dict() for n, m in run.dm_modules.items()})
        ck["opt"] = run.opt.state_dict()
        ck["ema"] = run.ema.shadow
        ck["scaling_factor"] = float(vae.config.scaling_factor)
    _atomic_torch_save(ck, run.ckpt_path)


def _vae_step(run: _Run) -> dict[str, Any]:
    """One VAE step: reconstruction + L1 + KL on a batch of the dataset's images."""
    cfg, vae, dev, step = run.cfg, run.pipe.vae, run.dev, run.step
    rng = np.random.default_rng(_step_seed(cfg.seed, "vae", step))
    idx = torch.from_numpy(rng.integers(0, run.images_u8.shape[0], cfg.vae_batch_size))
    x = _to_model_range(run.images_u8[idx]).to(dev)
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, "vae-noise", step))
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
    recon = vae.decode(z).sample
    rec_loss = F.mse_loss(recon, x)
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    loss = rec_loss + cfg.l1_weight * F.l1_loss(recon, x) + cfg.kl_weight * kl
    for g in run.vae_opt.param_groups:
        g["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, cfg.warmup_steps)
    run.vae_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
    run.vae_opt.step()
    # tensors: read (a device sync) only on the steps that log
    return {"vae/loss": loss.detach(), "vae/recon_mse": rec_loss.detach(), "vae/kl": kl.detach(),
            "vae/posterior_std": post.std.mean().detach(), "vae/lr": run.vae_opt.param_groups[0]["lr"]}


def _train_vae(run: _Run) -> bool:
    """Phase 1: the VAE alone. True when stopped early (``stop_after``)."""
    cfg = run.cfg
    run.pipe.vae.train()
    t0 = time.time()
    while run.step < cfg.vae_steps:
        m = _vae_step(run)
        run.tick()
        if run.step % cfg.log_every == 0 or run.step == cfg.vae_steps:
            m = {k: float(v) for k, v in m.items()}
            m["vae/steps_per_s"] = run.step / max(1e-9, time.time() - t0)
            run.bar.set_postfix(phase="vae", loss=f"{m['vae/loss']:.4f}")
            run.log(m, run.global_step)
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.vae_steps or run.should_stop():
            _save_checkpoint(run, "vae", run.step)
        if run.should_stop():
            return True
    run.phase, run.step = "unet", 0
    run.summary["vae_time_s"] = time.time() - t0
    return False


def _encode_latents(run: _Run) -> torch.Tensor:
    """The whole dataset through the frozen VAE, scaled to unit variance (the scale fixed once)."""
    vae, dev, images_u8 = run.pipe.vae, run.dev, run.images_u8
    vae.eval()
    vae.requires_grad_(False)
    latents = []
    with torch.no_grad():
        for i in range(0, images_u8.shape[0], 256):
            latents.append(vae.encode(_to_model_range(images_u8[i:i + 256]).to(dev)).latent_dist.mean)
    latents = torch.cat(latents)
    if run.ema is None:
        # Unit-variance latents, as SD's scaling_factor arranges; fixed once, then stored.
        vae.register_to_config(scaling_factor=float(1.0 / latents.std().item()))
        run.ema = _EMA(run.dm_modules, run.cfg.ema_decay)
    latents = latents * vae.config.scaling_factor
    with torch.no_grad():
        recon = vae.decode(latents[:256] / vae.config.scaling_factor).sample
        vae_check = check_batch(((recon + 1) / 2).clamp(0, 1).cpu(), run.captions[:256])
    run.summary["vae_recon_adherence"] = vae_check["all"]
    run.log({"vae/recon_adherence": vae_check["all"], "vae/scaling_factor": float(vae.config.scaling_factor)},
            run.cfg.vae_steps)
    return latents


def _sample_and_log(run: _Run, eval_set: list[tuple[str, int]], tag_step: int) -> dict:
    """Held-out adherence with the EMA weights; the live weights are put back afterwards."""
    with run.ema.applied(run.dm_modules):
        res = evaluate_adherence(run.pipe, eval_set, run.cfg.num_inference_steps)
    metrics = {f"eval/heldout_{k}": res[k] for k in ("all", "shape_colour", "background", "shape")}
    run.log(metrics, tag_step)
    if run.log_images_fn is not None:
        run.log_images_fn("samples/heldout", res["images"][:16], res["captions"][:16])
    return metrics


def _unet_step(run: _Run, latents: torch.Tensor, noise_sched: DDPMScheduler, alphas: torch.Tensor,
               add_time_ids: torch.Tensor) -> dict[str, Any]:
    """One denoiser + text-encoder step: v-prediction loss with min-SNR weighting."""
    cfg, dev, step, pipe = run.cfg, run.dev, run.step, run.pipe
    rng = np.random.default_rng(_step_seed(cfg.seed, "unet", step))
    idx = rng.integers(0, latents.shape[0], cfg.unet_batch_size)
    x0 = latents[torch.from_numpy(idx).to(dev)]
    caps = [run.captions[i] for i in idx]
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, "unet-noise", step))
    noise = torch.randn(x0.shape, generator=gen).to(dev)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(dev)
    xt = noise_sched.add_noise(x0, noise, t)
    target = noise_sched.get_velocity(x0, noise, t)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(caps, device=dev, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    cond = {"text_embeds": pooled, "time_ids": add_time_ids.expand(x0.shape[0], -1)}
    pred = pipe.unet(xt, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=cond).sample
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma > 0:
        a = alphas[t]
        snr = a / (1 - a).clamp_min(1e-8)
        # For v-prediction the min-SNR weight is min(snr, gamma) / (snr + 1).
        per_sample = per_sample * snr.clamp(max=cfg.min_snr_gamma) / (snr + 1)
    loss = per_sample.mean()
    f = _lr_factor(step, cfg.unet_steps, cfg.warmup_steps)
    for g, base in zip(run.opt.param_groups, run.base_lrs):
        g["lr"] = base * f
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for m in run.dm_modules.values() for p in m.parameters()], cfg.grad_clip)
    run.opt.step()
    run.ema.update(run.dm_modules, step)
    return {"unet/loss": loss.detach(), "unet/grad_norm": grad_norm, "unet/lr": run.opt.param_groups[0]["lr"]}


def _train_unet(run: _Run, latents: torch.Tensor, eval_set: list[tuple[str, int]]) -> bool:
    """Phase 2: UNet and text encoders on the frozen VAE's latents. True when stopped early."""
    cfg, pipe = run.cfg, run.pipe
    noise_sched = _noise_scheduler(cfg.arch)
    alphas = noise_sched.alphas_cumprod.to(run.dev)
    size = cfg.arch["image_size"]
    add_time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
                                          ).to(run.dev)
    for m in run.dm_modules.values():
        m.train()
    t0 = time.time()
    start = run.step
    while run.step < cfg.unet_steps:
        m = _unet_step(run, latents, noise_sched, alphas, add_time_ids)
        run.tick()
        step = run.step
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            m = {k: float(v) for k, v in m.items()}
            m["unet/steps_per_s"] = (step - start) / max(1e-9, time.time() - t0)
            run.bar.set_postfix(phase="unet", loss=f"{m['unet/loss']:.4f}")
            run.log(m, run.global_step)
            run.summary["final_loss"] = m["unet/loss"]
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.unet_steps:
            _sample_and_log(run, eval_set, run.global_step)
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps or run.should_stop():
            _save_checkpoint(run, "unet", step)
        if run.should_stop() and step < cfg.unet_steps:
            return True
    run.summary["unet_time_s"] = time.time() - t0
    return False


def _train(out_dir: Path, cfg: TrainConfig, dev: torch.device, work: Path, ckpt_path: Path, resume: bool,
           stop_after: int | None, log_fn: LogFn | None, log_images_fn: LogImagesFn | None,
           progress: bool) -> dict[str, Any]:
    """VAE, then UNet + text encoders, then the EMA weights saved; resumable between and within phases."""
    t_start = time.time()
    run = _setup(cfg, dev, ckpt_path, log_fn, log_images_fn, stop_after)
    if resume and ckpt_path.exists():
        _resume(run)
    run.images_u8, run.captions = shapes.make_dataset(cfg.dataset_size, seed=cfg.seed, split="train")
    run.global_step = run.step if run.phase == "vae" else cfg.vae_steps + run.step
    run.bar = tqdm(total=cfg.vae_steps + cfg.unet_steps, initial=run.global_step, disable=not progress,
                   desc="train_tiny", dynamic_ncols=True)
    run.summary = {"device": str(dev), "fingerprint": run.fp, "finished": False}
    if run.phase == "vae" and _train_vae(run):
        run.bar.close()
        return run.summary
    latents = _encode_latents(run)
    eval_set = shapes.eval_prompts(cfg.eval_prompts, split="heldout", seed=0)
    if run.phase == "unet" and _train_unet(run, latents, eval_set):
        run.bar.close()
        return run.summary
    run.bar.close()
    # final: the EMA weights, evaluated and saved
    run.ema.copy_to(run.dm_modules)
    for m in run.dm_modules.values():
        m.eval()
    run.summary.update(_sample_and_log(run, eval_set, run.global_step) if cfg.eval_prompts else {})
    save_pipeline(run.pipe, out_dir)
    _save_checkpoint(run, "done", cfg.unet_steps)
    run.summary["finished"] = True
    run.summary["total_time_s"] = time.time() - t_start
    return run.summary


def save_pipeline(pipe: StableDiffusionXLPipeline, out_dir: str | os.PathLike) -> Path:
    """pipe.save_pretrained into a sibling temp folder, then swap it in: a reader never sees a
    half-written model folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    pipe.to("cpu").save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def main(argv=None) -> None:
    """`python -m mixprec.tiny.train OUT [--config JSON]`: the same training without Hydra (for
    machines that have only torch, diffusers and transformers)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", help="folder for the trained pipeline")
    ap.add_argument("--config", default="{}", help="JSON object of TrainConfig overrides")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--log", default=None, help="append metrics as JSON lines to this file")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_dict(json.loads(args.config))
    def append_jsonl(metrics: dict, step: int) -> None:
        with open(args.log, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    log_fn = append_jsonl if args.log else None
    summary = train_tiny(args.out, cfg, device=args.device, resume=not args.no_resume, stop_after=args.stop_after,
                         log_fn=log_fn, progress=not args.quiet)
    summary["config"] = dataclasses.asdict(cfg)
    text = json.dumps(summary, indent=1, default=str)
    Path(str(args.out) + ".summary.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()


def config_from_settings(settings: Any, config_cls: type[TrainConfig]) -> TrainConfig:
    """The `config_cls` fields of a training stage's typed settings as a config (null: the default)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls.from_dict({k: v for k, v in dataclasses.asdict(settings).items() if k in names and v is not None})


def train_from_settings(settings: Any, config_cls: type[TrainConfig], train_fn: Callable[..., dict[str, Any]],
                        out_dir: Path, device: str, tracker: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """What the train_tiny and train_compose stages share: the training config built from the stage's
    typed settings (:func:`config_from_settings`), then one resumable run of `train_fn` into `out_dir`,
    its losses and sample grids sent to `tracker`."""
    cfg = config_from_settings(settings, config_cls)
    tracker.update_config({"train_fingerprint": cfg.fingerprint()})
    summary = train_fn(out_dir, cfg, work_dir=out_dir.with_name(out_dir.name + ".work"), device=device,
                       resume=bool(settings.resume) and not settings.force,
                       log_fn=lambda metrics, step: tracker.log(metrics, step=step),
                       log_images_fn=lambda key, images, captions: tracker.log_images(key, images, captions),
                       progress=bool(settings.progress))
    return cfg, summary
