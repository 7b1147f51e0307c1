"""`python -m railway_defect.train`: train a defect classifier from the Hydra config in conf/."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from railway_defect.training import run_training  # heavy imports only once the config is valid

    return exit_on_user_error(lambda: run_training(cfg))


if __name__ == "__main__":
    main()
