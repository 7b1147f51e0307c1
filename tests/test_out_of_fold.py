"""Pooled out-of-fold estimates from a sweep's per-job validation predictions: each image once per
seed, its score the mean over seeds, metrics with intervals overall and per image-size stratum."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from railway_defect.sweeps.summary import summarize_and_write
from tests.helpers import write_image


def _job(
    sweep: Path, name: str, overrides: list[str], rows: list[tuple[Path, str, float]], fold: int = 0
) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"num_folds": 2, "fold": fold}}))
    (job / "metrics.json").write_text(json.dumps({"status": "finished", "val": {}, "duration_s": 1.0}))
    with (job / "predictions_val.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "p_Defective", "epoch"])
        writer.writerows([str(p), label, score, 1] for p, label, score in rows)


def test_sweep_summary_pools_out_of_fold_predictions_per_configuration(tmp_path: Path) -> None:
    # 12 images: the 6 thumbnails (32x32) are scored well, the 6 others badly
    images = []
    for i in range(12):
        size = (32, 32) if i < 6 else (40 + i, 30)
        label = "Defective" if i % 2 == 0 else "Non defective"
        images.append((write_image(tmp_path / "img" / f"{i}.png", size=size, seed=i), label))
    good = {p: (0.9 if label == "Defective" else 0.1) for p, label in images[:6]}
    bad = {p: 0.5 for p, _ in images[6:]}
    scores = {**good, **bad}
    sweep = tmp_path / "sweep"
    for seed in (1, 2):
        for fold in (0, 1):
            part = [(p, label, scores[p]) for i, (p, label) in enumerate(images) if i % 2 == fold]
            overrides = [f"seed={seed}", f"data.fold={fold}", "optimizer.lr=0.1"]
            _job(sweep, f"{seed}{fold}", overrides, part, fold)

    summary = summarize_and_write(sweep, show=False)

    (result,) = summary.out_of_fold
    assert result.jobs == 4 and len(result.images) == 12
    assert all(len(image.scores) == 2 for image in result.images)  # one score per seed
    assert result.configuration == ["optimizer.lr=0.1"]
    thumbnails = result.metrics["32x32@0.5"]
    assert thumbnails["n"] == 6 and thumbnails["balanced_accuracy"]["value"] == pytest.approx(1.0)
    assert result.metrics["other sizes@0.5"]["balanced_accuracy"]["value"] == pytest.approx(0.5)
    assert result.metrics["all@0.5"]["n"] == 12
    pooled = json.loads((sweep / "oof.json").read_text())[0]
    assert pooled["worst_stratum"] == "other sizes"
    assert [m["all"]["balanced_accuracy@0.5"] for m in pooled["per_seed"].values()] == pytest.approx(
        [0.75, 0.75]
    )
    with (sweep / "oof_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["repeats"] for r in rows} == {"2"}
    markdown = (sweep / "summary.md").read_text()
    assert "Out-of-fold estimates" in markdown and "32x32 (6)" in markdown


def test_one_models_estimate_is_each_seeds_predictions_alone(tmp_path: Path) -> None:
    """The mean over seeds is an ensemble's score: here it ranks every image right though neither
    seed's models do. One model (the recipe's final one) is estimated by each seed alone."""
    images = [write_image(tmp_path / "img" / f"{i}.png", size=(32, 32), seed=i) for i in range(8)]
    labels = ["Defective"] * 4 + ["Non defective"] * 4
    scores = {
        1: [0.9, 0.8, 0.7, 0.3, 0.4, 0.2, 0.1, 0.1],  # one defect below one sound image: AUROC 15/16
        2: [0.8, 0.9, 0.3, 0.9, 0.35, 0.5, 0.2, 0.1],  # one defect below two: 14/16
    }
    sweep = tmp_path / "sweep"
    for seed, seed_scores in scores.items():
        for fold in (0, 1):
            rows = [(images[i], labels[i], seed_scores[i]) for i in range(8) if i % 2 == fold]
            _job(sweep, f"{seed}{fold}", [f"seed={seed}", f"data.fold={fold}"], rows, fold)

    (result,) = summarize_and_write(sweep, show=False).out_of_fold
    assert result.metrics["all@0.5"]["auroc"]["value"] == pytest.approx(1.0)
    assert [m["all"]["auroc"] for m in result.per_seed.values()] == pytest.approx([15 / 16, 14 / 16])
    markdown = (sweep / "summary.md").read_text()
    assert "One model's estimate" in markdown and "| 0.906 [0.875, 0.938] |" in markdown

    # the means' threshold (halfway between 0.5 and 0.375) misses each seed's defect scored 0.3;
    # one model's threshold, chosen on both seeds' scores together, catches every defect of each
    assert result.threshold == pytest.approx(0.4375)
    assert result.metrics["all@threshold"]["recall"]["value"] == pytest.approx(1.0)
    assert result.one_model_threshold == pytest.approx(0.25)
    assert [m["all"]["recall@threshold"] for m in result.per_seed.values()] == pytest.approx([1.0, 1.0])
    assert [(np.array(s[:4]) >= result.threshold).mean() for s in scores.values()] == [0.75, 0.75]


def test_jobs_without_folds_have_no_out_of_fold_section(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    image = write_image(tmp_path / "a.png")
    _job(sweep, "0", ["optimizer.lr=0.1"], [(image, "Defective", 0.7)])
    (sweep / "0" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": {"num_folds": None}}))
    summary = summarize_and_write(sweep, show=False)
    assert summary.out_of_fold == []
    assert not (sweep / "oof.json").exists()


def test_vectorised_bootstrap_auroc_equals_weighted_auroc() -> None:
    from sklearn.metrics import roc_auc_score

    from railway_defect.utils.metrics import _resampled_auroc, _resampled_counts

    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60), 1)  # ties on purpose
    w_pos = _resampled_counts(int(labels.sum()), 5, rng)
    w_neg = _resampled_counts(int((~labels).sum()), 5, rng)
    fast = _resampled_auroc(scores[labels], scores[~labels], w_pos, w_neg)
    y = np.r_[np.ones(labels.sum()), np.zeros((~labels).sum())]
    s = np.r_[scores[labels], scores[~labels]]
    slow = [roc_auc_score(y, s, sample_weight=np.r_[wp, wn]) for wp, wn in zip(w_pos, w_neg, strict=True)]
    np.testing.assert_allclose(fast, slow)


def test_a_configuration_missing_folds_has_no_out_of_fold_estimate(tmp_path: Path) -> None:
    """One fold of two covers half of the images: not an estimate for the data set."""
    sweep = tmp_path / "sweep"
    image = write_image(tmp_path / "a.png")
    _job(sweep, "0", ["data.fold=0"], [(image, "Defective", 0.7)], fold=0)
    assert summarize_and_write(sweep, show=False).out_of_fold == []


def test_an_ensembles_class_weights_are_chosen_on_the_mean_probabilities_it_scores_with() -> None:
    """Seed 2's model scores Good and Fair frames alike, seed 1's tells them apart; averaged, the
    ensemble tells them apart. Weights chosen for one model (every seed's rows together) call the
    ensemble's Good frames Fair; weights chosen on the means (what evaluate stores beside an
    ensemble) decide every frame right."""
    from sklearn.metrics import balanced_accuracy_score

    from railway_defect.sweeps import oof

    classes = ["Good", "Fair", "Poor"]
    seeds = {
        "Good": [[0.30, 0.69, 0.01], [0.30, 0.69, 0.01]],
        "Fair": [[0.05, 0.94, 0.01], [0.30, 0.69, 0.01]],
        "Poor": [[0.05, 0.05, 0.90], [0.05, 0.05, 0.90]],
    }
    images = [
        oof.ImagePrediction(f"{c}{i}.jpg", c, scores=[p[2] for p in seeds[c]], class_probs=seeds[c])
        for c in classes
        for i in range(6)
    ]
    strata = {i.path: "all" for i in images}
    result = oof.score(oof.OutOfFold(["x"], 2, "Poor", images, strata, {}, classes=classes), resamples=10)
    targets = np.array([classes.index(i.label) for i in images])
    means = np.array([np.mean(i.class_probs, axis=0) for i in images])
    one_model, ensemble = result.one_model_rule, oof.ensemble_rule(result)
    assert one_model is not None and ensemble is not None
    assert balanced_accuracy_score(targets, one_model.labels(means)) == pytest.approx(2 / 3)
    assert balanced_accuracy_score(targets, ensemble.labels(means)) == 1.0
