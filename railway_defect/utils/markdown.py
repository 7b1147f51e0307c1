"""Markdown tables for the reports (summary.md, evaluation.md)."""

from __future__ import annotations


def md_table(header: list[str], body: list[list[str]]) -> list[str]:
    """The lines of a table; a `|` inside a cell is escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return lines
