"""`python -m railway_defect.serve ckpt_path=... [host=127.0.0.1 port=8000]`: the HTTP scoring
service (conf/serve.yaml): POST /predict with images as multipart files, GET /health."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.commands import call_with_config, run_command
from railway_defect.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)


# ckpt_path reaches build_service as model_path's default; uvicorn takes host, port and log_level
SERVE_CONFIG = ((), ("ckpt_path", "host", "port", "log_level"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from railway_defect.inference.service import build_service

    app = run_command(lambda: call_with_config(build_service, cfg, *SERVE_CONFIG))
    log.info("Serving on http://%s:%d (POST /predict, GET /health, docs at /docs).", cfg.host, cfg.port)
    # log_config=None: uvicorn's messages go through Hydra's logging (console and serve.log)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None)


if __name__ == "__main__":
    main()
