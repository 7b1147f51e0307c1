"""The recipe study: experiment=offline_best is exactly the recipe the study selected, and the
study script runs end to end (tiny, 2 folds) and writes STUDY.md from the sweeps' out-of-fold
estimates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import PROJECT_ROOT, REAL_DATA

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import study_recipes

COMPARED = ("model", "data", "augmentation", "optimizer", "scheduler", "trainer")


def test_offline_best_is_the_selected_recipe(compose_train) -> None:
    """The recipe the study selected, as the final model: trained on every labelled photo, at the
    threshold the study chose for it."""
    shipped = compose_train("experiment=offline_best")
    studied = compose_train(*study_recipes.RECIPES["lite2_stages_probe_448"])
    assert shipped.data.train_on == "train_and_val" and studied.data.train_on == "train"
    shipped.data.train_on = "train"
    # its operating threshold: the one the study chose out of fold (STUDY.md), where 0.5 misses defects
    assert shipped.model.decision_threshold == 0.055 and studied.model.decision_threshold == 0.5
    shipped.model.decision_threshold = 0.5
    for key in COMPARED:
        assert OmegaConf.to_yaml(shipped[key]) == OmegaConf.to_yaml(studied[key]), key
    # no checkpoint selection (nothing validates): best.ckpt is the final epoch's weights
    assert shipped.callbacks.model_checkpoint.monitor is None
    # its cross-validation, as the README runs it to choose the threshold on one's own photos
    cv = compose_train("experiment=[offline_best,cv]", "data.train_on=train")
    assert cv.data.num_folds == 5 and cv.model.backbone_lr_scale == 0 and cv.trainer.max_epochs == 30


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project")
def test_study_script_quick_writes_study_md(tmp_path: Path) -> None:
    script = PROJECT_ROOT / "benchmarks" / "study_recipes.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    study = (tmp_path / "STUDY.md").read_text()
    assert "| quick | all (107) |" in study and "| quick | 224x224 (51) |" in study
    (entry,) = json.loads((tmp_path / "study.json").read_text())
    assert entry["oof"]["metrics"]["all@0.5"]["n"] == 107
    assert entry["jobs"] == 2
