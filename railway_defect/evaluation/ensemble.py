"""Evaluate a cross-validation sweep's ensemble: its operating threshold is chosen on the pooled
out-of-fold predictions (every image scored by the fold model that never trained on it), not on
images the members trained on, and stored in the sweep directory for predict, serve and export."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import rich

from railway_defect.inference.model import Calibration, EnsemblePredictor, write_calibration
from railway_defect.sweeps import oof
from railway_defect.sweeps.summary import job_dirs, pooled_out_of_fold, read_job
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import write_json_atomic, write_text_atomic


def evaluate_ensemble(
    predictor: EnsemblePredictor,
    target_recall: float,
    output_dir: str | None = None,
    store_calibration: bool = True,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Evaluate a CV sweep's ensemble on its pooled out-of-fold predictions (every image scored by
    the fold model that never trained on it), choosing the threshold for `target_recall` there.

    Args:
        predictor: the sweep's ensemble (`load_predictor(<sweep dir>)`).
        target_recall: defect recall the operating threshold must reach out of fold.
        output_dir: where the report goes (default `<sweep>/evaluation/ensemble_oof/`).
        store_calibration: write the threshold to `<sweep>/calibration.json` for the ensemble.
        bootstrap: resamples for the intervals.
    """
    sweep = predictor.path
    results = pooled_out_of_fold([read_job(d) for d in job_dirs(sweep)])
    if not results:
        raise UserError(
            f"{sweep} has no out-of-fold predictions (predictions_val.csv of cross-validation jobs); "
            "train it with experiment=cv (or data.num_folds=K 'data.fold=range(K)')."
        )
    pooled = oof.score(results[0], target_recall, bootstrap)
    calibration = Calibration(
        threshold=pooled.threshold,
        temperature=1.0,
        details={
            "fitted_on": f"out-of-fold predictions of {len(pooled.images)} images",
            "target_recall": target_recall,
            "members": len(predictor.members),
            "fitted_at": datetime.now().isoformat(timespec="seconds"),
        },
    )
    sidecar = write_calibration(sweep, calibration, predictor.sha256) if store_calibration else None
    out = Path(output_dir) if output_dir else sweep / "evaluation" / "ensemble_oof"
    report = {
        "model": {**predictor.describe(), "threshold": pooled.threshold, "members": len(predictor.members)},
        "out_of_fold": oof.to_json([pooled])[0],
        "calibration_file": str(sidecar) if sidecar else None,
        "output_dir": str(out),
    }
    lines = [
        f"# Evaluation of the ensemble {sweep.name} ({len(predictor.members)} fold models)",
        "",
        f"Threshold {pooled.threshold:.4f}: defect recall >= {target_recall} on the pooled out-of-fold "
        "predictions (chosen on them, so metrics at it are optimistic). The ensemble averages models that "
        "each saw more data than any single fold model; out-of-fold numbers estimate one fold model.",
        "",
        *oof.markdown_table([pooled]),
        "",
    ]
    write_json_atomic(out / "evaluation.json", report)
    write_text_atomic(out / "evaluation.md", "\n".join(lines))
    console = rich.get_console()
    console.print("\n".join(lines[2:]), markup=False, soft_wrap=True)
    if sidecar:
        console.print(f"stored: {sidecar}", soft_wrap=True, markup=False)
    return report
