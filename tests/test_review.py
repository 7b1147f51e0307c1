"""Reviewing a run: what the ReviewImages callback writes to TensorBoard, a real TensorBoard server
serving it, the review notebook executed headless, and the review functions on runs and sweeps.

One tiny run (3 epochs, review images every 2nd epoch and at every improvement) is trained once
through the CLI and shared by the tests of this module."""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from railway_defect.callbacks.review_images import _EpochCollector, _gradcam_keeping_grads
from railway_defect.models.contract import ModelContract
from railway_defect.models.module import DefectClassifier
from railway_defect.review import runs as review
from railway_defect.sweeps.summary import summarize
from railway_defect.utils.errors import UserError
from railway_defect.utils.paths import PROJECT_ROOT
from railway_defect.utils.plots import WRONG
from tests.helpers import CLASSES, FAST, make_split_dataset, run_cli
from tests.tensorboard_server import TensorBoard, serve_tensorboard

# the shared fast settings, with the review callback left on: it is what these tests exercise
FAST_WITH_REVIEW = tuple(o for o in FAST if not o.startswith("callbacks.review"))

IMAGE_TAGS = {
    "train/augmented_batch",
    "val/predictions",
    "val/confusion_matrix",
    "val/roc_curve",
    "val/gradcam",
}
VAL_IMAGE_TAGS = IMAGE_TAGS - {"train/augmented_batch"}
EPOCHS = 3
EVERY_N = 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("review")
    data = make_split_dataset(root / "data", {"Train": 6, "Validation": 4})
    run_dir = root / "run"
    result = run_cli(
        "railway_defect.train",
        *FAST_WITH_REVIEW,
        f"data.root={data}",
        f"trainer.max_epochs={EPOCHS}",
        f"callbacks.review.every_n_epochs={EVERY_N}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def events_of(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def review_epochs(history: list[dict], monitor: str, every_n: int) -> list[dict]:
    """The epochs ReviewImages must log: every `every_n`-th, and each that improved the monitor."""
    chosen, best = [], None
    for row in history:
        improved = best is None or row[monitor] > best
        best = row[monitor] if improved else best
        if improved or (row["epoch"] + 1) % every_n == 0:
            chosen.append(row)
    return chosen


def has_wrong_frame(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    red = tuple(int(WRONG[i : i + 2], 16) for i in (1, 3, 5))
    return int((pixels == red).all(axis=1).sum()) > 100


# ---- the callback's output --------------------------------------------------------------------
def test_tensorboard_holds_what_the_model_sees(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    events = events_of(trained_run)
    assert set(events.Tags()["images"]) >= IMAGE_TAGS
    assert [e.step for e in events.Images("train/augmented_batch")] == [0]

    # validation images at every 2nd epoch and at each improvement of the checkpoint's metric
    expected = review_epochs(metrics["history"], metrics["monitor"], EVERY_N)
    for tag in VAL_IMAGE_TAGS:
        assert [e.step for e in events.Images(tag)] == [row["step"] for row in expected], tag
    # ... so the epoch best.ckpt comes from is always there
    assert metrics["best"]["epoch"] in [row["epoch"] for row in expected]

    # wrong predictions are framed red: a red frame exactly when that epoch had errors
    val_count = sum(metrics["data"]["counts"]["val"].values())
    for row, image in zip(expected, events.Images("val/predictions"), strict=True):
        errors = round((1 - row["val/acc"]) * val_count)
        assert has_wrong_frame(image.encoded_image_string) == (errors > 0), row

    # the PR curve goes to TensorBoard's own PR-curve plugin
    assert "val/pr_curve" in events.PluginTagToContent("pr_curves")
    pr = [e.step for e in events.Tensors("val/pr_curve")]
    assert pr == [row["step"] for row in expected]


@pytest.mark.slow
def test_review_images_do_not_change_training(trained_run: Path, tmp_path: Path) -> None:
    """Grad-CAM backpropagates and the first batch is drawn: the run must train exactly the same."""
    result = run_cli(
        "railway_defect.train",
        *FAST_WITH_REVIEW,
        f"data.root={trained_run.parent / 'data'}",
        f"trainer.max_epochs={EPOCHS}",
        "callbacks.review=null",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    without = json.loads((tmp_path / "metrics.json").read_text())
    with_review = json.loads((trained_run / "metrics.json").read_text())
    assert without["history"] == with_review["history"]
    assert not events_of(tmp_path).Tags()["images"]


@pytest.mark.slow
def test_a_cached_frozen_probe_gets_gradcam_and_trains_as_without_review(
    trained_run: Path, tmp_path: Path
) -> None:
    """experiment=offline_best's path with the default callbacks: a frozen, flip-invariant probe
    without random augmentation serves training and validation from the feature cache, while
    Grad-CAM (gradients from the images) goes around it; the review leaves training as it was."""
    probe = (
        "augmentation=none",
        "model.backbone_lr_scale=0",
        "model.flip_invariant=true",
        "model.head_norm=true",
        "model.num_heads=5",
    )
    histories = {}
    for name, switch in (("with", ()), ("without", ("callbacks.review=null",))):
        result = run_cli(
            "railway_defect.train",
            *FAST_WITH_REVIEW,
            *probe,
            *switch,
            f"data.root={trained_run.parent / 'data'}",
            f"trainer.max_epochs={EPOCHS}",
            f"hydra.run.dir={tmp_path / name}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        histories[name] = json.loads((tmp_path / name / "metrics.json").read_text())["history"]
    assert histories["with"] == histories["without"]
    assert set(events_of(tmp_path / "with").Tags()["images"]) >= IMAGE_TAGS


def test_review_defaults_log_every_epoch(compose_train) -> None:
    cfg = compose_train()
    assert cfg.callbacks.review.every_n_epochs == 1
    assert "monitor" not in cfg.callbacks.review  # read from the checkpoint callback


def test_grid_shows_errors_first_then_each_class_in_turn() -> None:
    collector = _EpochCollector(num_classes=2, positive=0, num_images=5, num_gradcam=4)
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    targets = torch.tensor([0, 0, 1, 1, 0, 1])
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.99, 0.01], [0.05, 0.95]])
    collector.add(images, targets, probs)
    grid = [int(item.image[0, 0, 0]) for item in collector.grid_items()]
    # errors (1: p=0.8 wrong, 3: p=0.6 wrong) most confident first, then classes alternate
    assert grid == [1, 3, 0, 2, 4]
    chosen = [(kind, int(item.image[0, 0, 0])) for kind, item in collector.gradcam_items(4)]
    # half errors, half confident defects (class 0, correct) by p(defect)
    assert chosen == [("error", 1), ("error", 3), ("defect", 4), ("defect", 0)]
    # no errors at all: the defects fill the Grad-CAM slots
    clean = _EpochCollector(num_classes=2, positive=0, num_images=5, num_gradcam=2)
    clean.add(images[[0, 4]], targets[[0, 4]], probs[[0, 4]])
    assert [kind for kind, _ in clean.gradcam_items(2)] == ["defect", "defect"]


def test_gradcam_leaves_the_training_gradients_alone() -> None:
    model = DefectClassifier(
        "resnet18", ModelContract.for_backbone("resnet18", CLASSES, "Defective"), pretrained=False
    )
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    heatmaps = _gradcam_keeping_grads(model, torch.randn(2, 3, 64, 64), [0, 1])
    assert heatmaps.shape == (2, 64, 64)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    assert all(p.grad is None for p in params[1:])


# ---- a real TensorBoard -----------------------------------------------------------------------
def test_real_tensorboard_serves_the_review(trained_run: Path) -> None:
    with serve_tensorboard(trained_run) as tb:
        url = tb.url
        scalars = tb.wait_for(lambda: tb.get("/data/plugin/scalars/tags"), lambda a: "tensorboard" in a)
        assert {"train/loss", "val/loss", "val/balanced_acc", "val/f1", "val/auroc"} <= set(
            scalars["tensorboard"]
        )
        images = tb.get("/data/plugin/images/tags")["tensorboard"]
        assert set(images) >= IMAGE_TAGS
        shown = tb.get("/data/plugin/images/images?run=tensorboard&tag=val/predictions")
        assert [entry["step"] for entry in shown] == [
            e.step for e in events_of(trained_run).Images("val/predictions")
        ]
        png = tb.get_bytes(f"/data/plugin/images/individualImage?{shown[-1]['query']}")
        assert Image.open(io.BytesIO(png)).size[0] > 100
        assert "val/pr_curve" in tb.get("/data/plugin/pr_curves/tags")["tensorboard"]
        curve = tb.get("/data/plugin/pr_curves/pr_curves?run=tensorboard&tag=val/pr_curve")
        assert curve["tensorboard"] and curve["tensorboard"][-1]["precision"]

        experiment = tb.wait_for(
            lambda: tb.post("/data/plugin/hparams/experiment", {"experimentName": ""}),
            lambda a: bool(a.get("hparamInfos")),
        )
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"model/backbone", "optimizer/lr", "data.batch_size", "trainer.max_epochs"} <= hparams
        metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"hp/val_balanced_acc", "hp/val_f1", "hp/val_auroc"} <= metric_tags
        listing = tb.get("/data/plugins_listing")
        assert all(listing[p]["enabled"] for p in ("scalars", "images", "pr_curves", "hparams"))
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        TensorBoard(url).get("/data/plugins_listing", timeout=5)


# ---- the notebook -----------------------------------------------------------------------------
@pytest.mark.slow
def test_review_notebook_runs_headless(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(review.REVIEW_DIR_ENV, str(trained_run))
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))  # the kernel imports this checkout
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "review.ipynb", as_version=4)
    assert "TARGET = None" in notebook.cells[1].source
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(PROJECT_ROOT / "notebooks")}},
    )
    client.execute()  # raises CellExecutionError on any failing cell

    def output_kinds(call: str) -> set[str]:
        """The MIME types shown by the code cell that makes `call`."""
        (cell,) = [c for c in notebook.cells if c.cell_type == "code" and call in c.source]
        return {kind for output in cell.outputs for kind in output.get("data", {})}

    assert "image/png" in output_kinds("review.plot_curves(")
    assert "text/html" in output_kinds("review.runs_table(")
    assert "image/png" in output_kinds("review.plot_confusion(")
    assert "image/png" in output_kinds("review.plot_misclassified(")  # or the note that none are
    assert "text/markdown" in output_kinds("review.next_steps(")
    (next_steps,) = [c for c in notebook.cells if "review.next_steps(" in c.source]
    next_steps = next_steps.outputs[0]
    assert "val split" in next_steps["data"]["text/markdown"]


# ---- the review functions ---------------------------------------------------------------------
def test_checkpoint_evaluation_matches_the_run(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    evaluation = review.evaluate_checkpoint(trained_run)
    assert len(evaluation.targets) == sum(metrics["data"]["counts"]["val"].values())
    accuracy = float((evaluation.predictions == evaluation.targets).mean())
    assert accuracy == pytest.approx(metrics["val"]["val/acc"], abs=1e-6)
    errors = evaluation.errors()
    assert len(errors) == int((evaluation.predictions != evaluation.targets).sum())
    assert list(errors["confidence"]) == sorted(errors["confidence"], reverse=True)
    figure = review.plot_misclassified(evaluation)
    # an image and its Grad-CAM per error, or one note that there are none
    assert len([ax for ax in figure.get_axes() if ax.get_images()]) == 2 * len(errors)
    assert figure.get_axes()


def make_sweep(trained_run: Path, root: Path) -> Path:
    """A sweep dir of two jobs: copies of the run, the second one scoring higher and with a
    higher (worse) validation loss."""
    for job, shift in (("0", 0.0), ("1", 0.25)):
        shutil.copytree(trained_run, root / "sweep" / job)
        path = root / "sweep" / job / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["val"]["val/balanced_acc"] = 0.5 + shift
        metrics["val"]["val/loss"] = 0.4 + shift
        path.write_text(json.dumps(metrics))
    return root / "sweep"


def test_sweep_table_ranks_runs_as_the_sweep_summary_does(trained_run: Path, tmp_path: Path) -> None:
    sweep = make_sweep(trained_run, tmp_path)
    # a job that failed before its first epoch: listed last, without curves
    (sweep / "10").mkdir()
    (sweep / "10" / "metrics.json").write_text(json.dumps({"status": "failed", "error": "ValueError: x"}))
    target = review.open_target(sweep)
    assert target.kind == "sweep" and [r.name for r in target.runs] == ["0", "1", "10"]
    table = review.runs_table(target)
    assert list(table["run"]) == ["1", "0", "10"]
    assert list(table["status"]) == ["ok", "ok", "failed"]  # the summary's words
    assert list(table["val/balanced_acc"])[:2] == [0.75, 0.5]
    assert review.best_run(target).name == "1"
    loss_panel = review.plot_curves(target).get_axes()[0]
    assert {line.get_label() for line in loss_panel.get_lines()} >= {"0 train", "0 val", "1 train", "1 val"}

    # a loss ranks smallest first, as in the summary
    assert list(review.runs_table(target, sort_by="val/loss")["run"]) == ["0", "1", "10"]
    assert review.best_run(target, sort_by="val/loss").name == "0"
    summary = summarize(sweep)
    by_optimum = review.runs_table(target, sort_by=summary.optimized_metric)
    assert list(by_optimum["run"]) == [row.job for row in summary.rows]
    for row in summary.rows:
        (mine,) = table[table["run"] == row.job].to_dict("records")
        assert mine["status"] == row.status
        for metric in summary.columns:
            assert (row.value(metric) is None and pd.isna(mine[metric])) or mine[metric] == row.value(metric)

    # a stale summary.csv does not override what the jobs left on disk
    (target.path / "summary.csv").write_text("job,val/balanced_acc,status\n0,0.9,finished\n1,0.4,finished\n")
    assert list(review.runs_table(target)["run"]) == ["1", "0", "10"]
    with pytest.raises(UserError, match="Cannot sort by 'val/nothing'"):
        review.runs_table(target, sort_by="val/nothing")
    with pytest.raises(UserError, match="Cannot rank runs by 'val/nothing'"):
        review.best_run(target, sort_by="val/nothing")


def test_review_explains_bad_targets(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder; set TARGET"):
        review.open_target(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run or sweep dir"):
        review.open_target(tmp_path / "empty")
    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    report = json.loads((moved / "data_report.json").read_text())
    report["root"] = str(tmp_path / "gone")
    (moved / "data_report.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match="pass data_root=FOLDER"):
        review.evaluate_checkpoint(moved)
