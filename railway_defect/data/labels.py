"""Reviewed labels (`data.labels`): the labels of a triage session, a manifest.csv or a Label Studio
JSON export, laid over the photos of `data.root`, so that one command trains on what reviewers
decided: `train data.root=PHOTOS data.labels=<triage.sqlite | labels.csv | export.json>`.

- A photo under the root that was reviewed takes its reviewed label (an override when it differs
  from its folder's or manifest's label) and keeps its split.
- A reviewed photo the root's layout does not list (new photos, a flat folder, photos elsewhere)
  joins the split its row names, else `train` (folds and hold-outs split it like any photo), in the
  order of the labels, as a manifest of the same rows would list it.
- When no folder of the root names a class the reviewers know (date or camera folders of crew
  photos), the folders are not labels: only the reviewed photos train.
- Photos changed on disk since they were labelled in triage are left out, never trained on a label
  given to other pixels.

Every count goes into data_report.json (`labels`)."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from railway_defect.data.discovery import (
    Sample,
    _iter_manifest_rows,
    _manifest_path,
    _split_name,
)
from railway_defect.data.label_store import LabelStore, reviewed_labels
from railway_defect.data.label_studio import read_annotations
from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class LabelRow:
    path: str  # absolute, symlinks resolved
    label: str
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class ReviewedLabels:
    """Labels by photo, from `source` (kind: triage, manifest or label_studio)."""

    source: Path
    kind: str
    rows: tuple[LabelRow, ...]
    classes: frozenset[str] = frozenset()
    changed_on_disk: tuple[str, ...] = ()

    def apply(self, splits: dict[str, list[Sample]]) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
        """The layout's splits with the reviewed labels laid over them, and what changed."""
        known = self.classes | {row.label for row in self.rows}
        layout_labels = {s.label for samples in splits.values() for s in samples}
        folders_are_labels = not layout_labels or bool(layout_labels & known)
        pending = {row.path: row for row in self.rows}
        counts: Counter[str] = Counter()
        overrides: list[dict[str, str]] = []
        relabelled: dict[str, list[Sample]] = {}
        for split, samples in splits.items():
            kept = relabelled.setdefault(split, [])
            for sample in samples:
                row = pending.pop(os.path.realpath(sample.path), None)
                if row is None:
                    counts["unreviewed" if folders_are_labels else "left_out_unlabelled"] += 1
                    if folders_are_labels:
                        kept.append(sample)
                    continue
                if not folders_are_labels:
                    counts["added"] += 1
                elif row.label == sample.label:
                    counts["confirmed"] += 1
                else:
                    counts["overridden"] += 1
                    overrides.append({"path": str(sample.path), "was": sample.label, "now": row.label})
                kept.append(replace(sample, label=row.label))
        self._add_unlisted(pending.values(), relabelled, counts)
        if not folders_are_labels and layout_labels:
            log.warning(
                "No folder of data.root (%s) names a class of %s: the folders are taken for unlabelled "
                "photos, and only the reviewed photos train.",
                ", ".join(sorted(layout_labels)[:5]),
                self.source,
            )
        return relabelled, self._report(counts, overrides)

    def _add_unlisted(self, rows: Any, splits: dict[str, list[Sample]], counts: Counter[str]) -> None:
        """Reviewed photos that the root's layout does not list join their row's split."""
        for row in rows:
            if not os.path.isfile(row.path):
                log.warning("Skipping %s (labelled in %s): not found.", row.path, self.source)
                counts["missing"] += 1
                continue
            split = _split_name(row.split, str(self.source)) if row.split else "train"
            splits.setdefault(split, []).append(Sample(Path(row.path), row.label, row.group or row.path))
            counts["added"] += 1

    def _report(self, counts: Counter[str], overrides: list[dict[str, str]]) -> dict[str, Any]:
        report = {
            "source": str(self.source),
            "kind": self.kind,
            "reviewed": len(self.rows),
            **{
                key: counts[key]
                for key in (
                    "overridden",
                    "confirmed",
                    "added",
                    "unreviewed",
                    "left_out_unlabelled",
                    "missing",
                )
            },
            "changed_on_disk": len(self.changed_on_disk),
            "overrides": overrides,
        }
        log.info(
            "data.labels=%s: %d reviewed photo(s), %d label(s) overridden, %d photo(s) added.",
            self.source,
            len(self.rows),
            counts["overridden"],
            counts["added"],
        )
        return report


def read_labels(path: str | Path, root: str | Path) -> ReviewedLabels:
    """The reviewed labels in `path`: a triage label store (SQLite), a manifest (.csv: path,label
    [,split,group], relative paths from `root`) or a Label Studio JSON export (.json)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise UserError(
            f"data.labels={path} is not a file; give a triage.sqlite, a manifest .csv or a Label Studio "
            "JSON export."
        )
    with source.open("rb") as file:
        is_sqlite = file.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    if is_sqlite:
        return _from_triage(source)
    if source.suffix.lower() == ".csv":
        return _from_manifest(source, Path(root))
    if source.suffix.lower() == ".json":
        pairs = read_annotations(source, root)
        return ReviewedLabels(source, "label_studio", _unique(_rows(pairs), source))
    raise UserError(
        f"data.labels={path}: not a triage database, a .csv manifest or a Label Studio .json export."
    )


def _from_triage(source: Path) -> ReviewedLabels:
    """The standing labels of a triage session; the store is checked before it is opened for
    writing, so that another SQLite file is never given the store's tables."""
    try:
        with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        raise UserError(f"data.labels={source}: cannot read the database ({e}).") from None
    if not {"items", "decisions", "meta"} <= tables:
        raise UserError(f"data.labels={source} is an SQLite file but not a railway_defect triage database.")
    store = LabelStore(source)
    labels, changed = reviewed_labels(store)
    if changed:
        log.warning(
            "%d photo(s) of %s left out: changed on disk or gone since they were labelled (e.g. %s).",
            len(changed),
            source,
            changed[0],
        )
    classes = frozenset(store.meta().get("classes", ()))
    return ReviewedLabels(source, "triage", _rows(labels.items()), classes, tuple(changed))


def _from_manifest(source: Path, root: Path) -> ReviewedLabels:
    rows = []
    for line, row in enumerate(_iter_manifest_rows(source), start=2):
        if not row["label"]:
            raise UserError(f"{source} line {line} has no label; label the photo or remove the line.")
        path = _manifest_path(root, row["path"], f"{source} line {line}")
        rows.append(LabelRow(os.path.realpath(path), row["label"], row.get("split"), row.get("group")))
    return ReviewedLabels(source, "manifest", _unique(rows, source))


def _rows(pairs: Any) -> tuple[LabelRow, ...]:
    return tuple(LabelRow(os.path.realpath(path), label) for path, label in pairs)


def _unique(rows: Any, source: Path) -> tuple[LabelRow, ...]:
    """One label per photo: a photo listed twice with two labels is refused, a repeat dropped."""
    seen: dict[str, LabelRow] = {}
    for row in rows:
        first = seen.setdefault(row.path, row)
        if first.label != row.label:
            raise UserError(
                f"{source} labels {row.path} both {first.label} and {row.label}; one photo has one label."
            )
    return tuple(seen.values())
