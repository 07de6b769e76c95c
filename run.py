"""mixprec's one entrypoint: `python run.py [stage=NAME] [model=NAME] [key=value ...]`.

Examples:
    python run.py                                         # whole pipeline on the built-in tiny model
    python run.py stage=inspect model=sdxl_turbo model.weights=random
    python run.py -m stage=allocate stage.target=3,4,5 stage.K=1,2 stage.seed=0,1,2
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("mixprec")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from mixprec.runner import run_stage

    try:
        run_stage(cfg)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, NotImplementedError) as exc:
        # Bad input ends with the message that says what to do, not a traceback.
        log.error("%s: %s", type(exc).__name__, exc)
        if log.isEnabledFor(logging.DEBUG):
            raise
        sys.exit(2)


if __name__ == "__main__":
    main()
