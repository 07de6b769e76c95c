"""Replay a module's forward from CUDA graphs inside a caller that stays as it is (a diffusers pipeline).

A pipeline calls its denoiser once per step from Python, so a regionally compiled SDXL UNet spends
most of a pipeline call launching kernels (session 30: 39.8 ms per call inside the pipeline against
9.5 ms replayed from a graph), and a quantized plan, with more kernels per layer, loses end to end
what it wins per replay. :func:`graphed_forwards` gives each module a :class:`GraphedForward`: per
call signature (the argument tree, every tensor's shape, strides, dtype and device, every other
argument's value) it captures one CUDA graph over static input buffers; a call copies its tensors
into them, replays, and returns copies of the outputs (a later replay must not change what the
caller holds). Forward hooks stay outside the replay, so component timers time the replay.

A call runs eagerly instead, and the module says why (``eager_reasons``), when an input tensor is
not on the GPU, an argument cannot be part of a signature (not hashable), the output holds
something other than tensors and constants, the capture fails (a host synchronisation inside the
forward), or ``max_graphs`` signatures are captured already. A forward that writes into its input
tensors in place would write into the static copies instead: the pipelines' text encoders, UNets and
VAE decoders do not.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .timing import capture

log = logging.getLogger("mixprec")

_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor | None], outputs: list, spec):
        self.graph, self.inputs, self.outputs, self.spec = graph, inputs, outputs, spec


class GraphedForward:
    """A forward that replays CUDA graphs, one per call signature (see the module docstring)."""

    def __init__(self, forward: Callable[..., Any], name: str = "module", max_graphs: int = 8,
                 warmup: int = 3):
        self.forward, self.name = forward, name
        self.max_graphs, self.warmup = int(max_graphs), int(warmup)
        self.graphs: dict[tuple, _Graph | None] = {}  # None: this signature runs eagerly
        self.eager_reasons: dict[str, int] = {}
        self.replays = 0
        self._pool = None

    def _eager(self, reason: str, *args, **kwargs):
        if reason not in self.eager_reasons:
            log.warning("%s: running eagerly, not from a CUDA graph: %s", self.name, reason)
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1
        return self.forward(*args, **kwargs)

    @staticmethod
    def signature(leaves: list, spec, device_type: str = "cuda") -> tuple | str:
        """The key a graph is captured for, or why there can be none (every input tensor must be on
        ``device_type``)."""
        key: list = [spec]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device.type != device_type:
                    return f"an input tensor is on {leaf.device.type}"
                key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return f"an argument of type {type(leaf).__name__} is not hashable"
                key.append((type(leaf), leaf))
        return tuple(key)

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self.signature(leaves, spec)
        if isinstance(key, str):
            return self._eager(key, *args, **kwargs)
        entry = self.graphs.get(key, ...)
        if entry is ...:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(f"more than max_graphs={self.max_graphs} call signatures", *args, **kwargs)
            entry = self.graphs[key] = self._capture(leaves, spec)
        if entry is None:
            return self._eager("this call signature could not be captured", *args, **kwargs)
        for static, leaf in zip(entry.inputs, leaves):
            if static is not None and static.data_ptr() != leaf.data_ptr():
                static.copy_(leaf)
        entry.graph.replay()
        self.replays += 1
        outs = [o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs]
        return pytree.tree_unflatten(outs, entry.spec)

    def _capture(self, leaves: list, spec) -> _Graph | None:
        inputs = [leaf.detach().clone() if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        args, kwargs = pytree.tree_unflatten([s if s is not None else leaf for s, leaf in zip(inputs, leaves)],
                                             spec)
        held: dict[str, Any] = {}

        def call():
            held["out"] = self.forward(*args, **kwargs)

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph = capture(call, warmup=self.warmup, pool=self._pool)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves this signature eager
            torch.cuda.synchronize()
            log.warning("%s: CUDA graph capture failed (%s: %s); this call signature runs eagerly", self.name,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None
        outputs, out_spec = pytree.tree_flatten(held.pop("out"))
        odd = [type(o).__name__ for o in outputs if not isinstance(o, (torch.Tensor, *_CONSTANT_TYPES))]
        if odd:
            log.warning("%s: the output holds %s; this call signature runs eagerly", self.name, odd[0])
            return None
        log.info("%s: captured a CUDA graph for call signature %d", self.name, len(self.graphs) + 1)
        return _Graph(graph, inputs, outputs, out_spec)

    def summary(self) -> dict:
        return {"graphs": sum(1 for g in self.graphs.values() if g is not None), "replays": self.replays,
                "eager_calls": dict(self.eager_reasons)}


@contextlib.contextmanager
def graphed_forwards(modules: Mapping[str, nn.Module], **options) -> Iterator[dict[str, GraphedForward]]:
    """Within the block, each module's forward replays CUDA graphs (:class:`GraphedForward`);
    the forwards are restored after. Yields the :class:`GraphedForward` per name (their
    ``summary()`` says what was replayed)."""
    if modules and not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device; this machine has none")
    installed: dict[str, GraphedForward] = {}
    saved: list[tuple[nn.Module, bool, Any]] = []
    try:
        for name, module in modules.items():
            had = "forward" in module.__dict__  # compiled modules keep their forward on the instance
            saved.append((module, had, module.__dict__.get("forward")))
            installed[name] = GraphedForward(module.forward, name=name, **options)
            module.forward = installed[name]
        yield installed
    finally:
        for module, had, previous in reversed(saved):
            if had:
                module.forward = previous
            else:
                del module.forward
        for g in installed.values():
            g.graphs.clear()
