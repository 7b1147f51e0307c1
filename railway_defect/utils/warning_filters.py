"""Warnings a user of this project cannot act on, silenced one by one: each filter names the message
and the module that raises it, so anything else (tracer warnings, our own warnings, a new message
from the same library) is still shown."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message regex, category, module regex of the code the warning is attributed to)
KNOWN_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning's own pytree helper still builds torch's deprecated LeafSpec (fixed upstream in time)
    (
        re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        FutureWarning,
        r"(lightning\.pytorch|pytorch_lightning)\.utilities\._pytree",
    ),
)
# TorchScript's entry points announce their deprecation on every call; export=torchscript and
# loading a .pt export still use them on purpose (see railway_defect.inference.exporting)
TORCHSCRIPT_DEPRECATION = (r"`torch\.jit\.(trace|trace_method|save|load)` is deprecated", r"torch\.jit\.")


def quiet_known_noise() -> None:
    """Install the KNOWN_NOISE filters (idempotent: warnings skips a filter it already has)."""
    for message, category, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Within: TorchScript's own deprecation notices hidden; its TracerWarnings still shown."""
    message, module = TORCHSCRIPT_DEPRECATION
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)
        yield
