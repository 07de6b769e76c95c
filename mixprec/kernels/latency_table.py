"""Per-layer latency of every (weight bits, activation bits) choice, measured on the kernels that
would run it, and the latency a plan is predicted to take from it.

For a denoiser at one resolution and batch size: one forward pass records the input shape of every
quantizable layer; layers of identical geometry and input shape are measured once. Each (layer,
choice) is the module :func:`mixprec.kernels.convert_` would build for that choice (the dense
16-bit layer for ``w16a16``), called on a random input of the recorded shape. On CUDA the calls go
into one CUDA graph over enough copies of the module that its weights stream from memory as in the
whole model (not from L2), and the graph's median replay time is divided by the copies: launch
gaps are those of a graph, as in the whole-model timing. The whole 16-bit denoiser is timed the
same way (eager kernels in a CUDA graph), so

    predicted(plan) = model_ms - sum_l t_l(w16a16) + sum_l t_l(plan's choice for l)

keeps everything the layers do not cover (attention, norms, the rest) at its measured time. On a
CPU the host clock is used: the table and predictions are then only good for tests.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from mixprec.quantizers import QuantLayer, quant_layers, set_plan

from .convert import BackendConfig, choose_backend, convert_
from .layers import KernelLayer
from .timing import env_info, time_fn

FULL = "w16a16"
# The share of a latency budget a plan's prediction keeps free when the user sets none. Measured on an
# H200, whole SDXL UNet compiled per region: uncalibrated tables predicted plans 0.7-2.4 % under their
# measured time (session 30), calibrated ones (quantized_layer_ms) 0.3-0.7 % under (session 31).
HEADROOM_UNCALIBRATED = 0.03
HEADROOM_CALIBRATED = 0.01
STREAM_BYTES = 96 * 2 ** 20  # > the L2 of an H100/H200 (50 MiB): weights come from HBM


def choice_key(w_bits: int | None, a_bits: int | None) -> str:
    """``w8a8``, ``w4a16``; None (unquantized) is written 16."""
    return f"w{w_bits or 16}a{a_bits or 16}"


def parse_choice(key: str) -> tuple[int | None, int | None]:
    s = key.strip().lower()
    if not (s.startswith("w") and "a" in s):
        raise ValueError(f"latency choice {key!r}: write it as wXaY, e.g. w8a8 or w4a16")
    w, a = (int(v) for v in s[1:].split("a", 1))
    return (None if w >= 16 else w), (None if a >= 16 else a)


@dataclass
class LatencyTable:
    """``ms[layer][choice]``: the latency of each layer at each choice; ``model_ms``: the whole
    16-bit denoiser timed the same way; ``meta``: resolution, batch, device, versions, settings."""

    ms: dict[str, dict[str, float]]
    model_ms: float
    meta: dict[str, Any] = field(default_factory=dict)
    # what each quantized layer costs inside the whole model beyond its time alone (launches, the gaps
    # between kernels a graph cannot hide), from one whole-model measurement: :func:`calibrate_overhead`
    quantized_layer_ms: float = 0.0

    @property
    def choices(self) -> list[str]:
        return list(self.meta.get("choices") or next(iter(self.ms.values()), {}).keys())

    @property
    def rest_ms(self) -> float:
        """What the quantizable layers do not cover: attention, norms, activations, launch gaps."""
        return self.model_ms - sum(row[FULL] for row in self.ms.values())

    @property
    def calibrated(self) -> bool:
        """Whether ``quantized_layer_ms`` comes from a whole-model measurement (:func:`calibrate_overhead`)."""
        return "measured_ms" in (self.meta.get("calibration") or {})

    @property
    def default_headroom(self) -> float:
        return HEADROOM_CALIBRATED if self.calibrated else HEADROOM_UNCALIBRATED

    def _cost(self, key: str, ms: float) -> float:
        """What a choice measured at ``ms`` alone adds to the whole model (see ``plan_ms``)."""
        return ms if key == FULL else max(0.0, ms + self.quantized_layer_ms)

    @property
    def plan_ms(self) -> dict[str, dict[str, float]]:
        """What each layer's choice adds to the whole model: its measured time, plus
        ``quantized_layer_ms`` for a quantized choice. Predictions and the latency solver use these."""
        return {layer: {k: self._cost(k, v) for k, v in row.items()} for layer, row in self.ms.items()}

    def uniform_ms(self) -> dict[str, float]:
        """The predicted denoiser latency with every layer at one choice, per choice (NaN where a layer
        lacks it)."""
        rows = self.plan_ms.values()
        return {c: self.rest_ms + sum(row.get(c, math.nan) for row in rows) for c in self.choices}

    def fastest_ms(self, choices: Sequence[str]) -> float:
        """The denoiser's predicted latency with every layer at its fastest of ``choices`` (16 bit
        always allowed): the smallest latency budget the table can meet with them."""
        allowed = [FULL, *choices]
        return self.rest_ms + sum(min(row[c] for c in allowed if c in row) for row in self.plan_ms.values())

    def fastest_plan(self) -> dict[str, str]:
        """Each layer's fastest choice by its measured time alone (layer -> choice key)."""
        return {layer: min(row, key=lambda k: (row[k], k != FULL)) for layer, row in self.ms.items()}

    def layer_ms(self, layer: str, w_bits: int | None, a_bits: int | None) -> float:
        row = self.ms.get(layer)
        if row is None:
            raise KeyError(f"layer {layer!r} is not in the latency table; rerun stage=latency_table for this model")
        key = choice_key(w_bits, a_bits)
        if key not in row:
            raise KeyError(f"layer {layer!r} has no latency for {key} (table choices: {sorted(row)}); rerun "
                           f"stage=latency_table with {key} in stage.choices")
        return self._cost(key, row[key])

    def predict_ms(self, weight_bits: Mapping[str, int | None], act_bits: Mapping[str, int | None]) -> float:
        """Predicted denoiser latency of a plan (layers missing from both plans stay 16-bit)."""
        total = self.rest_ms
        for layer in self.ms:
            w, a = weight_bits.get(layer), act_bits.get(layer)
            total += self.layer_ms(layer, None if w is None or w >= 16 else w, None if a is None or a >= 16 else a)
        return total

    def to_json(self) -> dict:
        return {"meta": self.meta, "model_ms": self.model_ms, "rest_ms": self.rest_ms,
                "quantized_layer_ms": self.quantized_layer_ms, "ms": self.ms}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "latency table") -> "LatencyTable":
        if not isinstance(data, Mapping) or "ms" not in data or "model_ms" not in data:
            raise ValueError(f"{source} is not a latency table (expected 'ms' and 'model_ms'); rerun "
                             f"stage=latency_table")
        ms = {l: {k: float(v) for k, v in row.items()} for l, row in data["ms"].items()}
        bad = [l for l, row in ms.items() if FULL not in row or any(not math.isfinite(v) or v < 0 for v in row.values())]
        if bad:
            raise ValueError(f"{source}: layers {bad[:5]} lack a {FULL} time or have invalid times; rerun "
                             f"stage=latency_table")
        overhead = float(data.get("quantized_layer_ms") or 0.0)
        if not math.isfinite(overhead):
            raise ValueError(f"{source}: quantized_layer_ms is {overhead}; rerun stage=latency_table")
        return cls(ms=ms, model_ms=float(data["model_ms"]), meta=dict(data.get("meta") or {}),
                   quantized_layer_ms=overhead)


# ---------------------------------------------------------------------------- measuring

@torch.no_grad()
def layer_input_shapes(model: nn.Module, layers: Mapping[str, QuantLayer], kwargs: Mapping[str, Any]) -> dict:
    """The input shape of each layer's (first) call in one forward pass of ``model(**kwargs)``."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, layer in layers.items():
        def hook(_m, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _geometry(layer: QuantLayer, shape: tuple[int, ...]) -> tuple:
    inner = layer.inner
    conv = (inner.stride, inner.padding) if isinstance(inner, nn.Conv2d) else ()
    return (type(inner).__name__, tuple(inner.weight.shape), conv, inner.bias is not None, layer.skip_first_token, shape)


def _module_for(layer: QuantLayer, w_bits: int | None, a_bits: int | None, backend: BackendConfig) -> nn.Module:
    """What convert_ would put in the layer's place for this choice."""
    if w_bits is None and a_bits is None:
        return layer.inner
    name, reason = choose_backend(layer.inner, w_bits, a_bits, backend)
    saved = (layer.w_bits, layer.a_bits)
    layer.set_bits(w_bits, a_bits)
    try:
        return KernelLayer.from_quant_layer(layer, name, **backend.build_kwargs())
    finally:
        layer.set_bits(*saved)
        layer.drop_cache()


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _producer(t: torch.Tensor) -> torch.Tensor:
    """A pointwise op before the layer: under compile the layer's activation quantization fuses into
    it, as it fuses into a norm or GELU in the model."""
    return t * 1.0009765625


def _host_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@torch.no_grad()
def time_module(module: nn.Module, x: torch.Tensor, iters: int, warmup: int, compile_backend: str | None = None,
                producer_cache: dict | None = None) -> float:
    """Milliseconds per call of ``module(x)``: a CUDA graph over weight-streaming copies on CUDA,
    the host clock's median elsewhere. With ``compile_backend`` (e.g. ``"inductor"``) the layer is
    compiled once behind a pointwise producer, with its parameters and buffers as graph inputs
    (``torch.func.functional_call``), so every copy reuses one compiled graph; the producer alone,
    compiled the same way, is subtracted (timed once per input shape when ``producer_cache`` is
    given): the layer's time when its input quantization is fused into the op that made the input."""
    copies = 1 if not x.is_cuda else max(2, min(48, math.ceil(STREAM_BYTES / max(1, _weight_bytes(module)))))
    mods = [module] + [copy.deepcopy(module) for _ in range(copies - 1)]
    run = time_fn if x.is_cuda else (lambda fn, i, w: {"median_ms": _host_ms(fn, i, w)})
    if compile_backend is None:
        return run(lambda: [m(x) for m in mods], iters, warmup)["median_ms"] / copies
    states = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in mods]
    # a fresh Dynamo cache: this function's lambda is one code object whatever the module, and its
    # per-module recompiles would otherwise hit the recompile limit and silently run eager
    torch._dynamo.reset()
    layer = torch.compile(lambda state, t: torch.func.functional_call(module, state, (_producer(t),)),
                          backend=compile_backend, dynamic=False)
    ms = run(lambda: [layer(st, x) for st in states], iters, warmup)["median_ms"] / copies
    key = (tuple(x.shape), x.dtype, str(x.device), x.stride(), compile_backend)
    if producer_cache is None or key not in producer_cache:
        alone = torch.compile(_producer, backend=compile_backend, dynamic=False)
        alone_ms = run(lambda: [alone(x) for _ in range(copies)], iters, warmup)["median_ms"] / copies
        if producer_cache is None:
            return max(ms - alone_ms, 0.0)
        producer_cache[key] = alone_ms
    return max(ms - producer_cache[key], 0.0)


def _random_input(shape: tuple[int, ...], device, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if x.dim() == 4 and x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def geometry_key(layer: QuantLayer, shape: tuple[int, ...], choice: str) -> str:
    """The string a measured (geometry, choice) is saved under in a partial table (JSON keys)."""
    return repr((_geometry(layer, shape), choice))


def measure_layers(layers: Mapping[str, QuantLayer], shapes: Mapping[str, tuple[int, ...]], choices: Sequence[str],
                   backend: BackendConfig, iters: int = 20, warmup: int = 3,
                   compile_backend: str | None = None, done: MutableMapping[str, list] | None = None,
                   on_measured: Callable[[MutableMapping[str, list]], None] | None = None,
                   progress: bool = False) -> tuple[dict, dict]:
    """``(ms, paths)``: ``ms[layer][choice]`` for every layer in ``shapes``, identical geometries
    measured once; ``paths[layer][choice]`` is the backend the choice runs on.

    ``done``: measurements saved earlier (``{geometry_key: [ms, path]}``, e.g. from an interrupted
    run), reused and extended in place; ``on_measured(done)`` is called after each new geometry, so
    a caller can save it and a rerun resumes where the last one stopped."""
    done = {} if done is None else done
    producers: dict = {}
    ms: dict[str, dict[str, float]] = {}
    paths: dict[str, dict[str, str]] = {}
    todo = {geometry_key(layers[n], s, c) for n, s in shapes.items() for c in choices} - set(done)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="latency table (geometries x choices)", leave=False)
    for name, shape in shapes.items():
        layer = layers[name]
        p = layer.inner.weight
        ms[name], paths[name] = {}, {}
        for key in choices:
            w, a = parse_choice(key)
            geo = geometry_key(layer, shape, key)
            if geo not in done:
                module = _module_for(layer, w, a, backend)
                how = module.spec.backend if isinstance(module, KernelLayer) else "fp"
                x = _random_input(shape, p.device, p.dtype, seed=len(done))
                done[geo] = [time_module(module, x, iters, warmup, compile_backend, producers), how]
                del module
                if on_measured is not None:
                    on_measured(done)
                if bar is not None:
                    bar.update()
            ms[name][key], paths[name][key] = float(done[geo][0]), str(done[geo][1])
    if bar is not None:
        bar.close()
    return ms, paths


def measure_latency_table(model: nn.Module, layers: Mapping[str, QuantLayer], example_kwargs: Mapping[str, Any],
                          choices: Iterable[str], backend: BackendConfig | None = None, iters: int = 20,
                          warmup: int = 3, meta: Mapping[str, Any] | None = None,
                          compile_backend: str | None = None, regions: Sequence[str] | None = None,
                          done: MutableMapping[str, list] | None = None,
                          on_measured: Callable[[MutableMapping[str, list]], None] | None = None,
                          progress: bool = False, calibrate: bool = False) -> LatencyTable:
    """The table for ``model`` (its QuantLayers calibrated, their plan cleared) at the input
    ``example_kwargs`` describes (resolution, batch). ``choices``: e.g. ``["w16a16", "w8a8", "w4a16"]``
    (``w16a16`` is always measured). ``compile_backend``: measure layers and model under
    torch.compile (see :func:`time_module`); None: eager kernels. ``regions``: with ``compile_backend``,
    the whole model is compiled per repeated block (:func:`mixprec.kernels.regional.compile_regions`,
    in place) instead of whole, the way ``stage=benchmark stage.compile=regional`` times plans.
    ``done`` / ``on_measured`` / ``progress``: see :func:`measure_layers` (resuming a cut run).
    ``calibrate``: also time the table's fastest plan as a whole and set ``quantized_layer_ms``
    (:func:`calibrate_overhead`; a copy of ``model`` is converted for it)."""
    backend = backend or BackendConfig()
    keys = [FULL] + [k for k in (choice_key(*parse_choice(c)) for c in choices) if k != FULL]
    keys = list(dict.fromkeys(keys))
    for layer in layers.values():
        if layer.w_bits is not None or layer.a_bits is not None:
            raise ValueError(f"{layer.name} has a plan set ({layer.w_bits}, {layer.a_bits}): clear it (set_plan(layers)) "
                             f"so the whole-model time is the 16-bit one")
    shapes = layer_input_shapes(model, layers, example_kwargs)
    spare = copy.deepcopy(model) if calibrate else None  # before the timing below compiles ``model`` in place
    t0 = time.perf_counter()
    ms, paths = measure_layers(layers, shapes, keys, backend, iters, warmup, compile_backend, done, on_measured,
                               progress)
    p = next(model.parameters())
    model_ms = model_latency_ms(model, example_kwargs, iters, warmup, compile_backend, regions)
    info = {"choices": keys, "backend": backend.to_dict(), "iters": iters, "warmup": warmup, "env": env_info(),
            "compile_backend": compile_backend, "regions": list(regions) if regions else None,
            "device": str(p.device), "dtype": str(p.dtype), "measure_s": time.perf_counter() - t0,
            "paths": paths, **dict(meta or {})}
    table = LatencyTable(ms=ms, model_ms=model_ms, meta=info)
    if spare is not None:
        table = calibrate_overhead(table, spare, example_kwargs, backend, iters, warmup, compile_backend, regions)
        table.meta["measure_s"] = time.perf_counter() - t0
    return table


def calibrate_overhead(table: LatencyTable, model: nn.Module, example_kwargs: Mapping[str, Any],
                       backend: BackendConfig, iters: int = 20, warmup: int = 3, compile_backend: str | None = None,
                       regions: Sequence[str] | None = None) -> LatencyTable:
    """``table`` with ``quantized_layer_ms`` set from one whole-model measurement.

    A layer timed alone leaves out what it costs inside the whole model: its extra launches and the
    gaps a CUDA graph still has between them (session 30: predictions 0.7-2.4 % under the measured
    plans, growing with the number of quantized layers, about 1.2 us each). ``model`` (calibrated
    QuantLayers, plan cleared; converted and compiled in place here, so pass a copy) runs the table's
    fastest plan (:meth:`LatencyTable.fastest_plan`), timed as ``model_ms`` was; the difference to the
    table's prediction, spread over its quantized layers, is the overhead per quantized layer.
    Without any layer faster quantized there is nothing to time: the table comes back with
    ``quantized_layer_ms`` 0 and the reason under ``meta["calibration"]``.
    """
    fastest = table.fastest_plan()
    plan = {layer: key for layer, key in fastest.items() if key != FULL}
    if not plan:
        return LatencyTable(ms=table.ms, model_ms=table.model_ms, quantized_layer_ms=0.0,
                            meta={**table.meta, "calibration": {"skipped": "no layer is faster quantized"}})
    layers = quant_layers(model)
    missing = sorted(set(plan) - set(layers))
    if missing:
        raise ValueError(f"calibrate_overhead: the model has no layer {missing[0]!r} of the table; pass the "
                         f"model the table was measured on")
    choices = {layer: parse_choice(key) for layer, key in plan.items()}
    set_plan(layers, {l: w for l, (w, _) in choices.items()}, {l: a for l, (_, a) in choices.items()})
    convert_(model, backend, example_kwargs=dict(example_kwargs))
    measured = model_latency_ms(model, example_kwargs, iters, warmup, compile_backend, regions)
    predicted = table.rest_ms + sum(table.ms[layer][key] for layer, key in fastest.items())
    overhead = (measured - predicted) / len(plan)
    info = {"plan": "fastest", "quantized_layers": len(plan), "predicted_ms": predicted, "measured_ms": measured,
            "quantized_layer_ms": overhead}
    return LatencyTable(ms=table.ms, model_ms=table.model_ms, quantized_layer_ms=overhead,
                        meta={**table.meta, "calibration": info})


@torch.no_grad()
def model_latency_ms(model: nn.Module, kwargs: Mapping[str, Any], iters: int = 20, warmup: int = 3,
                     compile_backend: str | None = None, regions: Sequence[str] | None = None) -> float:
    """Median milliseconds of ``model(**kwargs)``, timed as the table's rows are (CUDA graph on CUDA,
    host clock elsewhere; compiled with ``compile_backend``, whole or, with ``regions``, per repeated
    block in place): what :meth:`LatencyTable.predict_ms` predicts when the table was measured the
    same way."""
    if compile_backend is not None and regions:
        from .regional import compile_regions
        compile_regions(model, regions, backend=compile_backend, dynamic=False)
        fn = model
    else:
        fn = model if compile_backend is None else torch.compile(model, backend=compile_backend, dynamic=False)
    if any(t.is_cuda for t in itertools.chain(model.parameters(), model.buffers())):
        return time_fn(lambda: fn(**kwargs), iters, warmup)["median_ms"]
    return _host_ms(lambda: fn(**kwargs), iters, warmup)
