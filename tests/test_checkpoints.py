"""Every option that changes what a checkpoint stores gives a checkpoint that every command can use:
it loads with weights_only=True, and evaluate, predict, export and serve score with it applying the
stored preprocessing (storage form included). Evaluate scores the run's own recorded split."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from railway_defect.data.images import decode_image
from railway_defect.evaluation.report import run_evaluation
from railway_defect.inference.exporting import export_model
from railway_defect.inference.model import load_predictor
from railway_defect.inference.predicting import Decision, run_prediction
from railway_defect.inference.service import create_app
from railway_defect.models.contract import ModelContract
from railway_defect.models.module import DefectClassifier
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from tests.helpers import FAST, make_split_dataset, run_cli, write_image

OPTIONS = {
    "balance_loss": ("data.balance=loss",),
    "harmonize": ("data.harmonize=thumbnail",),
    "nuisance_augmentation": ("augmentation=nuisance",),
    "image_size": ("data.image_size=48", "data.cache_size=56"),
    "label_smoothing": ("model.label_smoothing=0.1",),
    "backbone_lr_and_warmup": ("model.backbone_lr_scale=0.1", "scheduler=warmup_cosine"),
    "no_selection": ("callbacks.model_checkpoint.monitor=null",),
    "ema": ("callbacks=ema",),
    "mixup_cutmix": ("model.mixup_alpha=0.2", "model.cutmix_alpha=1.0"),
    "freeze_then_unfreeze": ("callbacks=finetune", "callbacks.finetune.unfreeze_backbone_at_epoch=1"),
    "frozen_backbone_head_norm": ("model.backbone_lr_scale=0", "model.head_norm=true"),
    "flip_invariant": ("model.flip_invariant=true",),
    "num_heads": ("model.backbone_lr_scale=0", "model.head_norm=true", "model.num_heads=3"),
    "decision_threshold": ("model.decision_threshold=0.3",),
}


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_checkpoint_of_each_option_works_in_every_command(compose_train, tmp_path: Path, option: str) -> None:
    data = make_split_dataset(tmp_path / "data", {"Train": 4, "Validation": 2})
    cfg = compose_train(*FAST, "trainer.max_epochs=2", f"data.root={data}", *OPTIONS[option])
    run_training(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    torch.load(ckpt, map_location="cpu", weights_only=True)  # plain values only

    predictor = load_predictor(ckpt, device="cpu")
    assert predictor.contract.harmonize == cfg.data.harmonize
    assert predictor.contract.input_size == cfg.data.image_size
    assert predictor.calibration.threshold == cfg.model.decision_threshold  # until evaluate stores one
    # the bare network that scores (no Lightning) gives the Lightning module's logits, bit for bit
    size = cfg.data.image_size
    batch = np.random.default_rng(0).random((3, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        expected = predictor.model(torch.from_numpy(batch)).numpy()
    np.testing.assert_array_equal(predictor.logits(batch), expected)

    report = run_evaluation(str(ckpt), str(data), bootstrap=20, output_dir=str(tmp_path / "eval"))
    assert report["data"]["n"] == 4
    predictions = _read(tmp_path / "eval" / "predictions_validation.csv")
    assert len(predictions) == 4 and {r["predicted"] for r in predictions} <= {"Defective", "Non defective"}

    summary = run_prediction(str(ckpt), str(data / "Validation"), tmp_path / "p.csv", progress=False)
    assert summary.rows == 4 and summary.failed == 0
    exported = export_model(str(ckpt), "onnx", tmp_path / "model.onnx")
    assert exported["max_abs_diff"] < 1e-3
    onnx = load_predictor(tmp_path / "model.onnx")
    assert onnx.contract.harmonize == cfg.data.harmonize

    client = TestClient(create_app(onnx, Decision.from_config(0.5, 1.0, None)))
    photo = next((data / "Validation" / "Defective").iterdir())
    response = client.post("/predict", files=[("files", (photo.name, photo.read_bytes(), "image/png"))])
    assert response.status_code == 200, response.text
    (row,) = response.json()["predictions"]
    (expected,) = [r for r in _read(tmp_path / "p.csv") if Path(r["path"]) == photo]
    assert row["p_Defective"] == pytest.approx(float(expected["p_Defective"]), abs=1e-4)


def test_scoring_a_checkpoint_imports_neither_lightning_nor_torchmetrics(tmp_path: Path) -> None:
    """predict, serve and triage score through models.network, and the Hydra callbacks every
    command runs import no Lightning either: a serving process does not carry it (BENCHMARKS.md
    section 10)."""
    contract = ModelContract.for_backbone("resnet18", ["Defective", "Non defective"], "Defective", 32)
    model = DefectClassifier("resnet18", contract, pretrained=False)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, ckpt)
    code = (
        "import sys, numpy as np\n"
        "import railway_defect.inference.service, railway_defect.sweeps.hydra_callbacks\n"
        "from railway_defect.inference.model import load_predictor\n"
        "p = load_predictor(sys.argv[1], 'cpu')\n"
        "p.probabilities(np.zeros((2, 3, 32, 32), np.float32))\n"
        "p.features(np.zeros((1, 3, 32, 32), np.float32))\n"
        "print([m for m in ('lightning', 'torchmetrics') if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_checkpoint_written_before_the_head_options_scores_as_the_module_loads_it(tmp_path: Path) -> None:
    """Keys added to the model later (head_norm, flip_invariant, num_heads, ...) are missing from older
    checkpoints: the scoring network takes the same defaults as DefectClassifier, so both agree."""
    contract = ModelContract.for_backbone("resnet18", ["Defective", "Non defective"], "Defective", 32)
    model = DefectClassifier("resnet18", contract, pretrained=False)
    later = ("dropout", "head_norm", "flip_invariant", "num_heads", "channels_last")
    hparams = {k: v for k, v in model.hparams.items() if k not in later}
    ckpt = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": model.state_dict()}, ckpt)
    predictor = load_predictor(ckpt, device="cpu")
    batch = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        expected = predictor.model(torch.from_numpy(batch)).numpy()
    np.testing.assert_array_equal(predictor.logits(batch), expected)


def test_harmonize_brings_every_photo_to_one_storage_form(tmp_path: Path) -> None:
    big = write_image(tmp_path / "big.jpg", size=(640, 480))
    thumb = write_image(tmp_path / "thumb.jpg", size=(224, 224))
    for path in (big, thumb):
        assert decode_image(path.read_bytes(), 256, mode="thumbnail").shape == (224, 224, 3)
    assert decode_image(big.read_bytes(), 256).shape == (256, 341, 3)


def test_evaluate_scores_the_runs_recorded_split_not_a_new_one(compose_train, tmp_path: Path) -> None:
    """Class folders are split at training time with the run's seed; evaluate with another seed
    must still score the run's validation images, and refuse changed or unrecorded ones."""
    data = tmp_path / "data"
    for i in range(24):
        label = ("Defective", "Non defective")[i % 2]
        write_image(data / label / f"{i}.png", label_index=i % 2, seed=i)
    cfg = compose_train(*FAST, "trainer.max_epochs=1", f"data.root={data}", "seed=7")
    run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    recorded = {Path(r["path"]).name for r in _read(run_dir / "splits.csv") if r["split"] == "val"}

    run_evaluation(str(ckpt), str(data), seed=42, bootstrap=20, output_dir=str(tmp_path / "eval"))
    scored = {Path(r["path"]).name for r in _read(tmp_path / "eval" / "predictions_validation.csv")}
    assert scored == recorded

    changed = next(p for p in sorted(data.rglob("*.png")) if p.name in recorded)
    backup = tmp_path / "backup.png"
    shutil.copy(changed, backup)
    write_image(changed, seed=999)
    with pytest.raises(UserError, match="changed since the run recorded them"):
        run_evaluation(str(ckpt), str(data), bootstrap=20, output_dir=str(tmp_path / "eval2"))
    shutil.copy(backup, changed)

    from railway_defect.review.runs import evaluate_checkpoint

    reviewed = evaluate_checkpoint(run_dir, data_root=data)  # the notebook's path: the same images
    assert {p.name for p in reviewed.paths} == recorded

    (run_dir / "splits.csv").unlink()
    with pytest.raises(UserError, match="splits=resplit"):
        run_evaluation(str(ckpt), str(data), bootstrap=20, output_dir=str(tmp_path / "eval3"))
    report = run_evaluation(
        str(ckpt), str(data), splits="resplit", bootstrap=20, output_dir=str(tmp_path / "eval4")
    )
    assert report["data"]["splits"] == "resplit"

    # reviewed labels (here every photo the other class): a re-split scores the reviewed ones
    manifest = tmp_path / "reviewed.csv"
    swapped = {"Defective": "Non defective", "Non defective": "Defective"}
    lines = [f"{p.relative_to(data)},{swapped[p.parent.name]}\n" for p in sorted(data.rglob("*.png"))]
    manifest.write_text("path,label\n" + "".join(lines))
    with pytest.raises(UserError, match="data.labels=.* is read with splits=resplit only"):
        run_evaluation(str(ckpt), str(data), labels=str(manifest), output_dir=str(tmp_path / "eval5"))
    out = tmp_path / "eval6"
    run_evaluation(
        str(ckpt), str(data), splits="resplit", labels=str(manifest), bootstrap=20, output_dir=str(out)
    )
    rows = _read(out / "predictions_validation.csv")
    assert rows and all(r["label"] == swapped[Path(r["path"]).parent.name] for r in rows)


def test_a_cv_sweep_directory_is_an_ensemble_in_every_command(tmp_path: Path) -> None:
    """ckpt_path=<sweep dir>: the fold models' mean probability, its threshold chosen by evaluate on
    the pooled out-of-fold predictions and stored in the sweep, one ONNX graph when exported."""
    data = make_split_dataset(tmp_path / "data", {"Train": 4, "Validation": 2})
    sweep = tmp_path / "cv"
    result = run_cli(
        "railway_defect.train",
        "experiment=cv",
        "data.num_folds=2",
        *FAST,
        "trainer.max_epochs=1",
        f"data.root={data}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ensemble = load_predictor(sweep, device="cpu")
    assert ensemble.kind == "ensemble" and len(ensemble.members) == 2
    # the members are the final weights the out-of-fold predictions came from, not a selected epoch
    assert [m.path.name for m in ensemble.members] == ["last.ckpt", "last.ckpt"]
    member, oof = ensemble.members[0], pd.read_csv(sweep / "0" / "predictions_val.csv")
    batch = member.preprocess([member.decode(Path(path).read_bytes()) for path in oof["path"]])
    np.testing.assert_allclose(member.probabilities(batch)[:, 0], oof["p_Defective"], atol=1e-5)

    report = run_evaluation(str(sweep), str(data), bootstrap=20)
    stored = json.loads((sweep / "calibration.json").read_text())
    assert stored["threshold"] == pytest.approx(report["out_of_fold"]["threshold"])
    assert report["out_of_fold"]["images"] == 12  # Train + Validation pooled, each image once
    assert load_predictor(sweep, device="cpu").calibration.threshold == pytest.approx(stored["threshold"])

    images = next((data / "Validation" / "Defective").iterdir())
    batch = ensemble.preprocess([ensemble.decode(images.read_bytes())])
    mean = np.mean([m.probabilities(batch) for m in ensemble.members], axis=0)
    np.testing.assert_allclose(ensemble.probabilities(batch), mean, atol=1e-6)
    exported = export_model(str(sweep), "onnx", tmp_path / "ensemble.onnx")
    assert exported["max_abs_diff"] < 1e-4
    summary = run_prediction(str(sweep), str(data / "Validation"), tmp_path / "p.csv", progress=False)
    assert summary.rows == 4

    _final_model_takes_its_threshold_from_the_sweep(data, sweep, stored["threshold"], tmp_path)

    other = tmp_path / "other"
    shutil.copytree(sweep / "0", other / "a")
    overrides = other / "a" / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- optimizer.lr=0.5\n")
    shutil.copytree(sweep / "1", other / "b")
    with pytest.raises(UserError, match="different recipes"):
        load_predictor(other, device="cpu")


def _with_second_seed(sweep: Path) -> Path:
    """A copy of a one-seed, two-fold sweep plus a second seed whose fold models score every defect
    1 but one, which they score 0, and every sound image 0.5."""
    two = sweep.with_name(sweep.name + "_two_seeds")
    for fold in (0, 1):
        for seed, job in ((1, two / str(fold)), (2, two / str(fold + 2))):
            shutil.copytree(sweep / str(fold), job)
            overrides = job / ".hydra" / "overrides.yaml"
            overrides.write_text(overrides.read_text() + f"- seed={seed}\n")
        predictions = pd.read_csv(job / "predictions_val.csv")  # the second seed's job
        defective = predictions["label"] == "Defective"
        predictions["p_Defective"] = np.where(defective, 1.0, 0.5)
        if fold == 0:
            predictions.loc[defective.idxmax(), "p_Defective"] = 0.0
        predictions.to_csv(job / "predictions_val.csv", index=False)
    return two


def _final_model_takes_its_threshold_from_the_sweep(
    data: Path, sweep: Path, threshold: float, tmp_path: Path
) -> None:
    """evaluate oof=<sweep>: the recipe's final model (every labelled photo trained it) gets the
    threshold chosen on the sweep's out-of-fold predictions; a model of another recipe is refused."""
    finals = {}
    for name, size in (("final", ()), ("other_size", ("data.image_size=48",))):
        finals[name] = tmp_path / name
        result = run_cli(
            "railway_defect.train",
            *FAST,
            "trainer.max_epochs=1",
            f"data.root={data}",
            "data.train_on=train_and_val",
            "callbacks.model_checkpoint.monitor=null",
            *size,
            f"hydra.run.dir={finals[name]}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    evaluated = run_cli(
        "railway_defect.evaluate",
        f"ckpt_path={finals['final']}",
        f"oof={sweep}",
        f"data.root={data}",
        "bootstrap=20",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    final = load_predictor(finals["final"], device="cpu")
    assert final.calibration.threshold == pytest.approx(threshold)
    assert (final.path.parent / "best.ckpt.calibration.json").is_file()

    # with two seeds, a final model (one model) takes the threshold chosen on every seed's scores
    # together, not the one on their mean: the second seed's models score one defect 0
    report = run_evaluation(str(finals["final"]), str(data), oof=str(_with_second_seed(sweep)), bootstrap=20)
    assert report["out_of_fold"]["threshold"] > 0.0
    assert report["out_of_fold"]["one_model_threshold"] == pytest.approx(0.0)
    assert load_predictor(finals["final"], device="cpu").calibration.threshold == pytest.approx(0.0)
    with pytest.raises(UserError, match="differ in input_size; give the cross-validation sweep"):
        run_evaluation(str(finals["other_size"]), str(data), oof=str(sweep), bootstrap=20)
    with pytest.raises(UserError, match="is not a cross-validation sweep directory"):
        run_evaluation(str(finals["final"]), str(data), oof=str(finals["other_size"]), bootstrap=20)


def test_a_checkpoint_written_at_9b081f6_loads_with_its_contract(tmp_path: Path) -> None:
    """Checkpoints from before the model contract stored flat constructor arguments (recorded from
    one written by the code at 9b081f6: its hyperparameters and weight names, tests/data/). The
    weights' layout is unchanged, and the flat keys become the same contract a new run stores."""
    old = json.loads((Path(__file__).parent / "data" / "checkpoint_9b081f6.json").read_text())
    hparams = old["hyper_parameters"]
    expected = ModelContract(
        ("Defective", "Non defective"),
        "Defective",
        64,
        72,
        hparams["mean"],
        hparams["std"],
        "thumbnail",
        0.3,
        "resnet18",
    )
    model = DefectClassifier("resnet18", expected, pretrained=False).eval()
    assert sorted(model.state_dict()) == old["state_dict_keys"]
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": model.state_dict()}, path)

    predictor = load_predictor(path)
    assert predictor.contract == expected
    assert predictor.calibration.threshold == 0.3  # its model.decision_threshold
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(predictor.logits(images.numpy()), model(images).numpy(), atol=1e-5)
    # saved again, it carries the contract itself
    resaved = tmp_path / "new.ckpt"
    torch.save({"hyper_parameters": dict(predictor.model.hparams), "state_dict": model.state_dict()}, resaved)
    assert torch.load(resaved, weights_only=True)["hyper_parameters"]["contract"] == expected.to_dict()


def test_validation_review_and_predict_score_a_photo_alike(
    compose_train, tiny_dataset: Path, tmp_path: Path
) -> None:
    """One scoring: the validation loop (predictions_val.csv), the review notebook's evaluation
    (inference.scoring, as evaluate scores) and predict give each validation photo one p."""
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "callbacks.model_checkpoint.monitor=null")
    run_training(cfg)  # nothing selects: best.ckpt is the final epoch, whose scores the CSV holds
    run_dir = Path(cfg.paths.output_dir)
    validated = {r["path"]: float(r["p_Defective"]) for r in _read(run_dir / "predictions_val.csv")}

    from railway_defect.review.runs import evaluate_checkpoint

    reviewed = evaluate_checkpoint(run_dir, data_root=tiny_dataset)
    by_review = dict(zip(map(str, reviewed.paths), reviewed.probs[:, reviewed.positive_index], strict=True))
    run_prediction(str(run_dir), str(tiny_dataset / "Validation"), tmp_path / "p.csv", progress=False)
    predicted = {r["path"]: float(r["p_Defective"]) for r in _read(tmp_path / "p.csv")}
    assert set(validated) == set(by_review) == set(predicted) and len(validated) == 6
    for path, p in validated.items():
        assert by_review[path] == pytest.approx(p, abs=1e-5) and predicted[path] == pytest.approx(p, abs=1e-5)
