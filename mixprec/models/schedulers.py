"""Schedulers by name, and the ``model.scheduler`` overrides applied over a pipeline's own."""

from __future__ import annotations

from typing import Any


def scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") or n.endswith("SchedulerMultistep"))
        raise ValueError(f"model.scheduler.class={name!r} is not a diffusers scheduler; known: {', '.join(known)}")
    return cls


def _check_scheduler_options(cls: type, options: dict[str, Any]) -> None:
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - accepted)
    if unknown:  # from_config would drop them silently
        raise ValueError(f"model.scheduler options {unknown} are not options of {cls.__name__}; "
                         f"it takes {sorted(accepted)}")


def scheduler_overrides(overrides: dict[str, Any]) -> tuple[type | None, dict[str, Any]]:
    """(class or None, config overrides) of a ``model.scheduler`` mapping, checked against the class."""
    rest = dict(overrides)
    name = rest.pop("class", None)
    cls = scheduler_class(name) if name is not None else None
    if cls is not None:
        _check_scheduler_options(cls, rest)
    return cls, rest


def configured_scheduler(current, overrides: dict[str, Any]):
    """``current`` with ``overrides`` (see ModelSpec.scheduler) applied; a new scheduler object."""
    cls, rest = scheduler_overrides(overrides)
    cls = cls or type(current)
    _check_scheduler_options(cls, rest)
    return cls.from_config({**dict(current.config), **rest})


def make_scheduler(config: dict[str, Any]):
    """A scheduler from a shipped config (``_class_name`` picks the class)."""
    config = dict(config)
    return scheduler_class(config.pop("_class_name", "EulerDiscreteScheduler")).from_config(config)
