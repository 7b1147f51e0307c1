"""Multi-process trainers inside a sweep started on this machine.

Lightning's default DDP launcher starts the other ranks by re-running the command line. In a
Hydra sweep (`-m`, an Optuna search, a CV sweep) that command line is the whole sweep, so each
extra rank would start a sweep of its own. Inside a sweep the strategy therefore starts its ranks
with `SpawnLauncher` instead: fresh interpreters that receive the pickled trainer, model and
data, as Lightning's `ddp_spawn` does, with the same process group backend and timeout. Single
runs keep Lightning's launcher (no pickling, and torchrun/SLURM start processes the same way).

A spawned rank does not share the main process's memory, so whatever the code after `fit` reads
is sent back from rank 0: the weights (Lightning does that), the callbacks' state (best.ckpt's
path and score, the epoch history), the completed epochs, and a divergence, which is raised again
in the main process as if the fit had run there. The rank's log records go to the job's own log
handlers, with its warning filters and torch thread count.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.multiprocessing.spawn import ProcessException

from railway_defect.callbacks.divergence import TrainingDiverged
from railway_defect.utils.layout import in_multirun

log = logging.getLogger(__name__)

# (kind, stdout/stderr or file name, level, formatter) of each handler of the root logger
HandlerSpec = tuple[str, str, int, logging.Formatter | None]


class WorkerFailed(RuntimeError):
    """A spawned training process raised; the message is its exception's last line."""


def _handler_specs() -> list[HandlerSpec]:
    specs: list[HandlerSpec] = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            specs.append(("file", handler.baseFilename, handler.level, handler.formatter))
        elif isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            name = "stdout" if handler.stream is sys.stdout else "stderr"
            specs.append(("stream", name, handler.level, handler.formatter))
    return specs


def _install_handlers(specs: list[HandlerSpec], root_level: int) -> None:
    """The job's log handlers (Hydra's console and file) in a spawned rank, which starts without any."""
    if not specs:
        return
    root = logging.getLogger()
    for kind, target, level, formatter in specs:
        handler: logging.Handler
        if kind == "file":
            handler = logging.FileHandler(target, mode="a")
        else:
            handler = logging.StreamHandler(sys.stdout if target == "stdout" else sys.stderr)
        handler.setLevel(level)
        if formatter is not None:
            handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(root_level)
    # Lightning gave its loggers their own handler, and stopped propagation, as the root had none
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _failure_line(error: ProcessException) -> str:
    """The last line of the rank's traceback (`TypeError: ...`), which torch sends as text."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"training process {error.error_index}: {lines[-1] if lines else type(error).__name__}"


class SpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher plus what this project's code after `fit` needs from rank 0."""

    def __init__(self, strategy: DDPStrategy) -> None:
        super().__init__(strategy, start_method="spawn")
        self.diverged: str | None = None
        self.in_worker = False  # True in the spawned ranks, False in the process that waits for them
        self._setup: dict[str, Any] = {}

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        # captured here, where the main process has configured them, for _wrapping_function
        self._setup = {
            "threads": torch.get_num_threads(),
            "filters": list(warnings.filters),
            "handlers": _handler_specs(),
            "root_level": logging.getLogger().level,
        }
        self.diverged = None
        try:
            with self._forward_sigterm() as sigterm:
                result = super().launch(function, *args, trainer=trainer, **kwargs)
        except ProcessException as e:
            if sigterm["received"]:
                raise SIGTERMException from e
            raise WorkerFailed(_failure_line(e)) from e
        if self.diverged:
            raise TrainingDiverged(self.diverged)
        return result

    @contextlib.contextmanager
    def _forward_sigterm(self) -> Iterator[dict[str, bool]]:
        """The main process only waits for the ranks: SIGTERM goes to them (Lightning stops them at
        the next batch, SaveOnInterrupt writes last.ckpt) and the run then ends as interrupted."""
        state = {"received": False}
        if threading.current_thread() is not threading.main_thread():
            yield state
            return

        def forward(signum: int, frame: Any) -> None:
            state["received"] = True
            self.kill(signal.SIGTERM)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            yield state
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _wrapping_function(
        self,
        process_idx: int,
        trainer: L.Trainer | None,
        function: Callable,
        args: Any,
        kwargs: Any,
        return_queue: Any,
        global_states: Any = None,
    ) -> None:
        setup = self._setup
        self.in_worker = True

        def run(*run_args: Any, **run_kwargs: Any) -> Any:
            # after Lightning's own thread setting (cores / ranks): the same count as the main process
            torch.set_num_threads(setup["threads"])
            for action, message, category, module, lineno in reversed(setup["filters"]):
                warnings.filterwarnings(
                    action,
                    getattr(message, "pattern", message) or "",  # a compiled regex, a string or None
                    category,
                    getattr(module, "pattern", module) or "",
                    lineno,
                )
            _install_handlers(setup["handlers"], setup["root_level"])
            try:
                return function(*run_args, **run_kwargs)
            except BaseException as e:
                if trainer is None:
                    raise
                # what Lightning does where fit runs in the calling process (SaveOnInterrupt's
                # last.ckpt, loggers finalised); a spawned rank calls the stage directly
                call._interrupt(trainer, e)
                trainer._teardown()
                if not isinstance(e, TrainingDiverged):
                    raise
                # every rank raises it (DivergenceGuard decides together); rank 0 still reports back
                self.diverged = str(e)
                return None

        super()._wrapping_function(process_idx, trainer, run, args, kwargs, return_queue, global_states)

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        ours: dict[str, Any] = {"diverged": self.diverged}
        if trainer.state.fn == TrainerFn.FITTING:
            ours["callbacks"] = {c.state_key: c.state_dict() for c in trainer.callbacks}
            ours["epoch_progress"] = trainer.fit_loop.epoch_progress.state_dict()
        # as bytes, like Lightning's metrics: tensors sent through the queue as they are would be
        # shared memory that disappears with this process
        extra["railway_defect"] = pickle.dumps(ours)
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        ours = pickle.loads(extra["railway_defect"])  # sent by our own rank 0
        self.diverged = ours["diverged"]
        states = ours.get("callbacks", {})
        for callback in trainer.callbacks:
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
        if "epoch_progress" in ours:
            trainer.fit_loop.epoch_progress.load_state_dict(ours["epoch_progress"])


def spawn_in_sweep(trainer: L.Trainer) -> bool:
    """Inside a sweep, a DDP strategy that would re-run the command line spawns its ranks instead;
    returns whether it did. Processes started from outside (torchrun, SLURM) are left alone."""

    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    if not isinstance(strategy, DDPStrategy) or not isinstance(launcher, _SubprocessScriptLauncher):
        return False
    if launcher.cluster_environment.creates_processes_externally or not in_multirun():
        return False
    strategy._start_method = "spawn"
    strategy._launcher = SpawnLauncher(strategy)
    return True
