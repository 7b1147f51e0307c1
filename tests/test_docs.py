"""Every command in the README and the docs/ pages works as written: each `python -m
railway_defect.<command>` line (also through `make train ARGS=...`, the console scripts and
torchrun) composes its configuration with Hydra (`--cfg job`: every group and key it names
exists); each benchmark script it names answers `--help`. Running them for real is what the
other tests do, on small data."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.helpers import OFFLINE_ENV, PROJECT_ROOT, run_cli

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
HYDRA_COMMANDS = ("train", "evaluate", "predict", "export", "serve", "triage")
FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
CONSOLE_SCRIPT = re.compile(r"^railway-(\w+)\s*(.*)$")
PLACEHOLDER = re.compile(r"<[^<>]+>")


def _first_job(arguments: list[str]) -> list[str]:
    """A sweep's command line as its first job's: `-m` dropped, each swept key at its first value."""
    parsed = OverridesParser.create().parse_overrides([a for a in arguments if a not in ("-m", "--multirun")])
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


def _lines(page: Path) -> list[str]:
    """The command lines of a page's code blocks, continuations joined, comments dropped."""
    lines = []
    for block in FENCE.findall(page.read_text(encoding="utf-8")):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            line = PLACEHOLDER.sub("placeholder", line)  # <time>, <that folder>: the reader's own
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _invocation(line: str) -> tuple[str, list[str]] | None:
    """(command, arguments) of a line that runs one of the project's commands or scripts."""
    if match := CONSOLE_SCRIPT.match(line):
        return match.group(1), shlex.split(match.group(2))
    if line.startswith("make train") and "ARGS=" in line:
        return "train", shlex.split(shlex.split(line.split("ARGS=", 1)[1])[0])
    words = shlex.split(line)
    if (
        "-m" in words
        and (i := words.index("-m")) + 1 < len(words)
        and words[i + 1].startswith("railway_defect.")
    ):
        return words[i + 1].split(".", 1)[1], words[i + 2 :]
    script = next((w for w in words if w.startswith("benchmarks/") and w.endswith(".py")), None)
    return ("script", [script]) if script else None


COMMANDS = [
    pytest.param(command, arguments, id=f"{page.name}: {line[:90]}")
    for page in PAGES
    for line in _lines(page)
    if (found := _invocation(line)) is not None
    for command, arguments in [found]
]


def test_the_pages_name_commands() -> None:
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("command", "arguments"), COMMANDS)
def test_a_documented_command_works_as_written(command: str, arguments: list[str]) -> None:
    if command == "script":
        script = [sys.executable, str(PROJECT_ROOT / arguments[0]), "--help"]
        env = {**os.environ, **OFFLINE_ENV}
        result = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, check=False)
    elif command in HYDRA_COMMANDS:
        result = run_cli(f"railway_defect.{command}", *_first_job(arguments), "--cfg", "job")
    else:  # summarize: argparse
        result = run_cli(f"railway_defect.{command}", "--help")
    assert result.returncode == 0, result.stderr[-2000:]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_of_a_page_leads_somewhere(page: Path) -> None:
    """Relative links name files that exist, and headings that exist in them."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"
