"""What every command shares: its work runs inside `run_command`, so a problem the user can fix
(a UserError, a full or read-only disk) ends it with one `error: ...` line and exit code 1, the
same in every command; and `call_with_config` passes a config's keys to a function by name, so
a YAML key, its command-line override and the function's parameter are one name, not three copies
(and a key that reaches nothing is said, not dropped)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from railway_defect.utils.errors import DISK_HINT, user_message

T = TypeVar("T")
# read by Hydra and the output paths, not by the command's function
COMMAND_KEYS = frozenset({"task_name", "paths", "hydra"})
log = logging.getLogger(__name__)


def command_failure(message: str) -> SystemExit:
    """The exit of a command stopped by a problem the user can fix: the message is logged (to the
    run's log file, where logging is set up: Hydra's commands) and is the last line on stderr; the
    exit code is 1."""
    if logging.getLogger().handlers:
        log.error("%s", message)
    return SystemExit(f"error: {message}")


def run_command(work: Callable[[], T], hint: str = DISK_HINT) -> T:
    """Run a command's work; a UserError or a disk problem becomes `command_failure` (a bug keeps its
    traceback). `hint` says what to do about a full disk in this command's terms."""
    try:
        return work()
    except Exception as e:
        message = user_message(e, hint)
        if message is None:
            raise
        raise command_failure(message) from None


def _plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    )


def unused_keys(
    function: Callable[..., Any],
    cfg: Mapping[str, Any],
    sections: Sequence[str] = (),
    read: Sequence[str] = (),
) -> list[str]:
    """The keys of a command's config that neither `function` takes nor the command `read` itself:
    keys that would change nothing. `sections` (e.g. `data`) are searched like the top level."""
    parameters = set(inspect.signature(function).parameters)
    known = parameters | COMMAND_KEYS | set(sections) | set(read)
    unused = [str(key) for key in cfg if key not in known]
    for name in sections:
        keys = (f"{name}.{key}" for key in cfg[name] if key not in parameters)
        unused += [key for key in keys if key not in read]
    return unused


def call_with_config(
    function: Callable[..., T],
    cfg: Mapping[str, Any],
    sections: Sequence[str] = (),
    read: Sequence[str] = (),
    **explicit: Any,
) -> T:
    """Call `function` with each of its parameters taken from `explicit`, else from the config's
    top level, else from its `sections` in order (plain Python values); parameters found nowhere
    keep their defaults. A config key that nothing uses (not a parameter, not `read` by the command
    itself) gets a one-line warning instead of being dropped in silence."""
    unused = unused_keys(function, cfg, sections, read)
    if unused:
        log.warning("These config keys change nothing in this command, ignored: %s.", ", ".join(unused))
    arguments = dict(explicit)
    for name in inspect.signature(function).parameters:
        if name in arguments:
            continue
        section = next((s for s in (cfg, *(cfg[n] for n in sections)) if name in s), None)
        if section is not None:
            arguments[name] = _plain(section[name])
    return function(**arguments)
