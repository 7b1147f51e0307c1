"""Compare training recipes by repeated, group-aware K-fold cross-validation on the sample data and
write STUDY.md: per recipe, the pooled out-of-fold balanced accuracy and defect recall at the
chosen threshold (overall and in each image-size stratum, with 95% intervals), AUROC, and the time
one full training took. Recipes are selected by these numbers, never by the Validation folder.

Each recipe is one CV sweep (`data.fold=range(K)` x seeds, as `experiment=cv` runs it) in
<out>/<recipe>/, summarised by the sweep summary (oof.json); recipes whose sweep already finished
are read, not run again, and an interrupted sweep continues (`ckpt_path=last`: each job from its
own last.ckpt). SIGTERM stops the running sweeps, their jobs saving last.ckpt.

    python benchmarks/study_recipes.py [--recipes a,b] [--seeds 1,2] [--folds 5] [--n-jobs 2]
        [--parallel 1] [--out outputs/study] [--read-only] [--quick]
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import PROJECT_ROOT, SAMPLE_DATA, machine_info, parser

from railway_defect.sweeps.oof import format_metric, one_model_summary

# shared by every recipe: no review images (figures cost time and change no number)
# and no loader workers (images are decoded once; several jobs share the machine's cores)
COMMON = ("callbacks.review=null", "model.pretrained=true", "data.num_workers=0")
# the offline recipe of the README before this study
BASELINE = ("model=efficientnet_lite0",)
# the levers of issue 11 on top of a longer, gentler fine-tuning
TUNED = (
    "model=efficientnet_lite0",
    "trainer.max_epochs=15",
    "scheduler=warmup_cosine",
    "model.backbone_lr_scale=0.1",
    "optimizer.weight_decay=0.01",
    "data.balance=loss",
)


def _with(base: tuple[str, ...], *overrides: str) -> tuple[str, ...]:
    """`base` with `overrides`, a key given again replacing its earlier value."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return (*(o for o in base if o.split("=", 1)[0] not in keys), *overrides)


# EfficientNet-Lite2 at its native 260 px, one storage form, storage form randomised in training
LITE2 = _with(
    TUNED,
    "model=efficientnet_lite2",
    "data.harmonize=thumbnail",
    "augmentation=nuisance",
    "data.image_size=260",
    "data.cache_size=260",
)

# a linear probe: the pretrained backbone frozen, only the head learns (more steps at a higher lr)
PROBE = _with(LITE2, "model.backbone_lr_scale=0", "optimizer.lr=0.01", "trainer.max_epochs=30")

# the flip-invariant standardised probe without random augmentation, five heads (repetition 11)
HEADS5 = _with(
    PROBE,
    "model.flip_invariant=true",
    "model.head_norm=true",
    "optimizer.lr=0.001",
    "augmentation=none",
    "model.num_heads=5",
)

# ... on the pooled features of three stages of blocks beside the final ones, at 448 px with every
# photo in its own storage form: experiment=offline_best (issue 27, STUDY.md)
STAGES448 = _with(
    HEADS5,
    "model=efficientnet_lite2_stages",
    "data.harmonize=none",
    "data.image_size=448",
    "data.cache_size=448",
)
# ... in batches of 16, gradients accumulated over 2
STAGES448_B16X2 = _with(STAGES448, "data.batch_size=16", "+trainer.accumulate_grad_batches=2")

RECIPES: dict[str, tuple[str, ...]] = {
    "baseline": BASELINE,
    "tuned": TUNED,
    "tuned_nuisance": _with(TUNED, "augmentation=nuisance"),
    "tuned_harmonize": _with(TUNED, "data.harmonize=thumbnail"),
    "tuned_harmonize_nuisance": _with(TUNED, "data.harmonize=thumbnail", "augmentation=nuisance"),
    "tuned_harmonize_nuisance_320": _with(
        TUNED,
        "data.harmonize=thumbnail",
        "augmentation=nuisance",
        "data.image_size=320",
        "data.cache_size=320",
    ),
    # experiment=offline_best until the linear probe replaced it
    "lite2_harmonize_nuisance": LITE2,
    # offline_best with every class x image-size cell drawn evenly instead of the class-weighted loss
    "lite2_harmonize_nuisance_stratum": _with(LITE2, "data.balance=stratum"),
    "lite2_harmonize_nuisance_384": _with(LITE2, "data.image_size=384", "data.cache_size=384"),
    # experiment=offline_best from repetition 4 until flip-invariant features replaced it
    "lite2_probe": PROBE,
    "lite2_probe_noaug": _with(PROBE, "augmentation=none"),
    # the probe on one fixed split (data.split_seed) with several training seeds: the mean over seeds is
    # then an ensemble of models trained on the same photos, as a seed ensemble of the final model is
    "lite2_probe_split1": _with(PROBE, "data.split_seed=1"),
    # the probe with mixup of training batches (soft targets between pairs of photos)
    "lite2_probe_mixup": _with(PROBE, "model.mixup_alpha=0.2"),
    # the probe's head weights averaged over its last steps (Lightning's EMAWeightAveraging)
    "lite2_probe_ema": _with(PROBE, "callbacks=ema"),
    # the probe with cutmix of training batches (a patch of one photo pasted into another)
    "lite2_probe_cutmix": _with(PROBE, "model.cutmix_alpha=1.0"),
    # the probe with the stronger photometric and geometric augmentation instead of the nuisance one
    "lite2_probe_strong": _with(PROBE, "augmentation=strong"),
    # the probe with its features standardised before the linear layer
    "lite2_probe_norm": _with(PROBE, "model.head_norm=true"),
    # ... at a tenth of the lr: standardised features make lr 0.01 over-confident
    "lite2_probe_norm_lr1e-3": _with(PROBE, "model.head_norm=true", "optimizer.lr=0.001"),
    # ... with flip-invariant features (the mean over the photo and its three flips, in training
    # and in use), standardised
    "lite2_probe_flips": _with(
        PROBE, "model.flip_invariant=true", "model.head_norm=true", "optimizer.lr=0.001"
    ),
    # ... without random augmentation: the frozen backbone then sees each photo once per fit (the
    # feature cache), and the head learns from the features it will meet in use
    "lite2_probe_flips_noaug": _with(
        PROBE, "model.flip_invariant=true", "model.head_norm=true", "optimizer.lr=0.001", "augmentation=none"
    ),
    # ... with five linear heads trained side by side on their own losses, scored by their mean logit
    "lite2_probe_flips_noaug_heads5": HEADS5,
    # ... at 448 px with every photo in its own storage form (issue 27, the full data: nested,
    # group-aware CV on frozen features ranked it first; benchmarks/study_frozen_heads.py):
    # = experiment=offline_best (tests/test_study.py checks they compose alike)
    "lite2_probe_flips_noaug_heads5_448": _with(
        HEADS5,
        "data.harmonize=none",
        "data.image_size=448",
        "data.cache_size=448",
    ),
    # ... on the pooled features of three stages of blocks beside the final ones (issue 27, STUDY.md)
    "lite2_stages_probe_448": STAGES448,
    # ... in batches of 16 with gradients accumulated over 2 (the same 6 steps an epoch): the
    # baseline of the fine-tune below, which needs more than 24 GB at 32 photos x 4 flips at 448 px
    "lite2_stages_probe_448_b16x2": STAGES448_B16X2,
    # ... then fine-tuned (LP-FT, issue 27 on the full data): after the probe's 30 epochs the
    # backbone (batch norm kept as pretrained) joins at a tenth of the head's decayed lr for 6 more
    "lite2_stages_probe_then_finetune_448": _with(
        STAGES448_B16X2,
        "model.backbone_lr_scale=1.0",
        "callbacks=finetune",
        "callbacks.finetune.unfreeze_backbone_at_epoch=30",
        "callbacks.finetune.backbone_initial_ratio_lr=0.1",
        "trainer.max_epochs=36",
    ),
    # linear probe, then fine-tuning (LP-FT): the probe's 30 epochs, then the backbone (batch norm
    # kept as pretrained) joins at the head's decayed lr for 6 more
    "lite2_probe_then_finetune": _with(
        PROBE,
        "model.backbone_lr_scale=1.0",
        "callbacks=finetune",
        "callbacks.finetune.unfreeze_backbone_at_epoch=30",
        "callbacks.finetune.backbone_initial_ratio_lr=1.0",
        "trainer.max_epochs=36",
    ),
    # ... with the backbone joining at a tenth of the head's lr (then x1.5 per epoch, at most the
    # head's): the full rate undid the probe
    "lite2_probe_then_finetune_ratio0.1": _with(
        PROBE,
        "model.backbone_lr_scale=1.0",
        "callbacks=finetune",
        "callbacks.finetune.unfreeze_backbone_at_epoch=30",
        "callbacks.finetune.backbone_initial_ratio_lr=0.1",
        "trainer.max_epochs=36",
    ),
    "tuned_harmonize_nuisance_lr3e-4_full": _with(
        TUNED,
        "data.harmonize=thumbnail",
        "augmentation=nuisance",
        "optimizer.lr=0.0003",
        "model.backbone_lr_scale=1.0",
    ),
    "tuned_harmonize_strong": _with(TUNED, "data.harmonize=thumbnail", "augmentation=strong"),
    # the fine-tuned Lite2 recipe with the stronger augmentation, and with weight averaging
    "lite2_harmonize_strong": _with(LITE2, "augmentation=strong"),
    "lite2_harmonize_nuisance_ema": _with(LITE2, "callbacks=ema"),
}
QUICK = (
    "model=resnet18",
    "model.pretrained=false",
    "data.image_size=32",
    "data.cache_size=40",
    "trainer.max_epochs=1",
    "callbacks.rich_progress_bar=null",
)
# what STUDY.md shows per stratum, from oof.json
COLUMNS = ("balanced_accuracy", "recall", "specificity")
ONE_MODEL_AT = ("balanced_accuracy@threshold", "recall@threshold")


def run_sweep(name: str, overrides: tuple[str, ...], args: Any) -> dict[str, Any]:
    """Run (or read) the recipe's CV sweep; its pooled out-of-fold result and duration."""
    sweep_dir = Path(args.out).resolve() / name
    done = sweep_dir / "oof.json"
    took = None
    if not done.is_file() and args.read_only:
        return {"recipe": name, "overrides": list(overrides), "error": "not run (--read-only)"}
    if not done.is_file():
        command = [
            sys.executable,
            "-m",
            "railway_defect.train",
            "-m",
            f"data.num_folds={args.folds}",
            f"data.fold=range(0,{args.folds})",
            f"seed={args.seeds}",
            f"data.root={args.data}",
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={args.n_jobs}",
            f"hydra.sweep.dir={sweep_dir}",
            "ckpt_path=last",  # an interrupted sweep continues; a job that never ran starts afresh
            *COMMON,
            *overrides,
        ]
        start = time.perf_counter()
        returncode, stdout, stderr = _run_sweep_process(command)
        took = time.perf_counter() - start
        (sweep_dir / "study.log").parent.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "study.log").write_text(stdout[-20000:] + stderr[-20000:])
        if not done.is_file():
            return {"recipe": name, "overrides": list(overrides), "error": _failure(returncode, stderr)}
    pooled = json.loads(done.read_text())[0]
    durations = [json.loads(p.read_text()).get("duration_s") or 0.0 for p in sweep_dir.glob("*/metrics.json")]
    return {
        "recipe": name,
        "overrides": list(overrides),
        "oof": pooled,
        "jobs": len(durations),
        "mean_job_s": sum(durations) / max(1, len(durations)),
        "sweep_s": took,
    }


# the sweeps running now, which SIGTERM to this script stops (their jobs save last.ckpt)
RUNNING: set[subprocess.Popen] = set()
RUNNING_LOCK = threading.Lock()


def _failure(returncode: int, stderr: str) -> str:
    """Why a sweep wrote no oof.json: a signal by name (SIGKILL here is mostly the kernel's
    out-of-memory killer, which leaves no message), else the end of its stderr."""
    if returncode < 0:
        reason = signal.Signals(-returncode).name
        hint = " (out of memory? see dmesg)" if returncode == -signal.SIGKILL else ""
        return f"the sweep was ended by {reason}{hint}"
    return stderr[-500:]


def _run_sweep_process(command: list[str]) -> tuple[int, str, str]:
    with RUNNING_LOCK:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        RUNNING.add(process)
    try:
        stdout, stderr = process.communicate()
        return process.returncode, stdout, stderr
    finally:
        with RUNNING_LOCK:
            RUNNING.discard(process)


def _stop_sweeps(signum: int, frame: Any) -> None:
    """SIGTERM: pass it on to the sweeps (each stops its jobs), wait for them, exit 143."""
    with RUNNING_LOCK:
        sweeps = list(RUNNING)
    for process in sweeps:
        process.terminate()
    for process in sweeps:
        process.wait()
    raise SystemExit(128 + signal.SIGTERM)


def study_markdown(results: list[dict[str, Any]], args: Any) -> str:
    lines = [
        "# Recipe study: repeated group-aware cross-validation on the sample data",
        "",
        f"{machine_info()}",
        "",
        f"Each recipe: {args.folds}-fold CV (photo groups never straddle folds) x seeds {args.seeds}; "
        "every image is scored by the fold model that never trained on it, from its final weights "
        "(no checkpoint selection), and its score is the mean over seeds. Intervals: 95% (Wilson for "
        "recall and specificity, stratified bootstrap for balanced accuracy and AUROC). The threshold "
        "reaches defect recall >= 0.95 on these same out-of-fold scores, so numbers at it are "
        "optimistic; so is the best row of this table, which was selected by it.",
        "",
        "",
        "The `one model` columns estimate one model (such as the recipe's final one) instead of the "
        "mean over seeds: each seed's out-of-fold predictions alone, mean [min, max] over seeds, "
        "point values at one model's threshold (reaching recall 0.95 on every seed's predictions "
        "together, each image once per seed; as optimistic).",
        "",
        "| recipe | stratum (n) | threshold | BA at 0.5 | BA at threshold | recall at threshold | "
        "specificity at threshold | AUROC | mean time per fold job (s) | one model: AUROC | "
        "one model: threshold | one model: BA at threshold | one model: recall at threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['recipe']} | failed: {r['error'][-120:]!r} |" + " |" * 11)
            continue
        oof = r["oof"]
        strata = [k.split("@")[0] for k in oof["metrics"] if k.endswith("@0.5")]
        for stratum in strata:
            at05, at = oof["metrics"][f"{stratum}@0.5"], oof["metrics"][f"{stratum}@threshold"]
            cells = [
                at05["balanced_accuracy"],
                at["balanced_accuracy"],
                at["recall"],
                at["specificity"],
                at["auroc"],
            ]
            lines.append(
                f"| {r['recipe']} | {stratum} ({at['n']}) | {oof['threshold']:.3f} | "
                + " | ".join(format_metric(m) for m in cells)
                + f" | {r['mean_job_s']:.0f} | "
                + one_model_summary(oof.get("per_seed", {}), stratum, "auroc")
                + f" | {oof.get('one_model_threshold', oof['threshold']):.3f} | "
                + " | ".join(one_model_summary(oof.get("per_seed", {}), stratum, m) for m in ONE_MODEL_AT)
                + " |"
            )
    lines += ["", "## Recipes", ""]
    lines += [f"- `{r['recipe']}`: `{' '.join(r['overrides'])}`" for r in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--n-jobs", type=int, default=2, help="fold jobs at a time within a recipe")
    p.add_argument("--parallel", type=int, default=1, help="recipes at a time")
    p.add_argument("--data", default=str(SAMPLE_DATA))
    p.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "study"))
    p.add_argument("--report", default=None, help="where STUDY.md goes (default: <out>/STUDY.md)")
    p.add_argument("--read-only", action="store_true", help="report finished recipes, run none")
    args = p.parse_args()
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    recipes = {n: RECIPES[n] for n in names}
    if args.quick:
        recipes = {"quick": QUICK}
        args.folds, args.seeds = 2, "1"
    print(machine_info(), flush=True)
    signal.signal(signal.SIGTERM, _stop_sweeps)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda item: run_sweep(*item, args), recipes.items()))
    for r in results:
        if "error" in r:
            print(f"{r['recipe']}: failed: {r['error'][-300:]}")
            continue
        overall = r["oof"]["metrics"]
        print(
            f"{r['recipe']}: out-of-fold BA@0.5 {format_metric(overall['all@0.5']['balanced_accuracy'])} "
            f"AUROC {format_metric(overall['all@0.5']['auroc'])} worst stratum {r['oof']['worst_stratum']}",
            flush=True,
        )
    report = Path(args.report) if args.report else Path(args.out) / "STUDY.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(study_markdown(results, args))
    (report.parent / "study.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"study: {report}")
    if any("error" in r for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
