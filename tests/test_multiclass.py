"""Three classes or more: the decision rules (threshold on the worst class, cost matrix), the K-class
metrics, and a generated three-class set of ordered classes through train, evaluate (K x K,
costs), predict (K columns, top_k), export (K outputs), serve and a cross-validation summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.inference.model import calibration_path, load_predictor
from railway_defect.inference.predicting import Decision
from railway_defect.inference.service import build_service
from railway_defect.utils.decision import (
    DecisionRule,
    check_costs,
    choose_class_weights,
    class_weight_costs,
    threshold_for_costs,
)
from railway_defect.utils.errors import UserError
from railway_defect.utils.metrics import multiclass_metrics
from tests.helpers import FAST, make_split_dataset, run_cli, write_image

SLEEPERS = ("Good", "Fair", "Poor")  # least to most severe
COSTS = [[0, 1, 5], [1, 0, 2], [20, 5, 0]]  # rows: true, columns: predicted; Poor called Good costs 20
ORDINAL = "data.ordinal=[Good,Fair,Poor]"


def test_the_cost_rule_takes_the_least_expected_cost() -> None:
    rule = DecisionRule(positive_index=2, threshold=0.5, costs=check_costs(COSTS, SLEEPERS))
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.08, 0.02], [0.1, 0.2, 0.7]])
    # expected costs (Good, Fair, Poor): [4.3, 1.5, 3.1] -> Fair (the argmax says Good);
    # [0.48, 0.94, 4.66] -> Good; [14.2, 3.6, 0.9] -> Poor
    assert rule.labels(probs).tolist() == [1, 0, 2]


def test_the_threshold_rule_decides_the_worst_class_then_the_likeliest_other() -> None:
    probs = np.array([[0.2, 0.3, 0.5], [0.45, 0.1, 0.45]])
    assert DecisionRule(2, 0.6).labels(probs).tolist() == [1, 0]
    assert DecisionRule(2, 0.4).labels(probs).tolist() == [2, 2]


def test_binary_costs_are_the_threshold_they_imply() -> None:
    costs = check_costs([[0, 5], [1, 0]], ("Defective", "Non defective"))  # a missed defect costs 5
    threshold = threshold_for_costs(costs, positive_index=0)
    assert threshold == pytest.approx(1 / 6)
    p = np.linspace(0.01, 0.99, 99)
    probs = np.stack([p, 1 - p], axis=1)
    by_costs = DecisionRule(0, 0.5, costs).labels(probs)
    assert (by_costs == DecisionRule(0, threshold).labels(probs)).all()


def test_class_weights_are_the_argmax_of_the_weighted_probabilities() -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=200)
    weights = (1.0, 2.5, 0.4)
    rule = DecisionRule(2, 0.5, class_weight_costs(weights))
    assert (rule.labels(probs) == (probs * weights).argmax(axis=1)).all()


def test_chosen_class_weights_raise_a_class_the_argmax_misses() -> None:
    # every Fair frame is p(Good) 0.55, p(Fair) 0.40: the argmax calls all of them Good
    good = np.tile([0.9, 0.08, 0.02], (10, 1))
    fair = np.tile([0.55, 0.40, 0.05], (10, 1))
    poor = np.tile([0.1, 0.2, 0.7], (10, 1))
    probs, targets = np.vstack([good, fair, poor]), np.repeat([0, 1, 2], 10)
    rule = choose_class_weights(targets, probs, positive_index=2, target_recall=0.95)
    assert (rule.labels(probs) == targets).all()
    weights = rule.class_weights()
    # Fair is weighted up by enough to win 0.40 against 0.55, and not so much that Good frames go Fair:
    # the middle of the interval (0.55 / 0.40, 0.9 / 0.08) in log terms
    ratio = weights[1] / weights[0]
    assert 0.55 / 0.40 < ratio < 0.9 / 0.08
    assert np.log(ratio) == pytest.approx(np.log(np.sqrt(0.55 / 0.40 * 0.9 / 0.08)), abs=0.1)


def test_chosen_class_weights_reach_the_worst_class_recall_before_macro_recall() -> None:
    # half the Poor frames look Fair (p(Poor) 0.3): reaching Poor recall 1 costs Fair frames
    fair = np.tile([0.1, 0.6, 0.3], (10, 1))
    poor = np.vstack([np.tile([0.1, 0.6, 0.3], (5, 1)), np.tile([0.05, 0.15, 0.8], (5, 1))])
    good = np.tile([0.9, 0.08, 0.02], (10, 1))
    probs, targets = np.vstack([good, fair, poor]), np.repeat([0, 1, 2], 10)
    at_target = choose_class_weights(targets, probs, positive_index=2, target_recall=1.0).labels(probs)
    assert (at_target[targets == 2] == 2).all()  # every Poor frame, at the price of every Fair one
    lenient = choose_class_weights(targets, probs, positive_index=2, target_recall=0.5).labels(probs)
    assert (lenient[targets == 1] == 1).all() and (lenient[targets == 2] == 2).sum() == 5


def test_class_weights_without_a_photo_of_the_worst_class_fall_back_to_the_argmax_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No Poor frame among the predictions: Poor recall cannot be checked, so no weights are chosen
    for it (the search would otherwise compare undefined recalls)."""
    good, fair = np.tile([0.9, 0.08, 0.02], (10, 1)), np.tile([0.55, 0.40, 0.05], (10, 1))
    probs, targets = np.vstack([good, fair]), np.repeat([0, 1], 10)
    rule = choose_class_weights(targets, probs, positive_index=2, target_recall=0.95)
    assert rule.class_weights() == [1.0, 1.0, 1.0]
    assert "No photo of the positive class (index 2)" in caplog.text


def test_bad_costs_say_the_shape_and_order_expected() -> None:
    with pytest.raises(UserError, match=r"3x3 matrix .* order Good, Fair, Poor\), got 2x3"):
        check_costs([[0, 1, 2], [1, 0, 2]], SLEEPERS)
    with pytest.raises(UserError, match="0 on the diagonal"):
        check_costs([[1, 1, 2], [1, 0, 2], [1, 1, 0]], SLEEPERS)


def test_multiclass_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3))
    logits[np.arange(200), targets] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    m = multiclass_metrics(targets, probs, predicted, SLEEPERS, ordinal=True, resamples=200)
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    assert m["macro"]["f1"]["value"] == pytest.approx(f1_score(targets, predicted, average="macro"))
    assert m["weighted"]["f1"]["value"] == pytest.approx(f1_score(targets, predicted, average="weighted"))
    assert m["auroc_macro"]["value"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr"))
    for metric in (
        m["balanced_accuracy"],
        m["per_class"]["Poor"]["recall"],
        m["ordinal"]["mean_absolute_error"],
    ):
        assert metric["low"] <= metric["value"] <= metric["high"]
    two_steps = np.mean(np.abs(predicted - targets) == 2)
    assert m["ordinal"]["by_distance"]["2_steps"]["value"] == pytest.approx(two_steps)
    assert np.sum(m["confusion_matrix"]["matrix"]) == 200


def test_an_ordinal_list_that_names_a_missing_class_is_one_line(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "data", {"Train": 2, "Validation": 2}, SLEEPERS)
    module = RailwayDataModule.from_settings(root=root, ordinal=["Good", "Fair", "Bad"], num_workers=0)
    with pytest.raises(UserError, match=r"data.ordinal=\['Good', 'Fair', 'Bad'\] must name every class"):
        module.setup("fit")


def test_the_group_bootstrap_resamples_whole_groups() -> None:
    """Frames of one group are right or wrong together: drawing them one by one would make the
    interval narrow, as if there were 120 independent photos instead of 12 groups."""
    targets, groups = np.repeat([0, 1, 2], 40), np.repeat(np.arange(12), 10)
    predicted = np.where(groups % 2 == 0, targets, (targets + 1) % 3)  # half the groups wrong
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3 * np.eye(3)[(predicted + 1) % 3] + 0.2 / 3
    by_image = multiclass_metrics(targets, probs, predicted, SLEEPERS, resamples=500)
    by_group = multiclass_metrics(targets, probs, predicted, SLEEPERS, resamples=500, groups=groups)
    width = {
        k: m["balanced_accuracy"]["high"] - m["balanced_accuracy"]["low"]
        for k, m in (("image", by_image), ("group", by_group))
    }
    assert width["group"] > 2 * width["image"], width
    assert by_group["balanced_accuracy"]["method"] == "stratified group bootstrap (500, 12 groups)"
    for block in by_group["per_class"].values():
        assert 0.0 <= block["auroc"]["low"] <= block["auroc"]["high"] <= 1.0


@pytest.fixture(scope="module")
def sleepers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, best.ckpt) of three ordered classes, Poor the positive one, evaluated with costs."""
    base = tmp_path_factory.mktemp("sleepers")
    root = make_split_dataset(base / "data", {"Train": 10, "Validation": 6, "Test": 6}, SLEEPERS)
    run = base / "run"
    common = (f"data.root={root}", ORDINAL, "data.positive_class=Poor")
    with_review = [a for a in FAST if not a.startswith("callbacks.review")]  # the default review images
    result = run_cli(
        "railway_defect.train", *with_review, *common, "trainer.max_epochs=3", f"hydra.run.dir={run}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "best.ckpt"
    costs = "costs=" + json.dumps(COSTS).replace(" ", "")
    result = run_cli(
        "railway_defect.evaluate", f"ckpt_path={ckpt}", f"data.root={root}", costs, f"hydra.run.dir={run}/ev"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, ckpt


def test_tensorboard_shows_every_class(sleepers: tuple[Path, Path]) -> None:
    """The K x K confusion matrix and a PR curve of each class against the rest."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sleepers[1].parent.parent
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"val/confusion_matrix", "val/predictions"} <= set(events.Tags()["images"])
    curves = set(events.PluginTagToContent("pr_curves"))
    assert curves == {f"val/pr_curve/{c}" for c in SLEEPERS}, curves


def test_the_shortcut_audit_scores_balanced_accuracy_over_every_class(sleepers: tuple[Path, Path]) -> None:
    audit = json.loads((sleepers[1].parent.parent / "data_report.json").read_text())["shortcut_audit"]
    assert audit["metric"].startswith("balanced accuracy over the 3 classes") and audit["chance"] == 0.3333
    assert audit["counts"] == {c: 16 for c in sorted(SLEEPERS)}  # Train and Validation, every class
    assert all(e["balanced_accuracy"] <= 1.0 for e in audit["properties"].values())


def test_review_notebook_shows_every_class(sleepers: tuple[Path, Path]) -> None:
    from railway_defect.review import runs as review

    run = sleepers[1].parent.parent
    evaluation = review.evaluate_checkpoint(run)
    table = evaluation.table()
    assert [f"p({c})" for c in SLEEPERS] == [c for c in table.columns if c.startswith("p(")]
    assert np.allclose(table[[f"p({c})" for c in SLEEPERS]].sum(axis=1), 1.0, atol=3e-3)
    assert "Recall per class (argmax): `Good`" in review.next_steps(review.open_target(run), evaluation)


def test_evaluate_gives_the_k_by_k_report_and_stores_the_cost_rule(sleepers: tuple[Path, Path]) -> None:
    ckpt = sleepers[1]
    out = ckpt.parent.parent / "evaluation" / "best_test"
    report = json.loads((out / "evaluation.json").read_text())
    block = report["classes"]
    matrix = block["at_rule"]["confusion_matrix"]
    assert matrix["labels"] == list(SLEEPERS) and np.sum(matrix["matrix"]) == 18
    assert set(block["at_rule"]["per_class"]) == set(SLEEPERS)
    assert {"mean_absolute_error", "by_distance", "under_called"} <= set(block["at_rule"]["ordinal"])
    assert "least expected cost" in block["rule"] and "expected_cost" in block
    assert block["worst_miss"]["true"] == "Poor" and block["worst_miss"]["predicted"] == "Good"
    markdown = (out / "evaluation.md").read_text()
    assert "## Classes" in markdown and "true \\ predicted" in markdown
    sidecar = json.loads(calibration_path(ckpt).read_text())
    assert sidecar["costs"] == COSTS and sidecar["contract"]["class_names"] == list(SLEEPERS)
    with (out / "predictions_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "p_Good", "p_Fair", "p_Poor", "predicted"]
    probs = np.array([[float(r[f"p_{c}"]) for c in SLEEPERS] for r in rows])
    expected = np.argmin(probs @ np.array(COSTS, dtype=float), axis=1)
    assert [r["predicted"] for r in rows] == [SLEEPERS[i] for i in expected]


def test_predict_gives_every_class_the_rules_label_and_the_top_k(
    sleepers: tuple[Path, Path], tmp_path: Path
) -> None:
    root, ckpt = sleepers
    output = tmp_path / "predictions.csv"
    result = run_cli(
        "railway_defect.predict",
        f"ckpt_path={ckpt}",
        f"input={root / 'Test'}",
        f"output={output}",
        "top_k=2",
        f"hydra.run.dir={tmp_path}/log",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18
    assert {"p_Good", "p_Fair", "p_Poor", "label", "p_label", "top1", "p_top1", "top2", "p_top2"} <= set(
        rows[0]
    )
    for row in rows:
        probs = np.array([float(row[f"p_{c}"]) for c in SLEEPERS])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == SLEEPERS[int(np.argmin(probs @ np.array(COSTS, dtype=float)))]
        assert float(row["p_label"]) == pytest.approx(probs[SLEEPERS.index(row["label"])], abs=1e-6)
        assert row["top1"] == SLEEPERS[int(probs.argmax())] and float(row["p_top1"]) >= float(row["p_top2"])


def test_top_k_larger_than_the_classes_is_one_line(sleepers: tuple[Path, Path]) -> None:
    predictor = load_predictor(sleepers[1], "cpu")
    with pytest.raises(UserError, match=r"top_k=4: the model has 3 classes \(Good, Fair, Poor\)"):
        Decision.for_model(predictor, 1.0, None, top_k=4)


def test_export_has_k_outputs_and_serve_answers_k_probabilities(
    sleepers: tuple[Path, Path], tmp_path: Path
) -> None:
    root, ckpt = sleepers
    onnx = tmp_path / "model.onnx"
    result = run_cli(
        "railway_defect.export", f"ckpt_path={ckpt}", f"output={onnx}", f"hydra.run.dir={tmp_path}/log"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["railway_defect"])
    assert metadata["class_names"] == list(SLEEPERS) and metadata["costs"] == COSTS and metadata["ordinal"]
    exported = load_predictor(onnx, "cpu")
    image = exported.preprocess([exported.decode((root / "Test" / "Poor" / "Test_0.jpg").read_bytes())])
    assert exported.logits(image).shape == (1, 3)

    client = TestClient(build_service(str(onnx), device="cpu", top_k=3))
    files = [
        ("files", (f"{c}.png", (root / "Test" / c / "Test_1.png").read_bytes(), "image/png"))
        for c in SLEEPERS
    ]
    answer = client.post("/predict", files=files).json()
    for row in answer["predictions"]:
        assert {f"p_{c}" for c in SLEEPERS} <= set(row) and row["label"] in SLEEPERS
        assert [row[f"top{i}"] for i in (1, 2, 3)] and sorted(
            {row["top1"], row["top2"], row["top3"]}
        ) == sorted(SLEEPERS)
    assert client.get("/health").json()["classes"] == list(SLEEPERS)


def test_cross_validation_summary_reports_the_classes_out_of_fold(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(24):
        label = i % 3
        write_image(root / SLEEPERS[label] / f"{i}.png", label_index=label, seed=i)
    sweep = tmp_path / "cv"
    result = run_cli(
        "railway_defect.train",
        "experiment=cv",
        "data.num_folds=2",
        *FAST,
        "trainer.max_epochs=1",
        f"data.root={root}",
        ORDINAL,
        "data.positive_class=Poor",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pooled = json.loads((sweep / "oof.json").read_text())[0]
    block = pooled["classes"]
    assert block["at_rule"]["confusion_matrix"]["labels"] == list(SLEEPERS)
    assert np.sum(block["at_rule"]["confusion_matrix"]["matrix"]) == 24  # every image once, out of fold
    assert "2_steps" in block["at_rule"]["ordinal"]["by_distance"]
    assert "Classes of" in (sweep / "summary.md").read_text()

    # the recipe's final model takes the class weights chosen on the sweep's out-of-fold predictions
    final = tmp_path / "final"
    recipe = (*FAST, "trainer.max_epochs=1", f"data.root={root}", ORDINAL, "data.positive_class=Poor")
    final_only = ("data.train_on=train_and_val", "callbacks.model_checkpoint.monitor=null")
    result = run_cli("railway_defect.train", *recipe, *final_only, f"hydra.run.dir={final}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("railway_defect.evaluate", f"ckpt_path={final}", f"oof={sweep}", f"data.root={root}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The classes are decided by the likeliest class after weighting" in result.stdout
    predictor = load_predictor(final, device="cpu")
    assert predictor.calibration.costs is not None
    assert [list(row) for row in predictor.calibration.costs] == pooled["one_model_costs"]
