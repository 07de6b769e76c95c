"""End-to-end pipeline timing with a per-component breakdown (text encoders, denoiser, VAE decode).

Each component is timed by forward hooks around its module: CUDA events on a GPU (read after the
run's final synchronize, so the hooks add no synchronization), the host clock elsewhere. A
component called several times per image (the denoiser, once per step) is summed per run. What is
left of the run's wall time (scheduler, latents, tokenizers, host overhead) is ``other``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

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
                  host_profile: int = 0, trace_path: Path | None = None) -> dict:
    """Run ``run()`` ``warmup`` + ``repeats`` times; wall time and per-component time of each
    timed run (median, p10/p90 in milliseconds) and the per-run lists.

    ``before_each`` runs untimed before every call (e.g. dropping cached text embeddings so that
    the text encoders run each time). ``host_profile`` > 0: one more, untimed run under cProfile;
    its ``host_profile`` entry lists that many functions with the most host time of their own (where
    ``other`` goes when the GPU waits for Python). ``trace_path``: one more, untimed run under
    torch.profiler, its timeline written there (:func:`trace_run`).
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
    if trace_path is not None:
        out["trace"] = trace_run(run, Path(trace_path), before_each, cuda)
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


def busy_ms(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals in microseconds, as milliseconds (overlapping
    kernels on several streams count once)."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):  # by start: each interval adds only what lies past the union so far
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total / 1000


def trace_run(run: Callable[[], object], path: Path, before_each: Callable[[], None] | None = None,
              cuda: bool = False) -> dict:
    """One run of ``run()`` under torch.profiler: its timeline as a Chrome / Perfetto trace at ``path``,
    and the run's wall time against the time the GPU was busy (the union of its kernels, memcpys and
    memsets). A GPU idle for much of the wall time means the host sets the pace: time the GPU saves
    then shows up as host time (``other``), not as a shorter run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if before_each is not None:
        before_each()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1000
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    out = {"file": str(path), "wall_ms": wall, "gpu_busy_ms": None, "gpu_idle_ms": None}
    if cuda:
        busy = busy_ms((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
        out.update(gpu_busy_ms=busy, gpu_idle_ms=wall - busy)
    return out
