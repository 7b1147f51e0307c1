"""ResumableOptunaSweeper: hydra-optuna-sweeper's OptunaSweeper with two additions that
`hparams_search=optuna` relies on.

- Resume: with a storage (the study's SQLite file in the sweep dir), running the same command
  again continues the study: `n_trials` is the study's total, trials already finished count
  towards it, a trial left running by a killed search is marked failed (and its slot run again),
  and new job directories are numbered after the existing ones instead of overwriting them.
- Failed jobs: in a sweep, railway_defect.train returns NaN for a job that failed or diverged
  (so the basic sweeper carries on); optuna 2.x rejects NaN values, so such jobs are reported
  to optuna as failed trials instead.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A job returned NaN: it failed or diverged (its metrics.json says which)."""


class _NaNAsFailure:
    """Wraps the launcher: jobs that returned NaN come back as failed jobs."""

    def __init__(self, launcher: Any) -> None:
        self._launcher = launcher

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        returns = self._launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        for ret in returns:
            value = ret._return_value
            if ret.status == JobStatus.COMPLETED and isinstance(value, float) and math.isnan(value):
                ret.status = JobStatus.FAILED
                ret.return_value = JobFailed(
                    f"job in {ret.working_dir} failed or diverged (returned NaN); see its metrics.json"
                )
        return returns

    def __getattr__(self, name: str) -> Any:
        return getattr(self._launcher, name)


class ResumableOptunaSweeper(OptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweeper.launcher = _NaNAsFailure(self.sweeper.launcher)

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        impl = self.sweeper
        Path(str(impl.sweep_dir)).mkdir(parents=True, exist_ok=True)  # the SQLite file lives there
        study = self._existing_study()
        if study is not None:
            trials = study.get_trials(deepcopy=False)
            running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            for number in running:
                log.warning("Trial %d was left running by an interrupted search: marked failed.", number)
                study.tell(number, state=optuna.trial.TrialState.FAIL)
            done = len(trials) - len(running)
            impl.job_idx = len(trials)  # trial number == job directory, none overwritten
            impl.n_trials = max(0, impl.n_trials - done)
            self._reseed_sampler(len(trials))
            log.info(
                "Resuming study %r: %d trials done, %d to go (hydra.sweeper.n_trials is the total).",
                impl.study_name,
                done,
                impl.n_trials,
            )
        try:
            return impl.sweep(arguments)
        except ValueError:
            study = self._existing_study()
            trials = study.get_trials(deepcopy=False) if study is not None else []
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
                raise
            # optuna has no best trial to report; the sweep summary lists why each job failed
            log.error("No trial of study %r completed.", impl.study_name)
            return None

    def _reseed_sampler(self, offset: int) -> None:
        """A sampler re-created with the same seed would propose the first trials again; continue
        with seed + trials so far instead (still reproducible)."""
        impl = self.sweeper
        sampler_cfg = OmegaConf.select(impl.config, "hydra.sweeper.sampler")
        if (
            sampler_cfg is None
            or sampler_cfg.get("seed") is None
            or isinstance(impl.sampler, functools.partial)
        ):
            return
        impl.sampler = instantiate(sampler_cfg, seed=int(sampler_cfg.seed) + offset)

    def _existing_study(self) -> Any:
        import optuna

        impl = self.sweeper
        if impl.storage is None or impl.study_name is None:
            return None
        names = {s.study_name for s in optuna.study.get_all_study_summaries(storage=impl.storage)}
        if impl.study_name not in names:
            return None
        return optuna.load_study(study_name=impl.study_name, storage=impl.storage)
