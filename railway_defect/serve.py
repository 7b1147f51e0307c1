"""`python -m railway_defect.serve ckpt_path=... [host=127.0.0.1 port=8000]`: the HTTP scoring
service (conf/serve.yaml): POST /predict with images as multipart files, GET /health."""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.commands import call_with_config, run_command
from railway_defect.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)


# ckpt_path reaches build_service as model_path's default; uvicorn takes the rest
SERVE_CONFIG = ((), ("ckpt_path", "host", "port", "log_level", "workers", "shutdown_grace_s"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from railway_defect.inference.service import SERVICE_ARGUMENTS_ENV, build_service

    # built here first, so that a bad model or setting fails in one line before any worker starts
    app: Any = run_command(lambda: call_with_config(build_service, cfg, *SERVE_CONFIG))
    if cfg.workers > 1:  # each worker process builds its own app (and model) from the same arguments
        takes = inspect.signature(build_service).parameters
        arguments = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k in takes}
        os.environ[SERVICE_ARGUMENTS_ENV] = json.dumps(arguments)
        app = "railway_defect.inference.service:service_from_environment"
    log.info(
        "Serving on http://%s:%d (POST /predict, GET /health, /metrics, docs at /docs).", cfg.host, cfg.port
    )
    # log_config=None: uvicorn's messages go through Hydra's logging (console and serve.log); on
    # SIGTERM it stops accepting and lets the requests in flight finish for shutdown_grace_s
    uvicorn.run(
        app,
        factory=cfg.workers > 1,
        workers=cfg.workers,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        log_config=None,
        timeout_graceful_shutdown=cfg.shutdown_grace_s,
    )


if __name__ == "__main__":
    main()
