"""End-to-end pipeline timing with a per-component breakdown (text encoders, denoiser, VAE decode).

Each component is timed by forward hooks around its module: CUDA events on a GPU (read after the
run's final synchronize, so the hooks add no synchronization), the host clock elsewhere. A
component called several times per image (the denoiser, once per step) is summed per run. What is
left of the run's wall time (scheduler, latents, tokenizers, host overhead) is ``other``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from .timing import summarize


class ComponentTimer:
    """Forward hooks that time every call of each named module."""

    def __init__(self, components: Mapping[str, nn.Module], cuda: bool):
        self.cuda = cuda
        self.calls: dict[str, list] = {name: [] for name in components}
        self._open: dict[str, list] = {name: [] for name in components}
        self._handles = []
        for name, module in components.items():
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _start(self, name: str):
        def hook(_mod, _args):
            self._open[name].append(self._mark())
        return hook

    def _stop(self, name: str):
        def hook(_mod, _args, _out):
            self.calls[name].append((self._open[name].pop(), self._mark()))
        return hook

    def reset(self) -> None:
        for v in self.calls.values():
            v.clear()

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds per component since the last reset (call after synchronizing)."""
        if self.cuda:
            return {n: sum(a.elapsed_time(b) for a, b in c) for n, c in self.calls.items()}
        return {n: sum((b - a) * 1000 for a, b in c) for n, c in self.calls.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def pipeline_components(pipe, denoiser: nn.Module) -> dict[str, nn.Module]:
    """The modules to time in a diffusers pipeline: its text encoders, ``denoiser`` and the VAE's
    decoder (with ``post_quant_conv`` it is what ``vae.decode`` runs)."""
    comps: dict[str, nn.Module] = {}
    for attr in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, attr, None)
        if isinstance(enc, nn.Module):
            comps[attr] = enc
    comps["denoiser"] = denoiser
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        comps["vae_decode"] = vae.decoder
    return comps


def time_pipeline(run: Callable[[], object], components: Mapping[str, nn.Module], repeats: int,
                  warmup: int = 1, before_each: Callable[[], None] | None = None,
                  host_profile: int = 0) -> dict:
    """Run ``run()`` ``warmup`` + ``repeats`` times; wall time and per-component time of each
    timed run (median, p10/p90 in milliseconds) and the per-run lists.

    ``before_each`` runs untimed before every call (e.g. dropping cached text embeddings so that
    the text encoders run each time). ``host_profile`` > 0: one more, untimed run under cProfile;
    its ``host_profile`` entry lists that many functions with the most host time of their own (where
    ``other`` goes when the GPU waits for Python).
    """
    cuda = torch.cuda.is_available() and any(
        p.is_cuda for m in components.values() for p in m.parameters())
    timer = ComponentTimer(components, cuda)
    runs: dict[str, list[float]] = {"total": [], **{n: [] for n in components}, "other": []}
    gc_enabled = gc.isenabled()
    try:
        for i in range(warmup + repeats):
            if before_each is not None:
                before_each()
            timer.reset()
            # Python's garbage collector stays off while a run is timed (as in timeit): a full
            # collection in a process holding several compiled models is slow, and it would be
            # charged to whichever run (and plan) it happened to interrupt
            gc.collect()
            gc.disable()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                run()
                if cuda:
                    torch.cuda.synchronize()
            finally:
                if gc_enabled:
                    gc.enable()
            total = (time.perf_counter() - t) * 1000
            if i < warmup:
                continue
            parts = timer.totals_ms()
            runs["total"].append(total)
            for n, v in parts.items():
                runs[n].append(v)
            runs["other"].append(total - sum(parts.values()))
    finally:
        timer.remove()
    out = {"breakdown_ms": {n: summarize(v) for n, v in runs.items()}, "runs_ms": runs,
           "repeats": repeats, "warmup": warmup}
    if host_profile > 0:
        out["host_profile"] = profile_host(run, int(host_profile), before_each, cuda)
    return out


def profile_host(run: Callable[[], object], top: int, before_each: Callable[[], None] | None = None,
                 cuda: bool = False) -> list[dict]:
    """One run of ``run()`` under cProfile: the ``top`` functions by host time spent in the function
    itself (milliseconds; the profiler's own overhead inflates them alike)."""
    import cProfile
    import pstats

    if before_each is not None:
        before_each()
    prof = cProfile.Profile()
    prof.enable()
    try:
        run()
        if cuda:
            torch.cuda.synchronize()
    finally:
        prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{file}:{line}({name})", "calls": calls, "own_ms": own * 1000, "cumulative_ms": cum * 1000}
            for (file, line, name), (_, calls, own, cum, _) in rows]
