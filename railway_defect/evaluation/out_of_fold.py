"""Out-of-fold evaluation: the operating threshold of a cross-validation sweep's ensemble, or of the
final model its recipe trained on every labelled photo, is chosen on the sweep's pooled
out-of-fold predictions (every image scored by the fold model that never trained on it), not on
images the model trained on, and stored beside that model for predict, serve and export."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import rich

from railway_defect.inference.model import (
    Calibration,
    EnsemblePredictor,
    Predictor,
    model_checkpoints,
    write_calibration,
)
from railway_defect.models.contract import ModelContract
from railway_defect.sweeps import oof
from railway_defect.sweeps.summary import pooled_out_of_fold, read_job
from railway_defect.training.checks import checkpoint_hparams
from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import job_dirs, run_dir_of
from railway_defect.utils.outputs import write_json_atomic, write_text_atomic


def _pooled(sweep: Path, target_recall: float, bootstrap: int) -> oof.OutOfFold:
    results = pooled_out_of_fold([read_job(d) for d in job_dirs(sweep)])
    if not results:
        raise UserError(
            f"{sweep} has no out-of-fold predictions (predictions_val.csv of cross-validation jobs); "
            "train it with experiment=cv (or data.num_folds=K 'data.fold=range(K)')."
        )
    return oof.score(results[0], target_recall, bootstrap)


def _check_same_recipe(predictor: Predictor, sweep: Path) -> None:
    """The final model must see images as the sweep's fold models did, or their threshold means
    nothing. Reads the fold models' stored hyperparameters only, not their weights."""
    members = model_checkpoints(sweep) if sweep.is_dir() else []
    if len(members) < 2:
        raise UserError(f"oof={sweep} is not a cross-validation sweep directory (it holds one model).")
    ours = predictor.contract.without_rule().to_dict()  # thresholds may differ, preprocessing not
    theirs = [ModelContract.from_hparams(checkpoint_hparams(m)).without_rule().to_dict() for m in members]
    differing = sorted({k for info in theirs for k in ours if ours[k] != info[k]})
    if differing:
        raise UserError(
            f"ckpt_path and the models of oof={sweep} differ in {', '.join(differing)}; give the "
            "cross-validation sweep of the recipe ckpt_path was trained with."
        )


def evaluate_out_of_fold(
    predictor: Predictor,
    target_recall: float,
    sweep: str | Path | None = None,
    output_dir: str | None = None,
    store_calibration: bool = True,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Choose `predictor`'s threshold for `target_recall` on a CV sweep's pooled out-of-fold
    predictions and report them with intervals (`bootstrap` resamples). `predictor`: the sweep's
    ensemble, or the final model of the same recipe (data.train_on=train_and_val); `sweep`: default
    the ensemble's own; `output_dir`: default <sweep>/evaluation/ensemble_oof/ or
    <run>/evaluation/<model>_oof/; `store_calibration`: write the threshold beside the model."""
    is_ensemble = isinstance(predictor, EnsemblePredictor)
    sweep = Path(sweep).expanduser() if sweep else predictor.path
    if not is_ensemble:
        _check_same_recipe(predictor, sweep)
    pooled = _pooled(sweep, target_recall, bootstrap)
    threshold = pooled.threshold if is_ensemble else pooled.one_model_threshold
    rule = oof.ensemble_rule(pooled) if is_ensemble else pooled.one_model_rule  # K classes: class weights
    costs = rule.costs if rule else None
    details = {
        "fitted_on": f"out-of-fold predictions of {len(pooled.images)} images in {sweep}",
        "target_recall": target_recall,
        "fitted_at": datetime.now().isoformat(timespec="seconds"),
    }
    calibration = Calibration(threshold=threshold, temperature=1.0, details=details, costs=costs)
    sidecar = None
    if store_calibration:
        sidecar = write_calibration(predictor.path, calibration, predictor.sha256, predictor.contract)
    out = Path(output_dir) if output_dir else _default_output(predictor, is_ensemble)
    report = {
        "model": {**predictor.describe(), "threshold": threshold},
        "out_of_fold_sweep": str(sweep),
        "out_of_fold": oof.to_json([pooled])[0],
        "calibration_file": str(sidecar) if sidecar else None,
        "output_dir": str(out),
    }
    lines = _markdown(predictor, sweep, pooled, target_recall, is_ensemble) + _rule_markdown(
        pooled, rule, target_recall, is_ensemble
    )
    write_json_atomic(out / "evaluation.json", report)
    write_text_atomic(out / "evaluation.md", "\n".join(lines))
    console = rich.get_console()
    console.print("\n".join(lines[2:]), markup=False, soft_wrap=True)
    if sidecar:
        console.print(f"stored: {sidecar}", soft_wrap=True, markup=False)
    return report


def _default_output(predictor: Predictor, is_ensemble: bool) -> Path:
    if is_ensemble:
        return predictor.path / "evaluation" / "ensemble_oof"

    return run_dir_of(predictor.path) / "evaluation" / f"{predictor.path.stem}_oof"


def _markdown(
    predictor: Predictor, sweep: Path, pooled: oof.OutOfFold, target_recall: float, is_ensemble: bool
) -> list[str]:
    if is_ensemble:
        title = f"# Evaluation of the ensemble {sweep.name} ({len(predictor.members)} fold models)"
        chosen = (
            f"Threshold {pooled.threshold:.4f}: defect recall >= {target_recall} on the pooled "
            "out-of-fold predictions, an image's score the mean over seeds (chosen on them, so metrics "
            "at it are optimistic). The ensemble averages models that each saw more data than any "
            "single fold model; out-of-fold numbers estimate one fold model."
        )
    else:
        title = f"# Evaluation of {predictor.path} by its recipe's cross-validation ({sweep.name})"
        chosen = (
            f"Threshold {pooled.one_model_threshold:.4f}: defect recall >= {target_recall} on every "
            "seed's out-of-fold predictions together, as one model scores (chosen on them, so "
            "metrics at it are optimistic). The final model saw every image these fold models were "
            "scored on; it is estimated by one model's rows below, not by the mean over seeds."
        )
    return [title, "", chosen, "", *oof.markdown_table([pooled]), "", *oof.one_model_table([pooled]), ""]


def _rule_markdown(
    pooled: oof.OutOfFold, rule: DecisionRule | None, target_recall: float, is_ensemble: bool
) -> list[str]:
    """K classes: which class weights were stored, and on which predictions they were chosen."""
    if rule is None:
        return []
    on = (
        "the images' mean probabilities over seeds, as the ensemble scores"
        if is_ensemble
        else "every seed's out-of-fold predictions together, as one model scores"
    )
    return [
        f"The classes are decided by {rule.describe(pooled.classes)}: the best macro recall whose "
        f"{pooled.positive_class} recall reaches {target_recall} on {on} (chosen on them: optimistic; "
        "the nested CV of the recipe, experiment=nested_cv, estimates this choice).",
        "",
    ]
