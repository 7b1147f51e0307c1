"""`python -m railway_defect.evaluate ckpt_path=...`: metrics with intervals, operating threshold and
temperature for a checkpoint (conf/evaluate.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.errors import exit_on_user_error
from railway_defect.utils.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from railway_defect.evaluation.report import run_evaluation

    exit_on_user_error(
        lambda: run_evaluation(
            cfg.ckpt_path,
            cfg.data.root,
            split=cfg.split,
            target_recall=cfg.target_recall,
            output_dir=cfg.output_dir,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.seed,
            splits=cfg.splits,
            cache_dir=cfg.data.cache_dir,
            batch_size=cfg.data.batch_size,
            bins=cfg.ece_bins,
            confidence=cfg.confidence,
            bootstrap=cfg.bootstrap,
            store_calibration=cfg.store_calibration,
            device=cfg.device,
        )
    )


if __name__ == "__main__":
    main()
