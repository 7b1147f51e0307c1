"""The configs: defaults are the reference recipe, every group choice composes, and mistakes fail
with Hydra's message before any training starts."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

from railway_defect import evaluate, export, predict, serve
from railway_defect.callbacks.selection import monitored_metric
from railway_defect.evaluation.report import run_evaluation
from railway_defect.inference.exporting import export_model
from railway_defect.inference.predicting import run_prediction
from railway_defect.inference.service import build_service
from railway_defect.training.checks import check_config
from railway_defect.training.run import build_model, resolve_hardware_defaults
from railway_defect.utils.commands import call_with_config, unused_keys
from railway_defect.utils.errors import UserError
from tests.helpers import CONF_DIR, run_cli

GROUP_CHOICES = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in (
        "data",
        "model",
        "optimizer",
        "scheduler",
        "augmentation",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "debug",
    )
}


def test_cfg_job_of_the_defaults_is_the_reference_recipe() -> None:
    result = run_cli("railway_defect.train", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["backbone"] == "resnet50"
    assert cfg["model"]["pretrained"] is True
    assert cfg["data"]["batch_size"] == 32
    assert cfg["trainer"]["max_epochs"] == 5
    assert cfg["optimizer"] == {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 0.001,
        "weight_decay": 0.0,
    }
    assert cfg["scheduler"]["_target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert cfg["scheduler"]["T_max"] == "${trainer.max_epochs}"
    assert cfg["trainer"]["gradient_clip_val"] == 0.0
    assert cfg["seed"] == 42


def test_experiment_reference_equals_the_defaults(compose_train) -> None:
    defaults = OmegaConf.to_container(compose_train(), resolve=False)
    reference = OmegaConf.to_container(compose_train("experiment=reference"), resolve=False)
    assert reference == defaults


def test_help_lists_every_group_and_choice() -> None:
    result = run_cli("railway_defect.train", "--help")
    assert result.returncode == 0, result.stderr
    for group, choices in GROUP_CHOICES.items():
        assert f"{group}: {', '.join(choices)}" in result.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=resnet5", "Could not find 'model/resnet5'"),
        ("optimizer.lrr=0.1", "Key 'lrr' is not in struct"),
    ],
)
def test_config_mistakes_fail_with_hydras_message(override: str, message: str) -> None:
    result = run_cli("railway_defect.train", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g, cs in GROUP_CHOICES.items() for c in cs])
def test_every_group_choice_composes_and_builds(compose_train, group: str, choice: str) -> None:
    """Each choice builds what a run builds from it: transforms, optimizer, scheduler, loggers,
    callbacks, the model and the trainer (a GPU choice on a machine without one: its one-line error)."""
    cfg = compose_train(f"{group}={choice}", "model.pretrained=false")
    transforms = instantiate(cfg.augmentation.transforms)
    assert all(callable(t) for t in transforms)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    if "_target_" in cfg.scheduler:
        assert isinstance(instantiate(cfg.scheduler), functools.partial)
    for logger in cfg.logger.values():
        assert logger._target_.startswith("lightning.pytorch.loggers.")
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    assert all(isinstance(c, Callback) for c in callbacks) and callbacks
    data = SimpleNamespace(
        classes=["Defective", "Non defective"],
        positive_class="Defective",
        class_weights=None,
        image_size=cfg.data.image_size,
        cache_size=cfg.data.cache_size,
        harmonize=cfg.data.harmonize,
        ordinal=None,
    )
    model = build_model(cfg, data, monitored_metric(callbacks))
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            check_config(cfg)
        return
    check_config(cfg)
    resolve_hardware_defaults(cfg)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs >= 1


def _command_config(name: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize(
    ("command", "function", "layout"),
    [
        ("evaluate", run_evaluation, evaluate.EVALUATE_CONFIG),
        ("predict", run_prediction, predict.PREDICT_CONFIG),
        ("serve", build_service, serve.SERVE_CONFIG),
        ("export", export_model, export.EXPORT_CONFIG),
    ],
)
def test_every_key_of_a_command_config_changes_something(command, function, layout) -> None:
    """A key in conf/<command>.yaml that its function does not take would be dropped in silence."""
    assert unused_keys(function, _command_config(command), *layout) == []


def test_a_key_nothing_uses_is_said_not_dropped(caplog: pytest.LogCaptureFixture) -> None:
    def score(threshold: float = 0.5) -> float:
        return threshold

    cfg = OmegaConf.create({"threshold": 0.3, "batch_size": 8, "data": {"root": "x", "size": 3}})
    with caplog.at_level(logging.WARNING):
        assert call_with_config(score, cfg, ("data",), ("data.root",)) == 0.3
    assert "ignored: batch_size, data.size." in caplog.text


def test_evaluate_refuses_a_data_key_the_checkpoint_decides() -> None:
    result = run_cli("railway_defect.evaluate", "data.image_size=224")
    assert result.returncode != 0 and "Could not override 'data.image_size'" in result.stderr


def test_ddp_cpu_takes_a_number_of_machines(compose_train) -> None:
    """torchrun --nnodes=2 with trainer=ddp_cpu needs trainer.num_nodes=2, without Hydra's `++`."""
    assert compose_train("trainer=ddp_cpu", "trainer.num_nodes=2").trainer.num_nodes == 2
