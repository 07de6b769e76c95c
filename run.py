"""mixprec's one entrypoint: `python run.py [stage=NAME] [model=NAME] [key=value ...]`.

Examples:
    python run.py                                         # whole pipeline on the built-in tiny model
    python run.py stage=inspect model=sdxl_turbo model.weights=random
    python run.py -m stage=allocate stage.target=3,4,5 stage.K=1,2 stage.seed=0,1,2
    python run.py --help                                  # stages, main options, examples
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("mixprec")


def _launcher_jobs() -> int | None:
    """Jobs a multirun launcher runs at once on this machine (joblib's n_jobs), when known."""
    from hydra.core.hydra_config import HydraConfig

    try:
        launcher = HydraConfig.get().launcher
    except ValueError:
        return None
    jobs = launcher.get("n_jobs") if launcher is not None else None
    return int(jobs) if isinstance(jobs, int) and jobs > 0 else None


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        # Threads first: torch reads the OpenMP settings once, when it is imported (by the runner).
        from mixprec import threads
        # The tiny models: one thread. The built-in compose model (434 layers, 128x128) is large enough
        # to split over cores (its CPU pipeline is mostly batched UNet GEMMs and convolutions).
        source, name = str(cfg.model.get("source")), str(cfg.model.get("name"))
        small = source == "tiny_random" or (source == "builtin" and name != "compose")
        threads.apply(threads.resolve(cfg.get("threads"), _launcher_jobs(), small_model=small))
        from mixprec.runner import run_stage

        run_stage(cfg)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, NotImplementedError, PermissionError) as exc:
        # Bad input ends with the message that says what to do, not a traceback.
        log.error("%s: %s", type(exc).__name__, exc)
        if log.isEnabledFor(logging.DEBUG):
            raise
        sys.exit(2)


if __name__ == "__main__":
    from mixprec.settings import check_command_line

    check_command_line(sys.argv[1:])
    main()
