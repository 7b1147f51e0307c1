"""`python -m railway_defect.predict ckpt_path=... input=PATH output=predictions.csv`: one CSV row per
image or video frame (conf/predict.yaml). Exit code 0: every input scored; 2: some could not be read
(their rows carry the error); 1: nothing was scored."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.commands import call_with_config, run_command
from railway_defect.utils.errors import UserError
from railway_defect.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)
EXIT_SOME_FAILED = 2


# no sections; ckpt_path reaches run_prediction as model_path's default (conf/inference)
PREDICT_CONFIG = ((), ("ckpt_path",))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    from railway_defect.inference.predicting import run_prediction

    def run():
        if not cfg.input:
            raise UserError("Give what to score: input=IMAGE|FOLDER|GLOB|VIDEO.")
        return call_with_config(run_prediction, cfg, *PREDICT_CONFIG, input=str(cfg.input))

    summary = run_command(run)
    log.info(
        "%d rows written to %s: %d positive, %d to review, %d unreadable.",
        summary.rows,
        summary.output,
        summary.positives,
        summary.needs_review,
        summary.failed,
    )
    if summary.failed:
        raise SystemExit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    main()
