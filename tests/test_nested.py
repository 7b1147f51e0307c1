"""An estimate that holds: group windows wider than a burst, a locked Test split, nested
cross-validation (the inner folds choose the threshold, the refit scores the outer fold at it) and
the label audit of the out-of-fold predictions."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from railway_defect.callbacks.predictions import TEST_PREDICTIONS_FILE as TEST_PREDICTIONS
from railway_defect.data.discovery import (
    REFIT,
    HeldOutTestFold,
    Sample,
    discover,
    held_out_test_folds,
    infer_groups,
    pooled_groups,
)
from railway_defect.sweeps import label_issues
from railway_defect.sweeps.summary import summarize_and_write
from railway_defect.utils.errors import UserError
from tests.helpers import CLASSES, run_cli, write_image


def _walks(root: Path, walks: int = 6, per_walk: int = 4) -> Path:
    """Photos of `walks` walks (one class each, alternating), one photo a minute, walks an hour apart."""
    rows = ["path,label"]
    for walk in range(walks):
        for i in range(per_walk):
            name = f"IMG_20240301_{10 + walk:02d}{i:02d}00.jpg"
            write_image(root / name, label_index=walk % 2, seed=walk * 10 + i)
            rows.append(f"{name},{CLASSES[walk % 2]}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_wider_window_chains_photos_into_walks_and_day_makes_a_session(tmp_path: Path) -> None:
    paths = [
        tmp_path / n
        for n in (
            "IMG_20240301_100000.jpg",
            "IMG_20240301_100030.jpg",
            "IMG_20240301_100200.jpg",
            "IMG_20240301_160000.jpg",
            "IMG_20240302_100000.jpg",
            "web.jpg",
        )
    ]
    assert len(set(infer_groups(paths))) == 6  # 10 s: every photo alone
    sixty = infer_groups(paths, 60)
    assert sixty[0] == sixty[1] != sixty[2]  # 30 s apart chain; 90 s do not
    assert len(set(infer_groups(paths, 300))) == 4  # the first three are one walk
    day = infer_groups(paths, "day")
    assert day[0] == day[1] == day[2] == day[3] != day[4] != day[5]
    with pytest.raises(UserError, match="group_window_s must be a number of seconds >= 0 or 'day'"):
        infer_groups(paths, "week")


def test_declared_groups_join_the_photos_taken_close_in_time(tmp_path: Path) -> None:
    """A manifest's `group` stays, and a window joins groups whose photos were taken close together."""
    samples = [
        Sample(tmp_path / "IMG_20240301_100000.jpg", "a", "g1"),
        Sample(tmp_path / "other.jpg", "a", "g1"),
        Sample(tmp_path / "IMG_20240301_100040.jpg", "b", "g2"),
        Sample(tmp_path / "lone.jpg", "b", "g3"),
    ]
    assert pooled_groups(samples) == ["g1", "g1", "g2", "g3"]
    assert pooled_groups(samples, 60) == ["g1", "g1", "g1", "g3"]


def test_folds_keep_a_walk_together_only_with_a_walk_wide_window(tmp_path: Path) -> None:
    root = _walks(tmp_path)

    def split_walks(window: float) -> int:
        split = 0
        for fold in range(3):
            index = discover(root, num_folds=3, fold=fold, seed=1, group_window_s=window)
            train = {s.path.name[13:15] for s in index.splits["train"]}
            split += len(train & {s.path.name[13:15] for s in index.splits["val"]})
        return split

    assert split_walks(10) > 0  # photos a minute apart land on both sides
    assert split_walks(300) == 0


def test_test_fraction_holds_out_whole_groups_whatever_the_seeds(tmp_path: Path) -> None:
    """The locked Test split has a seed of its own: runs with other training or fold seeds never
    move one of its photos into training."""
    root = _walks(tmp_path, walks=10)
    held = [HeldOutTestFold.locked(0.2)]
    tests = []
    for seed in (1, 2, 3):
        index = discover(root, seed=seed, num_folds=3, fold=seed % 3, group_window_s=300, holdouts=held)
        test = {s.path for s in index.splits["test"]}
        assert test.isdisjoint(s.path for s in index.splits["train"] + index.splits["val"])
        tests.append(test)
    assert tests[0] == tests[1] == tests[2]
    walks = Counter(p.name[13:15] for p in tests[0])
    assert set(walks.values()) == {4} and len(walks) == 2  # two whole walks, one of each class
    assert {CLASSES[int(w) % 2] for w in walks} == set(CLASSES)


def test_outer_folds_test_every_photo_once_and_the_refit_trains_on_the_rest(tmp_path: Path) -> None:
    root = _walks(tmp_path, walks=9)
    every = {p for p in root.glob("*.jpg")}
    tested = []
    for k in range(3):
        outer = [HeldOutTestFold.outer(3, k, seed=0)]
        refit = discover(root, num_folds=3, fold=REFIT, group_window_s=300, holdouts=outer)
        assert "val" not in refit.splits
        test = {s.path for s in refit.splits["test"]}
        assert {s.path for s in refit.splits["train"]} == every - test
        inner = discover(root, num_folds=3, fold=0, group_window_s=300, holdouts=outer)
        assert {s.path for s in inner.splits["test"]} == test
        tested.append(test)
    assert sum(len(t) for t in tested) == len(every) == len(set().union(*tested))


def test_too_few_groups_for_the_outer_folds_is_one_line_with_the_counts(tmp_path: Path) -> None:
    root = _walks(tmp_path, walks=4)
    outer = [HeldOutTestFold.outer(5, 0, seed=0)]
    with pytest.raises(UserError) as error:
        discover(root, num_folds=2, fold=0, group_window_s=300, holdouts=outer)
    message = str(error.value)
    assert "\n" not in message
    assert (
        "at least 5 independent photo groups per class; Defective: 2 groups, Non defective: 2 groups"
        in message
    )
    assert "Lower the number of folds" in message
    with pytest.raises(UserError, match="data.test_fraction must be between 0 and 0.5"):
        HeldOutTestFold.locked(0.5)


def test_nested_cv_never_reads_the_locked_test_split(tmp_path: Path) -> None:
    """With data.test_fraction, the outer folds cover every other photo once and none of the locked ones."""
    root = _walks(tmp_path, walks=15)
    (locked,) = held_out_test_folds(0.2, None, 0, seed=0)
    locked_photos = {s.path for s in discover(root, holdouts=[locked], group_window_s=300).splits["test"]}
    outer_tests = []
    for k in range(3):
        holdouts = held_out_test_folds(0.2, 3, k, 0)
        index = discover(root, num_folds=2, fold=REFIT, group_window_s=300, holdouts=holdouts)
        outer_tests.append({s.path for s in index.splits["test"]})
    assert locked_photos and all(test.isdisjoint(locked_photos) for test in outer_tests)
    assert set().union(*outer_tests) == set(root.glob("*.jpg")) - locked_photos


def _job(
    sweep: Path,
    name: str,
    data: dict,
    overrides: list[str],
    files: dict[str, list],
    columns: tuple[str, ...] = ("p_Defective",),
) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    (job / "metrics.json").write_text(json.dumps({"status": "finished", "val": {}, "duration_s": 1.0}))
    for filename, rows in files.items():
        with (job / filename).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", *columns, "epoch"])
            writer.writerows([str(p), label, *np.atleast_1d(score), 1] for p, label, score in rows)


def test_the_nested_estimate_scores_each_outer_fold_at_its_inner_folds_threshold(tmp_path: Path) -> None:
    """Outer fold 0's inner folds put the recall-0.95 threshold at 0.6, outer fold 1's at 0.2: the
    refit's outer scores are judged at their own fold's threshold, never at one chosen on them."""
    photos = [(write_image(tmp_path / "img" / f"{i}.png", seed=i), CLASSES[i % 2]) for i in range(16)]
    sweep, jobs = tmp_path / "sweep", 0
    inner_scores = {0: (0.6, 0.1), 1: (0.2, 0.1)}  # (defects, sound) on each outer fold's inner folds
    for outer in (0, 1):
        held = photos[outer * 8 : outer * 8 + 8]
        rest = photos[(1 - outer) * 8 : (1 - outer) * 8 + 8]
        defect, sound = inner_scores[outer]
        for fold in (0, 1):
            part = [(p, lab, defect if lab == "Defective" else sound) for p, lab in rest[fold::2]]
            data = {"num_folds": 2, "fold": fold, "outer_folds": 2, "outer_fold": outer}
            overrides = [f"data.outer_fold={outer}", f"data.fold={fold}"]
            _job(sweep, str(jobs), data, overrides, {"predictions_val.csv": part})
            jobs += 1
        # the refit scores every outer photo 0.4: a defect at 0.2 (fold 1), sound at 0.6 (fold 0)
        outer_rows = [(p, lab, 0.4) for p, lab in held]
        data = {"num_folds": 2, "fold": REFIT, "outer_folds": 2, "outer_fold": outer}
        overrides = [f"data.outer_fold={outer}", f"data.fold={REFIT}"]
        _job(sweep, str(jobs), data, overrides, {"predictions_test.csv": outer_rows})
        jobs += 1

    summary = summarize_and_write(sweep, show=False)

    (estimate,) = summary.nested
    assert estimate.thresholds[0] == pytest.approx(0.35) and estimate.thresholds[1] == pytest.approx(0.15)
    metrics = estimate.metrics[""]["all"]
    # fold 0's photos (0.4 >= 0.35) and fold 1's (0.4 >= 0.15) are all called defective
    assert metrics["recall"]["value"] == 1.0 and metrics["specificity"]["value"] == 0.0
    assert metrics["n"] == 16 and metrics["threshold"] is None
    assert len(summary.out_of_fold) == 2  # the inner out-of-fold sets, one per outer fold
    saved = json.loads((sweep / "nested.json").read_text())[0]
    assert saved["images"] == 16 and saved["outer_folds"] == 2
    with (sweep / "nested_predictions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 16
    assert "Nested cross-validation estimate (report these)" in (sweep / "summary.md").read_text()


SLEEPERS = ("Good", "Fair", "Poor")


def _tiny_nested_cv(root: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """experiment=nested_cv, 2 outer x (2 inner + refit) jobs of a tiny frozen probe as
    experiment=offline_best trains (the jobs share its feature cache)."""
    return run_cli(
        "railway_defect.train",
        "experiment=nested_cv",
        f"data.root={root}",
        "data.outer_folds=2",
        "data.num_folds=2",
        *overrides,
        "model=resnet18",
        "model.pretrained=false",
        "model.backbone_lr_scale=0",
        "augmentation=none",
        "data.image_size=32",
        "data.cache_size=40",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        f"paths.cache_dir={sweep.parent / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )


P = {"Good": (0.9, 0.08, 0.02), "Poor": (0.05, 0.15, 0.8), "Fair?": (0.55, 0.40, 0.05)}


def test_a_k_class_nested_estimate_decides_each_outer_fold_by_its_inner_folds_class_weights(
    tmp_path: Path,
) -> None:
    """Outer fold 0's inner folds score every Fair frame (0.55, 0.40, 0.05): the argmax calls them
    Good, so they choose weights that lift Fair. Outer fold 1's inner folds score Fair frames
    (0.1, 0.8, 0.1): no lift. The refits score each outer Fair frame (0.55, 0.40, 0.05), which is
    then Fair in fold 0 and Good in fold 1, each at its own fold's rule."""
    photos = [(write_image(tmp_path / "img" / f"{i}.png", seed=i), SLEEPERS[i % 3]) for i in range(24)]
    sweep, jobs = tmp_path / "sweep", 0
    inner_fair = {0: P["Fair?"], 1: (0.1, 0.8, 0.1)}
    common = {"num_folds": 2, "outer_folds": 2, "positive_class": "Poor", "ordinal": list(SLEEPERS)}
    columns = tuple(f"p_{c}" for c in SLEEPERS)
    for outer in (0, 1):
        held, rest = photos[outer * 12 : outer * 12 + 12], photos[(1 - outer) * 12 : (1 - outer) * 12 + 12]
        scored = {**P, "Fair": inner_fair[outer]}
        for fold in (0, 1):
            part = [(p, lab, scored[lab]) for p, lab in rest[fold::2]]
            data = {**common, "fold": fold, "outer_fold": outer}
            overrides = [f"data.outer_fold={outer}", f"data.fold={fold}"]
            _job(sweep, str(jobs), data, overrides, {"predictions_val.csv": part}, columns)
            jobs += 1
        outer_rows = [(p, lab, P["Fair?"] if lab == "Fair" else P[lab]) for p, lab in held]
        data = {**common, "fold": REFIT, "outer_fold": outer}
        overrides = [f"data.outer_fold={outer}", f"data.fold={REFIT}"]
        _job(sweep, str(jobs), data, overrides, {"predictions_test.csv": outer_rows}, columns)
        jobs += 1

    summary = summarize_and_write(sweep, show=False)

    (estimate,) = summary.nested
    lift = [rule.class_weights()[1] / rule.class_weights()[0] for rule in estimate.rules.values()]
    assert lift[0] > 0.55 / 0.40 and lift[1] < 0.55 / 0.40
    block = estimate.class_blocks[""]["at_rule"]
    assert block["confusion_matrix"]["matrix"] == [[8, 0, 0], [4, 4, 0], [0, 0, 8]]
    assert block["balanced_accuracy"]["value"] == pytest.approx((1 + 0.5 + 1) / 3)
    with (sweep / "nested_predictions.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == "Fair"]
    assert (
        sorted((r["outer_fold"], r["predicted"]) for r in rows) == [("0", "Fair")] * 4 + [("1", "Good")] * 4
    )
    saved = json.loads((sweep / "nested.json").read_text())[0]
    assert saved["classes"][""]["worst_miss"] == {
        "true": "Poor",
        "predicted": "Good",
        "count": 0,
        "of": 8,
    }
    assert "Nested estimate of the classes" in (sweep / "summary.md").read_text()


def test_the_label_audit_ranks_the_photos_whose_label_the_predictions_doubt(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = [CLASSES[i % 2] for i in range(60)]
    scores = np.array(
        [rng.uniform(0.7, 0.99) if lab == "Defective" else rng.uniform(0.01, 0.3) for lab in labels]
    )
    flipped = [4, 9, 20]  # these labels contradict confident predictions
    for i in flipped:
        labels[i] = CLASSES[1 - CLASSES.index(labels[i])]
        scores[i] = 0.98 if labels[i] == CLASSES[1] else 0.02
    paths = [f"p{i}.jpg" for i in range(60)]
    audit = label_issues.audit("out-of-fold", paths, labels, scores, np.full(60, 0.5), "Defective")
    assert audit is not None
    assert sorted(int(row["path"][1:-4]) for row in audit.flagged) == flipped
    assert [row["rank"] for row in audit.flagged] == [1, 2, 3]
    assert audit.sensitivity["without the flagged"]["balanced_accuracy"] == 1.0
    assert audit.sensitivity["all photos"]["balanced_accuracy"] < 1.0
    label_issues.write(tmp_path, audit)
    with (tmp_path / "label_issues.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rank", "path", "label", "p_Defective", "label_quality"]


def test_the_label_audit_of_k_classes_ranks_each_class_not_one_against_the_rest(tmp_path: Path) -> None:
    """A Fair frame labelled Good, with predictions sure it is Fair, is doubtful only when the
    audit sees all three classes: positive-vs-rest (Poor against the rest) calls both 'not Poor'."""
    classes = ["Good", "Fair", "Poor"]
    rng = np.random.default_rng(1)
    truth = [i % 3 for i in range(60)]
    probs = np.array([np.roll([rng.uniform(0.8, 0.95), 0.03, 0.02], k) for k in truth])
    probs /= probs.sum(axis=1, keepdims=True)
    labels = [classes[k] for k in truth]
    flipped = [7, 31]  # Fair frames labelled Good
    for i in flipped:
        labels[i], probs[i] = "Good", [0.02, 0.96, 0.02]
    paths = [f"f{i}.jpg" for i in range(60)]
    audit = label_issues.audit_classes(
        "out-of-fold", paths, labels, probs, classes, probs.argmax(axis=1), "Poor"
    )
    assert audit is not None
    assert sorted(int(row["path"][1:-4]) for row in audit.flagged) == flipped
    assert audit.sensitivity["without the flagged"]["balanced_accuracy"] == 1.0
    good_recall = 20 / 22  # 2 of the 22 frames labelled Good are predicted Fair
    assert audit.sensitivity["all photos"]["balanced_accuracy"] == pytest.approx((good_recall + 1 + 1) / 3)
    assert audit.sensitivity["all photos"]["recall"] == 1.0  # of Poor, the positive class
    label_issues.write(tmp_path, audit)
    with (tmp_path / "label_issues.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rank", "path", "label", "p_Good", "p_Fair", "p_Poor", "label_quality"]
    assert (
        "| photos | n | AUROC (one-vs-rest, macro) | macro recall | Poor recall |"
        in label_issues.markdown(audit)
    )


def test_the_label_audit_skips_with_one_line_when_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    labels = ["Defective"] * 10 + ["Non defective"] * 2
    scores = np.linspace(0, 1, 12)
    assert (
        label_issues.audit("out-of-fold", [str(i) for i in range(12)], labels, scores, scores, "Defective")
        is None
    )
    assert "2 out-of-fold photos of the rarer class, cleanlab needs 5" in caplog.text
    monkeypatch.setitem(__import__("sys").modules, "cleanlab.filter", None)
    labels = ["Defective", "Non defective"] * 6
    assert (
        label_issues.audit("out-of-fold", [str(i) for i in range(12)], labels, scores, scores, "Defective")
        is None
    )
    assert "cleanlab is not installed" in caplog.text


@pytest.mark.slow
def test_experiment_nested_cv_runs_inner_folds_and_refits_and_reports_the_estimate(tmp_path: Path) -> None:
    """The one command, with the default callbacks and logger: 2 outer x (2 inner + refit) jobs,
    a frozen probe as experiment=offline_best trains, so the jobs share the feature cache."""
    root = _walks(tmp_path / "data", walks=8, per_walk=3)
    sweep = tmp_path / "nested"
    result = _tiny_nested_cv(root, sweep, "data.group_window_s=300")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(sweep.glob("[0-9]*"))
    folds = [yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["data"] for d in jobs]
    assert sorted((f["outer_fold"], str(f["fold"])) for f in folds) == [
        (o, f) for o in (0, 1) for f in ("0", "1", REFIT)
    ]
    # only the refits score the outer fold; the inner jobs that choose never see it
    tested = {str(f["fold"]) for d, f in zip(jobs, folds, strict=True) if (d / TEST_PREDICTIONS).exists()}
    assert tested == {REFIT}
    (estimate,) = json.loads((sweep / "nested.json").read_text())
    assert estimate["images"] == 24 and len(estimate["thresholds"]) == 2
    with (sweep / "nested_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len({r["path"] for r in rows}) == 24
    assert "nested estimate (all photos): balanced_accuracy" in result.stdout


@pytest.mark.slow
def test_experiment_nested_cv_of_ordered_classes_reports_them_at_the_inner_folds_class_weights(
    tmp_path: Path,
) -> None:
    """Three ordered classes through the one command (default callbacks and logger): each outer
    fold's inner folds choose class weights, and the K-class estimate is reported at them."""
    root = tmp_path / "data"
    for i in range(36):
        write_image(root / SLEEPERS[i % 3] / f"{i}.png", label_index=i % 3, seed=i)
    sweep = tmp_path / "nested"
    result = _tiny_nested_cv(root, sweep, "data.ordinal=[Good,Fair,Poor]", "data.positive_class=Poor")
    assert result.returncode == 0, result.stderr[-3000:]
    (estimate,) = json.loads((sweep / "nested.json").read_text())
    assert sorted(estimate["class_rules"]) == ["0", "1"]
    block = estimate["classes"][""]
    assert np.sum(block["at_rule"]["confusion_matrix"]["matrix"]) == 36  # every frame once, outer fold
    assert block["worst_miss"]["of"] == 12
    with (sweep / "nested_predictions.csv").open() as f:
        assert {r["predicted"] for r in csv.DictReader(f)} <= set(SLEEPERS)
    assert "nested estimate (all photos): macro recall" in result.stdout


def test_a_nested_cv_with_too_few_groups_stops_before_its_first_job(tmp_path: Path) -> None:
    root = _walks(tmp_path / "data", walks=6)
    sweep = tmp_path / "nested"
    result = run_cli(
        "railway_defect.train",
        "experiment=nested_cv",
        f"data.root={root}",
        "data.group_window_s=300",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.outer_folds=5 needs at least 5 independent photo groups per class")
    assert "Defective: 3 groups, Non defective: 3 groups" in last
    assert not list(sweep.glob("[0-9]*"))  # no job started
