"""The configs of evaluate, predict, export and serve compose with their documented defaults, and the
commands fail with one clear line when the model or the input is missing."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, run_cli


def composed(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_defaults() -> None:
    evaluate = composed("evaluate")
    assert evaluate.target_recall == 0.95 and evaluate.split is None and evaluate.data.val_fraction == 0.2
    predict = composed("predict", "ckpt_path=run/best.ckpt")
    assert predict.model_path == "run/best.ckpt"  # model_path defaults to ckpt_path
    assert predict.threshold is None and predict.tta is False and predict.every_s == 1.0
    assert composed("predict", "ckpt_path=a.ckpt", "model_path=m.onnx").model_path == "m.onnx"
    export = composed("export")
    assert export.format == "onnx" and export.tolerance == 1e-4
    serve = composed("serve")
    assert (serve.host, serve.port, serve.max_upload_mb) == ("127.0.0.1", 8000, 20)
    assert OmegaConf.select(serve, "review_margin") == 1.0


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("railway_defect.predict", ["ckpt_path=x.ckpt"], "error: Give what to score: input="),
        ("railway_defect.evaluate", [], "error: Give the model: ckpt_path="),
    ],
)
def test_missing_arguments_are_one_clear_line(module: str, args: list[str], message: str, tmp_path) -> None:
    result = run_cli(module, *args, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
