"""run_training(cfg): build data, model, callbacks, loggers and trainer from the config, fit,
test best.ckpt when there is a Test split, and record the run in metrics.json."""

from __future__ import annotations

import logging
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from railway_defect import __version__
from railway_defect.callbacks.distributed import SyncEpochMetrics
from railway_defect.callbacks.divergence import TrainingDiverged
from railway_defect.callbacks.history import EpochHistory
from railway_defect.callbacks.review_images import ReviewImages
from railway_defect.callbacks.selection import monitored_metric, selecting_checkpoint
from railway_defect.data.audit import audit_markdown
from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.device import accelerator_device_type
from railway_defect.models.backbones import get_spec
from railway_defect.models.contract import ModelContract
from railway_defect.models.module import DEFAULT_MONITOR, DefectClassifier
from railway_defect.training.checks import check_checkpoint_fits, check_config, resolve_ckpt_path
from railway_defect.training.elastic import elastic_restart_checkpoint, join_torchrun_job
from railway_defect.training.launching import spawn_in_sweep
from railway_defect.training.record import (
    DIVERGED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RunRecord,
    print_run_summary,
)
from railway_defect.training.shutdown import Watchdog, sigterm_watchdog
from railway_defect.utils.console import print_config_tree
from railway_defect.utils.errors import UserError, disk_error, user_message
from railway_defect.utils.layout import in_multirun
from railway_defect.utils.resources import configure_torch_threads, resolve_precision
from railway_defect.utils.warning_filters import quiet_known_noise

log = logging.getLogger(__name__)

# keys of the config that describe the experiment (for TensorBoard's HParams tab)
HPARAM_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "data.batch_size",
    "data.balance",
    "data.image_size",
    "data.num_folds",
    "data.fold",
    "trainer.max_epochs",
    "trainer.precision",
    "trainer.gradient_clip_val",
    "seed",
)
# final metrics shown beside them, from the best epoch's validation and the test of best.ckpt
HPARAM_METRICS = ("f1", "balanced_acc", "auroc", "recall", "precision", "acc")


def _instantiate(config: Any, **kwargs: Any) -> Any:
    """hydra's instantiate, except that a UserError raised by a constructor stays a UserError
    (one line for the user) instead of becoming an InstantiationException with a traceback."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [_instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


# callbacks that only write to a logger (Lightning refuses LearningRateMonitor without one)
NEEDS_LOGGER = (LearningRateMonitor, ReviewImages)


def _drop_logger_callbacks(callbacks: list[Callback], loggers: list[Logger]) -> list[Callback]:
    """`logger=[]` / `logger=null` train without logging: the callbacks that have nothing to write
    to are left out, said once, instead of failing the run."""
    if loggers:
        return callbacks
    skipped = [c for c in callbacks if isinstance(c, NEEDS_LOGGER)]
    if _is_global_zero():
        names = ", ".join([type(c).__name__ for c in skipped] + ["HParams"])
        log.info("No logger in this run: skipping %s.", names)
    return [c for c in callbacks if not isinstance(c, NEEDS_LOGGER)]


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key in HPARAM_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig):
            container = OmegaConf.to_container(value, resolve=True)
            params.update({f"{key}/{k}": v for k, v in container.items() if k != "_partial_"})
        else:
            params[key] = value
    try:
        from hydra.core.hydra_config import HydraConfig

        params.update(
            {
                f"choice/{k}": v
                for k, v in HydraConfig.get().runtime.choices.items()
                if not k.startswith("hydra")
            }
        )
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        pass
    return params


def _hparam_metrics(record: RunRecord) -> dict[str, float]:
    """Final metrics under their own `hp/` tags (reusing `val/f1` would add a point to its curve)."""
    metrics = {}
    for stage, values in (("val", record.val), ("test", record.test)):
        for name in HPARAM_METRICS:
            if f"{stage}/{name}" in values:
                metrics[f"hp/{stage}_{name}"] = values[f"{stage}/{name}"]
    if record.optimized_metric is not None and record.optimized_metric_name:
        metrics["hp/" + record.optimized_metric_name.replace("/", "_")] = record.optimized_metric
    return metrics


def _quiet_expected_noise(num_workers: int) -> None:
    quiet_known_noise()
    if num_workers == 0:  # chosen on purpose for small CPUs, see default_num_workers
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # under DDP the epoch metrics are torchmetrics results, already gathered from every process
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level in distributed")
    if logging.getLogger().handlers:  # Hydra's handlers print and file Lightning's messages already
        logging.getLogger("lightning").handlers.clear()


def _is_global_zero() -> bool:
    """Under DDP every process runs this code; only the first one writes metrics.json and prints."""
    return getattr(rank_zero_only, "rank", 0) == 0


def run_training(cfg: DictConfig) -> float | None:
    """Train as configured; returns the value of `cfg.optimized_metric` (for sweepers). A run whose
    loss becomes NaN/inf stops at once, is recorded as `diverged` and raises TrainingDiverged."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(
        run_dir=str(output_dir),
        started_at=datetime.now().isoformat(timespec="seconds"),
        railway_defect_version=__version__,
    )
    if _is_global_zero():
        record.write()
    start = time.perf_counter()
    try:
        with sigterm_watchdog(float(cfg.get("shutdown_grace_s", 60))) as watchdog:
            _fit_and_test(cfg, record, watchdog)
    except (KeyboardInterrupt, SystemExit):
        record.status = INTERRUPTED
        raise
    except Exception as e:
        # a full disk in the words the console gives; anything else as raised
        error = user_message(e) if disk_error(e) else f"{type(e).__name__}: {e}"
        record.update(status=FAILED, error=error)
        raise
    finally:
        record.duration_s = round(time.perf_counter() - start, 1)
        if _is_global_zero():
            record.write()
    if _is_global_zero():
        print_run_summary(record)
    if record.status == DIVERGED:
        raise TrainingDiverged(record.error)
    return record.optimized_metric


def build_datamodule(cfg: DictConfig) -> RailwayDataModule:
    """The configured DataModule, normalising with the chosen backbone's mean/std."""
    spec = get_spec(cfg.model.backbone)
    return _instantiate(
        cfg.data,
        train_transforms=instantiate(cfg.augmentation.transforms),
        mean=list(spec.mean),
        std=list(spec.std),
    )


def build_model(
    cfg: DictConfig, datamodule: RailwayDataModule, monitor: str | None = None
) -> DefectClassifier:
    """The configured model for the classes `datamodule` found (call its setup() first); `monitor`:
    the metric that selects best.ckpt (callbacks.selection), whose best-so-far value it logs."""
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") and "_target_" in cfg.scheduler else None
    return _instantiate(
        OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k != "decision_threshold"]),
        contract=build_contract(cfg, datamodule).to_dict(),  # plain values: OmegaConf merges them
        class_weights=datamodule.class_weights,
        monitor=monitor or DEFAULT_MONITOR,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
    )


def build_contract(cfg: DictConfig, datamodule: Any) -> ModelContract:
    """The run's model contract, built once: the data's classes and preprocessing (that evaluate,
    predict, export and serve repeat), the backbone's normalisation, the recipe's threshold."""
    return ModelContract.for_backbone(
        cfg.model.backbone,
        datamodule.classes,
        datamodule.positive_class,
        input_size=datamodule.image_size,
        decode_size=datamodule.cache_size,
        harmonize=datamodule.harmonize,
        threshold=cfg.model.get("decision_threshold", 0.5),
        ordinal=datamodule.ordinal is not None,
    )


def resolve_hardware_defaults(cfg: DictConfig) -> None:
    """Replace `auto` in trainer.precision by what suits this machine, in the config itself, so
    that HParams and metrics.json record the value really used."""
    trainer = cfg.trainer
    with open_dict(cfg):
        trainer.precision = resolve_precision(
            trainer.get("precision", "auto"), trainer.get("accelerator", "auto")
        )


def _selection_note(monitor: str | None, validated: bool = True) -> str:
    """What the `val` metrics of metrics.json are worth, said where they are read."""
    if not validated:
        return (
            "none, and no validation split (data.train_on=train_and_val: the validation images trained "
            "too); best.ckpt holds the final epoch's weights. Estimate the recipe out of fold, by "
            "cross-validation (experiment=cv, STUDY.md)"
        )
    if monitor is None:
        return (
            "none: best.ckpt holds the final epoch's weights, so its validation metrics are a hold-out "
            "estimate (small: see the intervals of evaluate, and out-of-fold metrics of experiment=cv)"
        )
    return (
        f"{monitor} on the validation split picked best.ckpt's epoch, so its validation metrics are "
        "optimistic; use evaluate on a Test split or out-of-fold metrics (experiment=cv) to report"
    )


def build_trainer(
    cfg: DictConfig, datamodule: RailwayDataModule, watchdog: Watchdog | None = None
) -> tuple[L.Trainer, list[Callback], list[Logger]]:
    """The configured trainer with its callbacks and loggers, ready for this machine and sweep."""
    loggers = _instantiate_all(cfg.get("logger"))
    # first: every process computes the epoch's metrics (a collective) before any other callback
    callbacks = [SyncEpochMetrics(), *_drop_logger_callbacks(_instantiate_all(cfg.get("callbacks")), loggers)]
    # data.train_on=train_and_val: no validation loop at all (not an empty one Lightning warns about)
    no_validation = {} if datamodule.has_split("val") else {"limit_val_batches": 0}
    trainer: L.Trainer = _instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **no_validation
    )
    if spawn_in_sweep(trainer):  # re-running the command line would re-run the whole sweep
        log.info("Inside a sweep: starting the %d training processes with spawn.", trainer.num_devices)
    for logger in loggers:  # the data's shortcut audit, in TensorBoard's Text tab from the start
        if isinstance(logger, TensorBoardLogger) and datamodule.report.get("shortcut_audit"):
            logger.experiment.add_text(
                "data/shortcut_audit", audit_markdown(datamodule.report["shortcut_audit"])
            )
    if watchdog is not None:  # the processes Lightning starts for DDP stop with this one
        watchdog.children = lambda: list(getattr(trainer.strategy.launcher, "procs", None) or [])
    return trainer, callbacks, loggers


def _checkpoint_outcome(callbacks: list[Any], validated: bool = True) -> dict[str, Any]:
    """Which epoch best.ckpt holds, by which metric, its validation metrics and what they are worth,
    the epoch history, and the checkpoint paths: the run record's part about its model."""
    checkpoint = selecting_checkpoint(callbacks)
    monitor = checkpoint.monitor if checkpoint else None
    selected = bool(monitor)
    last_path = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint and checkpoint.dirpath else None
    best_path = checkpoint.best_model_path if checkpoint else ""
    best_score = checkpoint.best_model_score if selected else None
    history = next((c for c in callbacks if isinstance(c, EpochHistory)), EpochHistory())
    epochs = list(history.epochs)
    if selected:
        best_row = history.best(monitor) if best_score is not None else None
    else:  # no selection: best.ckpt is the final epoch's weights
        best_row = epochs[-1] if epochs and best_path else None
    return {
        "monitor": monitor,
        # the metric that selected (`monitor`), its value and its epoch
        "best": {
            "epoch": best_row["epoch"] if best_row else None,
            **({monitor: float(best_score) if best_score is not None else None} if monitor else {}),
        },
        "selection": _selection_note(monitor, validated),
        "val": {k: v for k, v in (best_row or {}).items() if k.startswith("val/")},
        "last_val": {k: v for k, v in (epochs[-1] if epochs else {}).items() if k.startswith("val/")},
        "history": epochs,
        "checkpoints": {
            "best": best_path or None,
            "last": str(last_path) if last_path and last_path.is_file() else None,
        },
    }


def _prepare_run(cfg: DictConfig) -> tuple[Path | None, int]:
    """Checks and settings before any heavy work: the config, this machine's defaults, the
    checkpoint to resume from (if any), the seed. Returns that checkpoint and the torch threads."""
    if _is_global_zero():
        print_config_tree(cfg)
    check_config(cfg)
    resolve_hardware_defaults(cfg)
    torch_threads = configure_torch_threads(cfg.get("num_threads"))
    # a sweep job resumes from its own last.ckpt only: another job's is another fold or seed
    runs_root = None if in_multirun() else Path(cfg.paths.output_root) / cfg.task_name
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.output_dir), runs_root)
    ckpt_path = ckpt_path or elastic_restart_checkpoint(Path(cfg.paths.output_dir))
    if ckpt_path is not None:
        check_checkpoint_fits(ckpt_path, get_spec(cfg.model.backbone).name)
    L.seed_everything(cfg.seed, workers=True)
    return ckpt_path, torch_threads


def _setup_data(cfg: DictConfig, ckpt_path: Path | None) -> RailwayDataModule:
    datamodule = build_datamodule(cfg)
    datamodule.device_type = accelerator_device_type(str(cfg.trainer.get("accelerator", "auto")))
    datamodule.prepare_data()
    datamodule.setup("fit")
    _quiet_expected_noise(datamodule.num_workers)
    if ckpt_path is not None:
        check_checkpoint_fits(ckpt_path, get_spec(cfg.model.backbone).name, datamodule.classes)
    return datamodule


def _test_best(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: DefectClassifier,
    datamodule: RailwayDataModule,
    best: str | None,
) -> dict[str, float]:
    """best.ckpt's metrics on the Test split, when there is one and the fit ended normally."""
    if not (cfg.get("test") and datamodule.has_split("test") and best):
        return {}
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _run_facts(
    cfg: DictConfig, trainer: L.Trainer, model: DefectClassifier, datamodule: RailwayDataModule
) -> dict[str, Any]:
    """What the record says about the model, the data and the machine."""
    return {
        "optimized_metric_name": cfg.optimized_metric,
        "pretrained_loaded": bool(model.pretrained_loaded),
        "weights_source": model.weights_source,
        "backbone": cfg.model.backbone,
        "classes": datamodule.classes,
        "positive_class": datamodule.positive_class,
        "data": {
            "root": str(datamodule.root),
            "counts": datamodule.report["counts"],
            "skipped": datamodule.report["skipped_count"],
            "storage": datamodule.storage_used,
            "decode": datamodule.decode_used,
        },
        "epochs_completed": trainer.current_epoch,
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
    }


def _finish_loggers(cfg: DictConfig, loggers: list[Logger], record: RunRecord) -> None:
    """HParams with the final metrics; the record names the TensorBoard folder."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            record.tensorboard_dir = logger.log_dir
            logger.log_hyperparams(_hparams(cfg), metrics=_hparam_metrics(record))
            logger.finalize("success")


def _join_torchrun_job(cfg: DictConfig, trainer: L.Trainer) -> None:
    """DDP under torchrun: the process group of this start of the job (training/elastic.py)."""
    if not isinstance(trainer.strategy, DDPStrategy):
        return
    backend = trainer.strategy.process_group_backend
    backend = backend or ("nccl" if trainer.strategy.root_device.type == "cuda" else "gloo")
    timeout = cfg.trainer.strategy.get("timeout") if isinstance(cfg.trainer.strategy, DictConfig) else None
    join_torchrun_job(backend, instantiate(timeout) if timeout is not None else timedelta(minutes=30))


def _fit_and_test(cfg: DictConfig, record: RunRecord, watchdog: Watchdog | None = None) -> None:
    """Fit, then test best.ckpt; fills `record` with the outcome and its final status."""
    ckpt_path, torch_threads = _prepare_run(cfg)
    datamodule = _setup_data(cfg, ckpt_path)
    trainer, callbacks, loggers = build_trainer(cfg, datamodule, watchdog)
    model = build_model(cfg, datamodule, monitored_metric(callbacks))
    _join_torchrun_job(cfg, trainer)
    diverged = None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    except TrainingDiverged as e:  # keep what the epochs before the divergence produced
        diverged = str(e)
    # copied now: testing best.ckpt below restores the callbacks' state from that checkpoint
    record.update(**_checkpoint_outcome(callbacks, datamodule.has_split("val")))
    optimized = trainer.callback_metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None
    record.optimized_metric = float(optimized) if optimized is not None else None
    if not trainer.interrupted and not diverged:
        record.test = _test_best(cfg, trainer, model, datamodule, record.best_checkpoint)
    record.update(**_run_facts(cfg, trainer, model, datamodule), torch_threads=torch_threads)
    record.resumed_from = str(ckpt_path) if ckpt_path else None
    _finish_loggers(cfg, loggers, record)
    if diverged:
        record.update(status=DIVERGED, error=diverged)
    else:
        record.status = INTERRUPTED if trainer.interrupted else FINISHED
