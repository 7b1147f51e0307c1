"""The split membership of a run (`splits.csv`: split, path, label, group, content digest).

Training writes it; evaluate and the review functions read it, so that a model is scored on the
images it was validated on (its own fold, its own seed) and never on images it trained on."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from railway_defect.data.discovery import Sample
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import atomic_open

SPLITS_FILE = "splits.csv"
FIELDS = ("split", "path", "label", "group", "digest")
# how many changed files an error names
SHOWN = 5


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a manifest may list files outside the root
        return str(path)


def write_split_record(
    path: str | Path,
    root: Path,
    splits: dict[str, Sequence[Sample]],
    digests: dict[str, Iterable[str]],
) -> None:
    """One row per image actually used (`digests`: per split, in the order of its samples), paths
    relative to `root` so the data folder can move; written row by row, never held whole."""
    with atomic_open(path) as f:  # newlines as write_text_atomic wrote them
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for split, samples in splits.items():
            for s, digest in zip(samples, digests[split], strict=True):
                writer.writerow(
                    {
                        "split": split,
                        "path": _relative(s.path, root),
                        "label": s.label,
                        "group": s.group,
                        "digest": digest,
                    }
                )


def read_split_record(path: str | Path, root: Path) -> tuple[dict[str, list[Sample]], dict[Path, str]]:
    """The samples per split recorded in `path`, resolved against `root`, and their digests."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist, so the images this model was validated on are unknown (runs record "
            "them since splits.csv was added); pass splits=resplit to split data.root again on purpose "
            "(the metrics may then include images the model trained on), or splits=PATH/splits.csv."
        )
    splits: dict[str, list[Sample]] = {}
    digests: dict[Path, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            file = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
            splits.setdefault(row["split"], []).append(Sample(file, row["label"], row["group"]))
            digests[file] = row["digest"]
    missing = [p for p in digests if not p.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} images listed in {path} are not under {root} (e.g. {missing[0]}); set "
            "data.root to the folder the model was trained on, or pass splits=resplit."
        )
    return splits, digests


def check_unchanged(record: Path, expected: dict[Path, str], actual: dict[Path, str]) -> None:
    """The images must be the very files the run used: a changed file could be a training image."""
    changed = [p for p, digest in actual.items() if expected.get(p) and expected[p] != digest]
    if changed:
        names = ", ".join(str(p) for p in changed[:SHOWN])
        raise UserError(
            f"{len(changed)} images changed since the run recorded them in {record} ({names}); score the "
            "original files, or pass splits=resplit to split the current data again on purpose."
        )
