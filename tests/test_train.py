"""The train entry point end to end: a tiny in-process run writes every output, the CLI fails
cleanly on bad input, and (slow) the real data trains to a useful model."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.models.module import MONITORABLE, DefectClassifier
from railway_defect.review.runs import evaluate_checkpoint
from railway_defect.training.record import RunRecord
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from tests.helpers import FAST, REAL_DATA, VAL_METRICS, make_split_dataset, run_cli


def read_scalars(tensorboard_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return events


def test_tiny_run_writes_every_output(compose_train, tiny_dataset: Path) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}")
    value = run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert value == pytest.approx(metrics["optimized_metric"])
    assert metrics["optimized_metric_name"] == "val/balanced_acc_best"
    assert metrics["pretrained_loaded"] is False
    assert metrics["classes"] == ["Defective", "Non defective"]
    assert metrics["precision"] == "32-true"  # trainer.precision=auto on the CPU
    assert set(VAL_METRICS) <= set(metrics["val"])
    assert {m.replace("val/", "test/") for m in VAL_METRICS} <= set(metrics["test"])
    assert metrics["best"]["epoch"] in (0, 1)
    assert len(metrics["history"]) == 2
    assert Path(metrics["checkpoints"]["best"]) == run_dir / "checkpoints" / "best.ckpt"
    assert Path(metrics["checkpoints"]["last"]).is_file()
    assert json.loads((run_dir / "data_report.json").read_text())["counts"]["test"] == {
        "Defective": 2,
        "Non defective": 2,
    }

    events = read_scalars(run_dir / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_epoch", "val/f1_best", "lr-AdamW", "hp/val_f1", "hp/test_f1"} <= tags
    assert set(VAL_METRICS) <= tags
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["optimizer/lr"].number_value == pytest.approx(0.001)
    assert hparams["model/backbone"].string_value == "resnet18"
    assert hparams["trainer.precision"].string_value == "32-true"  # the value used, not `auto`

    # metrics.json describes best.ckpt: validating that checkpoint gives the same numbers
    model = DefectClassifier.load_from_checkpoint(metrics["checkpoints"]["best"], pretrained=False)
    assert model.class_names == metrics["classes"]
    dm = RailwayDataModule.from_settings(
        root=tiny_dataset, image_size=64, cache_size=72, batch_size=4, num_workers=0
    )
    (validated,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(model, dm)
    assert validated["val/f1"] == pytest.approx(metrics["val"]["val/f1"], abs=1e-6)


def test_resume_from_last_checkpoint_continues_the_epochs(compose_train, tiny_dataset: Path) -> None:
    first = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1")
    run_training(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=2", f"ckpt_path={last}")
    run_training(resumed)
    metrics = json.loads((Path(resumed.paths.output_dir) / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [0, 1]


@pytest.mark.parametrize("monitor", [*MONITORABLE, None])
def test_metrics_json_names_the_metric_that_selected_its_value_and_epoch(
    compose_train, tiny_dataset: Path, monitor: str | None
) -> None:
    """Any monitor set where the README says (callbacks.model_checkpoint.monitor) selects best.ckpt,
    and metrics.json, the model's `_best` metric and optimized_metric all follow it."""
    override = f"callbacks.model_checkpoint.monitor={monitor or 'null'}"
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=3", override)
    value = run_training(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    history = metrics["history"]
    saved_epoch = torch.load(metrics["checkpoints"]["best"], map_location="cpu", weights_only=False)["epoch"]
    assert metrics["monitor"] == monitor
    assert metrics["best"]["epoch"] == saved_epoch
    best_row = next(row for row in history if row["epoch"] == saved_epoch)
    assert metrics["val"] == {k: v for k, v in best_row.items() if k.startswith("val/")}
    if monitor is None:
        assert saved_epoch == history[-1]["epoch"] and metrics["best"] == {"epoch": saved_epoch}
        assert metrics["optimized_metric_name"] is None and value is None
        assert "none" in metrics["selection"]
        return
    highest = max(row[monitor] for row in history)
    assert best_row[monitor] == pytest.approx(highest)
    assert best_row is next(row for row in history if row[monitor] == best_row[monitor])  # first of ties
    assert metrics["best"][monitor] == pytest.approx(highest)
    assert metrics["optimized_metric_name"] == f"{monitor}_best"
    assert value == pytest.approx(highest)
    assert metrics["selection"].startswith(monitor)


def test_cli_missing_data_root_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("railway_defect.train", f"data.root={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: Data folder") and "data.root=PATH" in last_line
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_reference_recipe_fast_dev_run_on_real_data(tmp_path: Path) -> None:
    """`debug=fdr` with the default ResNet-50; offline, the ImageNet weights fall back to random init."""
    result = run_cli(
        "railway_defect.train",
        "debug=fdr",
        f"hydra.run.dir={tmp_path}",
        env={"TORCH_HOME": str(tmp_path / "th")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["backbone"] == "resnet50"
    assert metrics["pretrained_loaded"] is False
    assert "resnet50-11ad3fa6.pth" in result.stdout + result.stderr
    assert metrics["data"]["counts"]["train"] == {"Defective": 57, "Non defective": 22}


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project")
def test_efficientnet_lite0_learns_the_real_data(tmp_path: Path) -> None:
    result = run_cli("railway_defect.train", "model=efficientnet_lite0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["pretrained_loaded"] is True
    assert metrics["epochs_completed"] == 5
    assert metrics["val"]["val/balanced_acc"] >= 0.70
    for path in (
        ".hydra/config.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "data_report.json",
        "train.log",
    ):
        assert (tmp_path / path).is_file(), path
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (
        yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())["model"]["backbone"]
        == "efficientnet_lite0"
    )
    assert f"tensorboard --logdir {tmp_path}/tensorboard" in result.stdout


def test_a_normal_run_prints_no_warning_a_user_cannot_act_on(tmp_path: Path) -> None:
    """No Lightning-internal deprecation, no AUROC notice from the sanity check's two one-class
    batches, no `Total FLOPs: 0` in the model summary."""
    data = make_split_dataset(tmp_path / "data", {"Train": 4, "Validation": 4})
    fast = [o for o in FAST if not o.startswith("callbacks.")]  # every default callback and logger
    result = run_cli(
        "railway_defect.train",
        *fast,
        "trainer.max_epochs=1",
        "data.batch_size=2",
        f"data.root={data}",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trainable params" in result.stdout  # the model summary is shown
    assert "FLOPs" not in result.stdout
    noise = [line for line in result.stderr.splitlines() if "Warning" in line or "deprecated" in line]
    assert not noise, "\n".join(noise)


def test_freeze_then_unfreeze_runs_with_the_default_callbacks(tmp_path: Path) -> None:
    """callbacks=finetune as users run it (progress bar, model summary, review images with Grad-CAM),
    with warmup + cosine and a standardised head: the backbone joins at epoch 1 and the scheduler
    steps on; frozen batch norm is in eval mode on purpose, so Lightning's warning about it is not
    shown."""
    data = make_split_dataset(tmp_path / "data", {"Train": 6, "Validation": 4})
    run = tmp_path / "run"
    result = run_cli(
        "railway_defect.train",
        *(o for o in FAST if not o.startswith("callbacks.")),  # the default callbacks, as users run
        "callbacks=finetune",
        "callbacks.finetune.unfreeze_backbone_at_epoch=1",
        "scheduler=warmup_cosine",
        "model.head_norm=true",
        f"data.root={data}",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = RunRecord.read(run)
    assert record.status == "finished" and [row["epoch"] for row in record.history] == [0, 1]
    assert "in eval mode at the start of training" not in result.stderr


def test_validation_twice_per_epoch(compose_train, tiny_dataset: Path) -> None:
    """lightning-hydra-template's double validation loop: val_check_interval=0.5."""
    cfg = compose_train(
        *FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1", "+trainer.val_check_interval=0.5"
    )
    run_training(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs_completed"] == 1
    assert set(VAL_METRICS) <= set(metrics["val"])


def test_train_on_train_and_val_trains_the_final_model_on_every_labelled_photo(tmp_path: Path) -> None:
    """The final model of a recipe chosen by cross-validation: the validation images train too, a
    Test split stays held out, nothing is validated or selected, and the record says so."""
    data = make_split_dataset(tmp_path / "data", {"Train": 6, "Validation": 3, "Test": 2})
    run = tmp_path / "run"
    result = run_cli(
        "railway_defect.train",
        *(o for o in FAST if not o.startswith("callbacks.")),  # the default callbacks, as users run
        f"data.root={data}",
        "data.train_on=train_and_val",
        "callbacks.model_checkpoint.monitor=null",
        # as experiment=offline_best trains: a frozen backbone (features cached: no random
        # augmentation), flip-invariant standardised features, five heads
        "augmentation=none",
        "model.backbone_lr_scale=0",
        "model.flip_invariant=true",
        "model.head_norm=true",
        "model.num_heads=5",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr
    with open(run / "splits.csv", newline="") as f:
        splits = Counter(row["split"] for row in csv.DictReader(f))
    assert splits == {"train": 18, "test": 4}
    record = RunRecord.read(run)
    assert record.status == "finished" and record.val == {} and record.test
    assert "no validation split" in record.selection and record.best_epoch == 1
    assert [row["epoch"] for row in record.history] == [0, 1] and "train/loss_epoch" in record.history[-1]
    assert (run / "checkpoints" / "best.ckpt").is_file()
    # the held-out Test split is scored once, at the model's own threshold (nothing fitted on it)
    evaluated = run_cli("railway_defect.evaluate", f"ckpt_path={run}", f"data.root={data}", "bootstrap=10")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((run / "evaluation" / "best_test" / "evaluation.json").read_text())
    assert report["data"]["n"] == 4 and report["threshold"]["value"] == 0.5
    assert "held out of every study step" in evaluated.stdout and "already scored" not in evaluated.stdout
    again = run_cli("railway_defect.evaluate", f"ckpt_path={run}", f"data.root={data}", "bootstrap=10")
    assert again.returncode == 0 and "The locked Test split was already scored" in again.stdout + again.stderr
    # nothing to fit a threshold on: evaluate says what to use instead, in one line
    evaluated = run_cli(
        "railway_defect.evaluate", f"ckpt_path={run}", f"data.root={data}", "split=Validation", "bootstrap=10"
    )
    assert evaluated.returncode == 1
    assert "no Validation split" in evaluated.stderr.strip().splitlines()[-1]
    with pytest.raises(UserError, match="has no validation split"):  # the review notebook's evaluation
        evaluate_checkpoint(run, data_root=data)
    assert evaluate_checkpoint(run, split="test", data_root=data).targets.size == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.model_checkpoint.monitor=val/balanced_acc", "callbacks.model_checkpoint needs one"),
        ("data.num_folds=3", "cannot run a cross-validation fold"),
    ],
)
def test_train_on_train_and_val_refuses_what_needs_a_validation_split(
    tmp_path: Path, override: str, message: str
) -> None:
    data = make_split_dataset(tmp_path / "data", {"Train": 6, "Validation": 3})
    extra = [] if "monitor" in override else ["callbacks.model_checkpoint.monitor=null"]
    result = run_cli(
        "railway_defect.train",
        *FAST,
        f"data.root={data}",
        "data.train_on=train_and_val",
        override,
        *extra,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]


def test_a_frozen_backbone_with_backbone_finetuning_is_refused(tmp_path: Path) -> None:
    """BackboneFinetuning would unfreeze the backbone that model.backbone_lr_scale=0 keeps fixed."""
    data = make_split_dataset(tmp_path / "data", {"Train": 6, "Validation": 3})
    result = run_cli(
        "railway_defect.train",
        *FAST,
        f"data.root={data}",
        "model.backbone_lr_scale=0",
        "callbacks=finetune",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "callbacks.finetune unfreezes it" in result.stderr.strip().splitlines()[-1]
