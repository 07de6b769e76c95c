"""How many CPU threads a mixprec process uses, decided before torch starts its thread pools.

PyTorch's default is one intra-op thread per core of the machine, each spinning while it waits
for work. On a machine where other work also runs (a second experiment, the jobs of a parallel
multirun, anything else) the threads fight for the same cores and every barrier waits for a
descheduled thread: on a 2-core machine with one busy core the tiny pipeline ran 10x slower
than with one thread. The policy here:

* cores = the cores this process may run on (``os.sched_getaffinity``, so ``taskset`` and
  container CPU sets count), divided by the jobs running at once (``MIXPREC_PARALLEL_JOBS``, or
  the multirun launcher's ``n_jobs``), minus the cores other processes keep busy (the 1-minute
  load average, rounded), at least 1;
* waiting threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the user set
  their own policy;
* the built-in tiny models get one thread: their layers are too small for a second thread to pay,
  and on a busy machine every layer would wait a scheduler time slice for a descheduled sibling;
* ``threads=<n>`` in the config (or ``OMP_NUM_THREADS`` in the environment) wins over the guess.

Nothing here imports torch: :func:`apply` must run before the first ``import torch`` for the
environment variables to reach the OpenMP runtime; it also sets torch's pools when torch is
already loaded.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("mixprec")

PARALLEL_JOBS_ENV = "MIXPREC_PARALLEL_JOBS"


def usable_cores() -> int:
    """Cores the scheduler lets this process run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores(cores: int) -> int:
    """Cores other processes keep busy, from the 1-minute load average (0 when unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0
    return min(cores - 1, max(0, int(load + 0.5)))


def auto_threads(parallel_jobs: int = 1, cores: int | None = None, busy: int | None = None) -> int:
    """Threads for one job: its share of the usable cores, less the busy ones, at least 1."""
    cores = usable_cores() if cores is None else cores
    busy = busy_cores(cores) if busy is None else busy
    return max(1, min(cores // max(1, parallel_jobs), cores - busy))


def parallel_jobs(launcher_jobs: int | None = None) -> int:
    """Jobs running at once on this machine: ``MIXPREC_PARALLEL_JOBS``, else the launcher's count."""
    env = os.environ.get(PARALLEL_JOBS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError as exc:
            raise ValueError(f"{PARALLEL_JOBS_ENV}={env!r} is not a whole number of jobs; "
                             f"set it to how many mixprec jobs run at once (e.g. 2)") from exc
    return max(1, int(launcher_jobs or 1))


def resolve(setting: int | str | None, launcher_jobs: int | None = None, small_model: bool = False) -> int:
    """The thread count for the config value ``threads`` (an integer, or ``auto``/null)."""
    if setting in (None, "auto"):
        env = os.environ.get("OMP_NUM_THREADS")
        if env and env.isdigit() and int(env) > 0:
            return int(env)
        return 1 if small_model else auto_threads(parallel_jobs(launcher_jobs))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"threads={setting!r}: expected a whole number >= 1 or 'auto' "
                         f"(e.g. `python run.py threads=1`)")
    return setting


def apply(threads: int) -> int:
    """Use ``threads`` intra-op threads with sleeping waits, before or after torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # MKL otherwise picks fewer threads when the machine is busy: another summation order, so
    # the same run could give other images on a busy machine
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # only settable before the first inter-op work
            pass
    log.info("CPU threads: %d (usable cores %d; `threads=` sets it)", threads, usable_cores())
    return threads
