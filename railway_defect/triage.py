"""`python -m railway_defect.triage ckpt_path=... input=PHOTOS [order=defect]`: a local web page to
review photos one at a time and label them by keyboard (conf/triage.yaml); the labels go to
`<run>/triage.sqlite`, which `train data.labels=...` reads. `export=manifest` writes the labels
to `output` instead of serving, `export=label_studio` the queue as Label Studio tasks."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.commands import run_command
from railway_defect.utils.errors import UserError
from railway_defect.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)


def _prepare(cfg: DictConfig):
    from railway_defect.labelling.app import build_app
    from railway_defect.labelling.session import access_token, export, model_for, open_store

    predictor = model_for(cfg.model_path, cfg.device, cfg.threshold)
    store = open_store(cfg.db, cfg.input, cfg.order, predictor, cfg.every_s, cfg.batch_size, cfg.rebuild)
    if cfg.export:
        if not cfg.output:
            raise UserError(f"export={cfg.export} writes to output=FILE; give one.")
        return export(store, cfg.export, cfg.output, cfg.document_root), None
    token = access_token(cfg.host, cfg.token)
    return build_app(store, predictor, token, loopback_only=token is None), token


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="triage")
def main(cfg: DictConfig) -> None:
    import uvicorn

    app, token = run_command(lambda: _prepare(cfg))
    if cfg.export:
        return
    address = f"http://{cfg.host}:{cfg.port}/" + (f"?token={token}" if token else "")
    # printed, not only logged: the address (and its token) is what the user opens
    print(f"Triage: open {address}  (labels: {cfg.db}; Ctrl-C stops, nothing is lost)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None)


if __name__ == "__main__":
    main()
