"""The configs: defaults are the reference recipe, every group choice composes, and mistakes fail
with Hydra's message before any training starts."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

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
def test_every_group_choice_composes_and_instantiates(compose_train, group: str, choice: str) -> None:
    cfg = compose_train(f"{group}={choice}")
    transforms = instantiate(cfg.augmentation.transforms)
    assert all(callable(t) for t in transforms)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    if "_target_" in cfg.scheduler:
        assert isinstance(instantiate(cfg.scheduler), functools.partial)
    for logger in cfg.logger.values():
        assert logger._target_.startswith("lightning.pytorch.loggers.")
    assert cfg.trainer.max_epochs >= 1
