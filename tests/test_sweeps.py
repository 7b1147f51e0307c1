"""Sweeps end to end: every job of `-m` is a complete run, the sweep summary lists them, a failing
or diverging job does not stop the others but the exit code reports it, optuna searches and
resumes, and the launchers compose."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from railway_defect.sweeps.summary import DEFAULT_OPTIMIZED_METRIC, summarize
from railway_defect.utils.resources import physical_cores
from tests.helpers import CONF_DIR, make_split_dataset, run_cli

# the smallest runs that still train, validate and test: seconds per job on a CPU
TINY = (
    "model=resnet18",
    "model.pretrained=false",
    "data.image_size=32",
    "data.cache_size=40",
    "data.batch_size=4",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
)


def read_summary(sweep: Path) -> dict[str, dict[str, str]]:
    with (sweep / "summary.csv").open() as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def hparams_of(tensorboard_dir: Path) -> dict:
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams


@pytest.mark.slow
def test_seed_sweep_in_parallel_writes_complete_runs_and_a_summary(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "railway_defect.train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
        f"data.root={tiny_dataset}",
        f"hydra.sweep.dir={sweep}",
        "seed=1,2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, seed in (("0", 1), ("1", 2)):
        run = sweep / job
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "finished"
        assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert metrics["test"]  # a complete run: fitted, validated and tested
        # 2 jobs side by side share the CPUs instead of each taking all of them
        assert metrics["torch_threads"] == max(1, physical_cores() // 2)
        # the HParams tab tells the jobs apart by their swept value and shows the final metrics
        hparams = hparams_of(run / "tensorboard")
        assert hparams["seed"].number_value == seed

    rows = read_summary(sweep)
    assert sorted(rows) == ["0", "1"]
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert [rows[j]["overrides"].split()[-1] for j in ("0", "1")] == ["seed=1", "seed=2"]
    for job, row in rows.items():
        assert float(row["val/balanced_acc_best"]) == pytest.approx(
            json.loads((sweep / job / "metrics.json").read_text())["optimized_metric"], abs=1e-4
        )
        assert Path(row["checkpoint"]) == sweep / job / "checkpoints" / "best.ckpt"
    # the rows are sorted by the optimised metric, best first
    values = [float(row["val/balanced_acc_best"]) for row in rows.values()]
    assert values == sorted(values, reverse=True)
    # jobs that differ only by seed: mean ± std of the configuration
    with (sweep / "summary_groups.csv").open() as f:
        (group,) = list(csv.DictReader(f))
    assert (group["over"], group["ok"], group["jobs"]) == ("seeds", "2", "2")
    assert float(group["val/balanced_acc_best_mean"]) == pytest.approx(sum(values) / 2, abs=1e-4)
    markdown = (sweep / "summary.md").read_text()
    assert "| seeds | 2 / 2 |" in markdown
    assert "Mean ± std per configuration" in result.stdout and "seed=2" in result.stdout


@pytest.mark.slow
def test_failed_and_diverged_jobs_do_not_stop_the_sweep(tmp_path: Path, tiny_dataset: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "railway_defect.train",
        "-m",
        *TINY,
        f"data.root={tiny_dataset}",
        f"hydra.sweep.dir={sweep}",
        # fine / loss explodes to NaN / rejected by the config checks before training
        "optimizer.lr=0.001,1e30,-1",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 of 3 jobs did not finish ok")
    rows = read_summary(sweep)
    assert [(job, row["status"]) for job, row in rows.items()] == [
        ("0", "ok"),
        ("1", "diverged"),
        ("2", "failed"),
    ]
    assert "training loss became NaN or infinite at epoch 0" in rows["1"]["error"]
    assert rows["2"]["error"] == "UserError: optimizer.lr=-1 must be positive (e.g. optimizer.lr=0.001)."
    assert (sweep / "0" / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "diverged"
    assert json.loads((sweep / "2" / "metrics.json").read_text())["status"] == "failed"
    markdown = (sweep / "summary.md").read_text()
    assert "| 2 | optimizer.lr=-1 | failed: UserError: optimizer.lr=-1 must be positive" in markdown


@pytest.mark.slow
def test_optuna_search_runs_trials_and_resumes_with_the_same_command(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    import optuna

    sweep = tmp_path / "study"
    # no test-split evaluation: the search only needs the validation metric
    args = (
        "hparams_search=optuna",
        *TINY,
        "test=false",
        f"data.root={tiny_dataset}",
        f"hydra.sweep.dir={sweep}",
    )
    first = run_cli("railway_defect.train", *args, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{sweep}/optuna.db"
    study = optuna.load_study(study_name="railway_defect", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    rows = read_summary(sweep)
    assert sorted(rows) == ["0", "1", "2"] and {r["status"] for r in rows.values()} == {"ok"}
    searched = ("optimizer=", "optimizer.lr=", "optimizer.weight_decay=", "data.batch_size=", "augmentation=")
    for job, row in rows.items():
        assert all(key in row["overrides"] for key in (*searched, "model.label_smoothing="))
        assert float(row["val/balanced_acc_best"]) == pytest.approx(study.trials[int(job)].value, abs=1e-4)
    assert (sweep / "optimization_results.yaml").is_file()

    # a search killed during trial 3 leaves it running in the study
    study.ask()
    before = {job: (sweep / job / "metrics.json").stat().st_mtime_ns for job in rows}
    # same command, a total of 4 trials; a fixed lr that diverges shows failed trials are recorded
    second = run_cli("railway_defect.train", *args, "hydra.sweeper.n_trials=4", "optimizer.lr=1e30")
    assert second.returncode != 0
    assert "Resuming study 'railway_defect': 3 trials done, 1 to go" in second.stdout
    study = optuna.load_study(study_name="railway_defect", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL", "FAIL"]
    rows = read_summary(sweep)
    assert sorted(rows) == ["0", "1", "2", "4"]  # trial number == job directory, none overwritten
    assert rows["4"]["status"] == "diverged"
    assert {job: (sweep / job / "metrics.json").stat().st_mtime_ns for job in before} == before


def test_summarize_cli_rebuilds_the_tables_of_an_interrupted_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"

    def job(num: int, overrides: list[str], record: dict | None) -> None:
        hydra_dir = sweep / str(num) / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if record is not None:
            (sweep / str(num) / "metrics.json").write_text(json.dumps(record))

    finished = {
        "status": "finished",
        "optimized_metric_name": "val/f1_best",
        "optimized_metric": 0.8,
        "best": {"epoch": 3},
        "val": {"val/f1": 0.75, "val/balanced_acc": 0.7, "val/auroc": 0.9},
        "duration_s": 12.5,
        "checkpoints": {"best": str(sweep / "0" / "checkpoints" / "best.ckpt")},
    }
    job(0, ["optimizer=adamw", "seed=1"], finished)
    job(1, ["optimizer=sgd", "seed=1"], {"status": "running"})  # killed mid-training
    job(2, ["optimizer=adamw", "seed=2"], None)  # killed before training started
    (sweep / "unrelated").mkdir()

    result = run_cli("railway_defect.summarize", str(sweep))
    assert result.returncode == 0, result.stderr
    rows = read_summary(sweep)
    assert [(j, r["status"]) for j, r in rows.items()] == [
        ("0", "ok"),
        ("1", "incomplete"),
        ("2", "incomplete"),
    ]
    assert rows["0"]["val/f1_best"] == "0.8000" and rows["0"]["best_epoch"] == "3"
    assert "still says running" in rows["1"]["error"] and "no metrics.json" in rows["2"]["error"]
    markdown = (sweep / "summary.md").read_text()
    expected = "| 0 | optimizer=adamw seed=1 | ok | 0.8000 | 0.7500 | 0.7000 | 0.9000 | 3 | 12.5 |"
    assert expected + " 0/checkpoints/best.ckpt |" in markdown
    # adamw ran with 2 seeds, one of them ok: its mean ± std counts the ok job only
    assert "| optimizer=adamw | seeds | 1 / 2 | 0.8000 ± 0.0000 |" in markdown
    assert "job 1 incomplete" in result.stdout

    missing = run_cli("railway_defect.summarize", str(tmp_path / "nowhere"))
    assert missing.returncode == 1  # the exit code of every command stopped by a user error
    assert missing.stderr.strip().startswith("error: ") and "Traceback" not in missing.stderr


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_launchers_and_searches_compose() -> None:
    try:
        slurm = _compose("hydra/launcher=submitit_slurm", "trainer=ddp", "hydra.launcher.tasks_per_node=4")
        assert get_class(slurm.hydra.launcher._target_).__name__ == "SlurmLauncher"
        assert slurm.hydra.launcher.tasks_per_node == 4 and slurm.trainer.strategy.timeout.seconds == 600
        joblib = _compose("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
        assert get_class(joblib.hydra.launcher._target_).__name__ == "JoblibLauncher"

        search = _compose("hparams_search=optuna")
        sweeper = search.hydra.sweeper
        assert get_class(sweeper._target_).__name__ == "ResumableOptunaSweeper"
        assert (sweeper.direction, sweeper.sampler.seed, sweeper.storage.startswith("sqlite:///")) == (
            "maximize",
            1234,
            True,
        )
        assert set(sweeper.params) == {
            "optimizer",
            "optimizer.lr",
            "optimizer.weight_decay",
            "data.batch_size",
            "augmentation",
            "model.label_smoothing",
        }
        assert str(search.hydra.mode) == "RunMode.MULTIRUN"

        cv = _compose("experiment=cv", "data.num_folds=3")
        assert cv.hydra.sweeper.params["data.fold"] == "range(0,3)"
        assert str(cv.hydra.mode) == "RunMode.MULTIRUN"
    finally:
        GlobalHydra.instance().clear()


def test_ddp_inside_a_sweep_spawns_its_processes_with_the_same_backend_and_timeout() -> None:
    """Lightning's launcher would re-run the sweep's command line in its second process (a sweep of
    sweeps); a single run keeps it."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from railway_defect.training.launching import SpawnLauncher, spawn_in_sweep

    def trainer_in(*mode: str) -> Any:
        overrides = ("trainer=ddp_cpu", "trainer.strategy.timeout.seconds=42", "trainer.benchmark=false")
        full = _compose(*overrides, "trainer.precision=32-true", *mode)
        GlobalHydra.instance().clear()
        HydraConfig.instance().set_config(full)
        return instantiate(full.trainer, callbacks=[], logger=False)

    try:
        single = trainer_in()
        assert not spawn_in_sweep(single) and isinstance(single.strategy.launcher, _SubprocessScriptLauncher)
        trainer = trainer_in("hydra.mode=MULTIRUN")
        assert spawn_in_sweep(trainer)
    finally:
        HydraConfig.instance().cfg = None
    strategy = trainer.strategy
    assert isinstance(strategy.launcher, SpawnLauncher) and strategy.launcher._start_method == "spawn"
    assert strategy.process_group_backend == "gloo" and strategy._timeout.total_seconds() == 42
    assert "LOCAL_RANK" not in os.environ


@pytest.mark.slow
def test_every_experiment_runs_in_one_sweep(tmp_path: Path, tiny_dataset: Path) -> None:
    """lightning-hydra-template's test_experiments: each experiment config, one fast_dev_run job;
    the sleepers' recipe (three ordered classes) on three classes of its own."""
    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    sleepers = make_split_dataset(
        tmp_path / "sleepers", {"Train": 4, "Validation": 3}, ("Good", "Fair", "Poor")
    )
    chosen = []
    # a sweep of final models alone (train_and_val) is refused: it has nothing to compare them by
    runs = (("glob(*,exclude=sleepers)", tiny_dataset, []), ("sleepers", sleepers, ["data.train_on=train"]))
    for pattern, root, extra in runs:
        sweep = tmp_path / f"sweep_{root.name}"
        result = run_cli(
            "railway_defect.train",
            "-m",
            f"experiment={pattern}",
            "debug=fdr",
            "model.pretrained=false",
            "data.image_size=32",
            "data.cache_size=40",
            f"data.root={root}",
            f"hydra.sweep.dir={sweep}",
            *extra,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rows = read_summary(sweep)
        chosen += [
            o for row in rows.values() for o in row["overrides"].split() if o.startswith("experiment=")
        ]
        assert {row["status"] for row in rows.values()} == {"ok"}
    assert sorted(chosen) == [f"experiment={e}" for e in experiments]


def sweep_final_models(sweep: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A sweep of tiny final models (data.train_on=train_and_val: nothing validates)."""
    final = ("data.train_on=train_and_val", "callbacks.model_checkpoint.monitor=null")
    return run_cli(
        "railway_defect.train",
        "-m",
        *TINY,
        *final,
        *overrides,
        f"data.root={data}",
        f"hydra.sweep.dir={sweep}",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("experiment=cv",), "cannot run a cross-validation fold; drop data.num_folds"),
        (("seed=1,2",), "no job of this sweep can return optimized_metric=None"),
        (
            ("hparams_search=optuna", "callbacks.model_checkpoint.monitor=val/auroc"),
            "optimized_metric=val/auroc_best",
        ),
    ],
)
def test_a_sweep_of_a_train_and_val_recipe_is_refused_before_its_first_job(
    tmp_path: Path, tiny_dataset: Path, overrides: tuple[str, ...], message: str
) -> None:
    """Without validation a sweep has nothing to compare: one line, and no job starts."""
    sweep = tmp_path / "sweep"
    result = sweep_final_models(sweep, tiny_dataset, *overrides)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(sweep.glob("*/metrics.json"))


@pytest.mark.slow
def test_a_train_and_val_sweep_on_a_training_metric_runs(tmp_path: Path, tiny_dataset: Path) -> None:
    """The documented way to sweep final models anyway (e.g. seeds of an ensemble)."""
    sweep = tmp_path / "sweep"
    result = sweep_final_models(sweep, tiny_dataset, "optimized_metric=train/acc", "seed=1,2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep)
    assert {row["status"] for row in rows.values()} == {"ok"}
    for job in rows:
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["optimized_metric_name"] == "train/acc"
        assert 0.0 <= metrics["optimized_metric"] <= 1.0


def test_a_sweep_that_monitors_nothing_is_ranked_by_the_default_metric_not_an_interpolation(
    tmp_path: Path,
) -> None:
    """Jobs with callbacks.model_checkpoint.monitor=null (nested CV, final models) save the
    unresolved `${best_of:...}` as their optimized_metric: the summary ranks and heads its column by
    the default metric instead of printing that string."""
    for name in ("0", "1"):
        hydra = tmp_path / "sweep" / name / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(f"- data.fold={name}\n")
        (hydra / "config.yaml").write_text(
            "optimized_metric: ${best_of:${oc.select:callbacks.model_checkpoint.monitor,null}}\n"
        )
    assert summarize(tmp_path / "sweep").optimized_metric == DEFAULT_OPTIMIZED_METRIC
