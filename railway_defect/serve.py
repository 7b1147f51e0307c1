"""`python -m railway_defect.serve ckpt_path=... [host=127.0.0.1 port=8000]`: the HTTP scoring
service (conf/serve.yaml): POST /predict with images as multipart files, GET /health."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.errors import exit_on_user_error
from railway_defect.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from railway_defect.inference.model import load_predictor
    from railway_defect.inference.predicting import Decision, flip_axes
    from railway_defect.inference.service import create_app

    def build():
        predictor = load_predictor(cfg.model_path, cfg.device, cfg.threshold)
        decision = Decision.from_config(predictor.calibration.threshold, cfg.review_margin, cfg.review_band)
        flips = flip_axes(cfg.tta, list(cfg.tta_flips))
        return create_app(predictor, decision, flips, cfg.max_upload_mb, cfg.max_files)

    app = exit_on_user_error(build)
    log.info("Serving on http://%s:%d (POST /predict, GET /health, docs at /docs).", cfg.host, cfg.port)
    # log_config=None: uvicorn's messages go through Hydra's logging (console and serve.log)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None)


if __name__ == "__main__":
    main()
