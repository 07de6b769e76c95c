"""Timing, memory and environment helpers shared by stage=benchmark and benchmarks/ (CUDA events,
CUDA graphs)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from mixprec.workspace import atomic_write_text


def env_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except Exception:
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:  # the optional kernels of kernels.low_bit=fbgemm
        info["fbgemm_gpu_genai"] = version("fbgemm_gpu_genai")
    except PackageNotFoundError:
        info["fbgemm_gpu_genai"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    return info


def summarize(ms: list[float]) -> dict:
    s = sorted(ms)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(s), "p10_ms": q(0.1), "p90_ms": q(0.9), "min_ms": s[0],
            "max_ms": s[-1], "std_ms": statistics.pstdev(s), "n": len(s)}


def capture(fn: Callable[[], object], warmup: int = 3, pool=None) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream (compiles, autotunes, allocates) and capture it in a graph
    (``pool``: a memory pool shared with other graphs replayed one at a time)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    torch.cuda.synchronize()
    return g


def time_graph(g: torch.cuda.CUDAGraph, iters: int = 50, warmup: int = 10, back_to_back: int = 20) -> dict:
    """Per-replay times (CUDA events around each replay) and the mean of back-to-back replays."""
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    out = summarize(times)
    if back_to_back:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(back_to_back):
            g.replay()
        b.record()
        b.synchronize()
        out["back_to_back_ms"] = a.elapsed_time(b) / back_to_back
    return out


def time_fn(fn: Callable[[], object], iters: int = 50, warmup: int = 10) -> dict:
    """Time ``fn`` inside a CUDA graph (the launch gaps of many small kernels would otherwise dominate)."""
    g = capture(fn)
    try:
        return time_graph(g, iters, warmup)
    finally:
        del g


class Clock:
    """Wall-clock budget for one device command: steps ask whether they still fit."""

    def __init__(self, budget_s: float):
        self.t0 = time.time()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def write_json(path: str | os.PathLike | None, obj) -> None:
    if not path:
        return
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))
