"""trainer=ddp_cpu: two processes (gloo) train one model; the validation metrics are gathered from
both processes (so they equal a single-process validation of the checkpoint), and rank 0 alone
writes the checkpoint, metrics.json and TensorBoard logs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.models.module import DefectClassifier
from tests.conftest import REAL_DATA, run_cli
from tests.test_train import VAL_METRICS


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project")
def test_ddp_cpu_metrics_equal_a_single_process_validation_of_the_checkpoint(tmp_path: Path) -> None:
    result = run_cli(
        "railway_defect.train",
        "trainer=ddp_cpu",
        "model=resnet18",
        "model.pretrained=false",
        "data.image_size=32",
        "data.cache_size=40",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) >= 1
    assert not list(tmp_path.glob("**/version_*"))  # no second logger directory from rank 1

    # each process validated 14 of the 28 images; the logged values cover all 28
    model = DefectClassifier.load_from_checkpoint(metrics["checkpoints"]["best"], pretrained=False)
    dm = RailwayDataModule(root=REAL_DATA, image_size=32, cache_size=40, batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (validated,) = trainer.validate(model, dm, verbose=False)
    assert metrics["data"]["counts"]["val"] == {"Defective": 19, "Non defective": 9}
    for name in VAL_METRICS:
        assert metrics["val"][name] == pytest.approx(validated[name], abs=1e-5), name
