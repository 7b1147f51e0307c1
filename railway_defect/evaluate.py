"""`python -m railway_defect.evaluate ckpt_path=...`: metrics with intervals, operating threshold and
temperature for a checkpoint (conf/evaluate.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.commands import call_with_config, run_command
from railway_defect.utils.paths import CONFIG_DIR

# evaluate.yaml's sections searched for run_evaluation's parameters, and the keys read here
EVALUATE_CONFIG = (("data",), ("data.root",))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from railway_defect.evaluation.report import run_evaluation

    # the keys of evaluate.yaml, then of its data section (val_fraction, cache_dir, batch_size)
    run_command(lambda: call_with_config(run_evaluation, cfg, *EVALUATE_CONFIG, data_root=cfg.data.root))


if __name__ == "__main__":
    main()
