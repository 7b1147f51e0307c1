"""Checks that run before any heavy work, so a mistake costs a second, not a training run:
values Hydra cannot validate, and which checkpoint `ckpt_path` means and whether it fits."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from railway_defect.callbacks.selection import MONITOR_KEY, configured_monitor
from railway_defect.data.discovery import REFIT, TRAIN_AND_VAL
from railway_defect.models.module import MONITORABLE
from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """One-line errors for values that are valid YAML but make no sense."""
    monitor = configured_monitor(cfg)
    if monitor is not None and monitor not in MONITORABLE:
        raise UserError(
            f"{MONITOR_KEY}={monitor} is not a metric to maximise; use one of {', '.join(MONITORABLE)} "
            "(or null: best.ckpt = the final epoch)."
        )
    lr = cfg.optimizer.get("lr")
    if lr is not None and not lr > 0:
        raise UserError(f"optimizer.lr={lr} must be positive (e.g. optimizer.lr=0.001).")
    if cfg.optimizer.get("weight_decay", 0) < 0:
        raise UserError(f"optimizer.weight_decay={cfg.optimizer.weight_decay} must be >= 0.")
    _check_validation_needs(cfg)
    _check_frozen_backbone(cfg)
    if cfg.data.batch_size < 1:
        raise UserError(f"data.batch_size={cfg.data.batch_size} must be at least 1.")
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
        raise UserError(
            f"trainer.max_epochs={max_epochs} trains nothing; use 1 or more (or -1 with trainer.max_steps)."
        )
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} (trainer=gpu/ddp) needs a CUDA GPU, and torch sees none on "
            "this machine; use trainer=default (picks what is there) or trainer=cpu."
        )
    if cfg.trainer.get("gradient_clip_val") is not None and cfg.trainer.gradient_clip_val < 0:
        raise UserError(
            f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val} must be >= 0 (0 = no clipping)."
        )


def _configured_callbacks(cfg: DictConfig, matches: Callable[[DictConfig], bool]) -> list[str]:
    """The `callbacks.<name>` keys of the configured callbacks that `matches`."""
    callbacks = cfg.get("callbacks") or {}
    return [f"callbacks.{name}" for name, c in callbacks.items() if isinstance(c, DictConfig) and matches(c)]


def _check_frozen_backbone(cfg: DictConfig) -> None:
    """A frozen backbone (model.backbone_lr_scale=0) and BackboneFinetuning, which unfreezes it."""
    if cfg.model.get("backbone_lr_scale") != 0:
        return
    unfreezing = _configured_callbacks(cfg, lambda c: "BackboneFinetuning" in str(c.get("_target_", "")))
    if unfreezing:
        raise UserError(
            f"model.backbone_lr_scale=0 keeps the backbone frozen, but {', '.join(unfreezing)} unfreezes it; "
            "drop one of them (callbacks=default, or a backbone_lr_scale above 0)."
        )


def _needs_validation(callback: DictConfig) -> bool:
    """A checkpoint that selects by a validation metric, or early stopping."""
    target = str(callback.get("_target_", ""))
    return "EarlyStopping" in target or ("Checkpoint" in target and bool(callback.get("monitor")))


def _check_validation_needs(cfg: DictConfig) -> None:
    """Training on the validation images leaves nothing to select a checkpoint or stop early on."""
    refit = cfg.data.get("fold") == REFIT
    if cfg.data.get("train_on", "train") != TRAIN_AND_VAL and not refit:
        return
    pooled = f"data.fold={REFIT}" if refit else f"data.train_on={TRAIN_AND_VAL}"
    needing = _configured_callbacks(cfg, _needs_validation)
    if needing:
        raise UserError(
            f"{pooled} leaves no validation split, but {', '.join(needing)} needs one; "
            "set callbacks.model_checkpoint.monitor=null (best.ckpt = the final epoch) "
            "or data.train_on=train."
        )


def is_readable_checkpoint(path: Path) -> bool:
    """A whole checkpoint: torch.save's zip with its central directory, which sits at the end of the
    file, so a file cut short by a kill or a full disk fails this check without being loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _newest_first(paths: list[Path]) -> list[Path]:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return float("-inf")

    return sorted(set(paths), key=mtime, reverse=True)


def _resolve_last(output_dir: Path, runs_root: Path | None) -> Path | None:
    """This run dir's last.ckpt, else the newest last.ckpt under `runs_root`; when that one is cut short
    (a kill or a full disk during an older, non-atomic write) the newest readable checkpoint instead.
    Without `runs_root` (a sweep job) only the run dir's own, or None: the job starts afresh."""
    own = output_dir / "checkpoints" / "last.ckpt"
    others = _other_runs(runs_root, output_dir, "last.ckpt")
    if own.is_file():
        chosen = own
    elif others:
        chosen = _newest_first(others)[0]
    elif runs_root is None:
        log.info("ckpt_path=last: this sweep job has no last.ckpt yet; it starts from the beginning.")
        return None
    else:
        raise UserError(
            f"ckpt_path=last: no last.ckpt under {runs_root}; give the checkpoint's path instead."
        )
    if is_readable_checkpoint(chosen):
        if chosen != own:
            log.info("ckpt_path=last resolves to %s", chosen)
        return chosen
    # the run's own checkpoints first (best.ckpt of the same run), then the other runs' ones
    own_dir = list((output_dir / "checkpoints").glob("*.ckpt"))
    everywhere = _other_runs(runs_root, output_dir, "*.ckpt")
    for candidate in [*_newest_first(own_dir), *_newest_first(everywhere)]:
        if candidate != chosen and is_readable_checkpoint(candidate):
            log.warning(
                "ckpt_path=last: %s is not a readable checkpoint (cut short?); resuming from %s, "
                "the newest readable one, instead.",
                chosen,
                candidate,
            )
            return candidate
    raise UserError(
        f"ckpt_path=last: {chosen} is not a readable checkpoint (cut short?) and no other checkpoint under "
        f"{runs_root or output_dir} is; give a checkpoint's path or start without ckpt_path."
    )


def _other_runs(runs_root: Path | None, output_dir: Path, name: str) -> list[Path]:
    """Checkpoints called `name` of the runs under `runs_root` other than `output_dir`'s."""
    if runs_root is None:
        return []
    return [p for p in runs_root.glob(f"*/**/checkpoints/{name}") if output_dir not in p.parents]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, runs_root: Path | None) -> Path | None:
    """`ckpt_path=last`: this run dir's last.ckpt if it has one, else the newest last.ckpt of any
    run under `runs_root` (an unreadable one falls back to the newest readable checkpoint, with a
    warning); without `runs_root` (a sweep job, which must never continue another job's model) the
    run dir's own or None. Any other value must be an existing file."""
    if not ckpt_path:
        return None
    if str(ckpt_path) == "last":
        return _resolve_last(output_dir, runs_root)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={path} does not exist; give an existing .ckpt file or ckpt_path=last.")
    return path


def checkpoint_hparams(path: Path) -> dict[str, Any]:
    """The hyperparameters stored in a checkpoint, read without loading its tensors into memory."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"ckpt_path={path} is not a readable checkpoint ({type(e).__name__}: {e}).") from e
    return dict(checkpoint.get("hyper_parameters") or {})


def check_checkpoint_fits(path: Path, backbone: str, classes: list[str] | None = None) -> None:
    """A checkpoint of another backbone or other classes cannot be resumed: say so, and what to do."""
    hparams = checkpoint_hparams(path)
    if hparams.get("backbone") not in (None, backbone):
        raise UserError(
            f"ckpt_path={path} was trained with model={hparams['backbone']}, this run uses model={backbone}; "
            f"resume with model={hparams['backbone']} or start without ckpt_path."
        )
    stored = (hparams.get("contract") or hparams).get("class_names")
    if classes is not None and stored is not None and list(stored) != list(classes):
        raise UserError(
            f"ckpt_path={path} was trained on classes {list(stored)}, this data has {classes}; "
            "resume on the same data or start a new run without ckpt_path."
        )
