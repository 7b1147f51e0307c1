"""LabelStore: every labelling decision made in triage, kept in an embedded SQLite database (WAL).

Each decision is one committed row (photo digest, path, frame, label, reviewer, time, model, the
prediction shown), so a `kill -9` of the server loses at most the decision being written and
several reviewers in several browsers lose nothing: nothing is ever overwritten. An undo marks a
reviewer's last decision undone. The label of a photo is its latest decision not undone. The queue
(what is reviewed, in which order, with the model's probabilities) lives in the same file, so that
reopening continues where it stopped. A photo whose content changed since it was labelled is
flagged and left out of exports, never silently relabelled.

Training reads the labels with `reviewed_labels` (data.labels=<triage.sqlite>), or the manifest that
`write_manifest` exports (path,label,split,group)."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import atomic_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    position INTEGER PRIMARY KEY,       -- 0-based place in the queue's order
    path TEXT NOT NULL,                 -- absolute path of the photo or video
    frame INTEGER,                      -- video frame index (null for a photo)
    time_s REAL,
    digest TEXT NOT NULL,               -- sha256 of the file's bytes when the queue was built
    probs TEXT,                         -- JSON list, one p per class (null: not scored)
    given TEXT,                         -- the label the item already had (label_issues), or null
    score REAL                          -- what the order sorted by
);
CREATE INDEX IF NOT EXISTS items_by_path ON items (path, frame);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    position INTEGER NOT NULL REFERENCES items (position),
    path TEXT NOT NULL,
    frame INTEGER,
    digest TEXT NOT NULL,               -- sha256 of the file's bytes when it was labelled
    label TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    time TEXT NOT NULL,                 -- UTC, ISO 8601
    model TEXT,                         -- the model id whose prediction was shown
    shown TEXT,                         -- JSON: {"probs": [...], "predicted": label}
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS decisions_by_position ON decisions (position, id);
"""
MANIFEST_COLUMNS = ("path", "label", "split", "group")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes ('' when it cannot be read: it then matches no stored digest).
    Cached by the file's size, inode and change times, so that showing a page of labelled photos
    does not read each again; any write changes ctime, which no tool can set back."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return _digest(str(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _digest(path: str, size: int, inode: int, mtime_ns: int, ctime_ns: int) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


@dataclass(frozen=True)
class Item:
    position: int
    path: str
    frame: int | None
    time_s: float | None
    digest: str
    probs: list[float] | None
    given: str | None = None
    score: float | None = None


@dataclass(frozen=True)
class Decision:
    id: int
    position: int
    path: str
    frame: int | None
    digest: str
    label: str
    reviewer: str
    time: str
    model: str | None


class LabelStore:
    """One SQLite file; a connection per call, so that any thread or process may use it at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as e:
            raise UserError(f"cannot open the label database {self.path} ({e}).") from e
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed decision survives a power cut
            db.row_factory = sqlite3.Row
            yield db
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a label database of railway_defect triage ({e}).") from e
        finally:
            db.close()

    # the queue ------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        with self._connect() as db:
            return {row["key"]: json.loads(row["value"]) for row in db.execute("SELECT key, value FROM meta")}

    def set_queue(self, meta: dict[str, Any], items: Sequence[Item]) -> None:
        """Replace the queue (the decisions stay: they name their photo, not only its position)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM meta")
            db.execute("DELETE FROM items")
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            db.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (i.position, i.path, i.frame, i.time_s, i.digest, _json(i.probs), i.given, i.score)
                    for i in items
                ],
            )
            db.execute("COMMIT")

    def size(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def items(self, offset: int = 0, limit: int = 50) -> list[Item]:
        """One page of the queue, in order."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM items WHERE position >= ? ORDER BY position LIMIT ?", (offset, limit)
            ).fetchall()
        return [_item(row) for row in rows]

    def item(self, position: int) -> Item | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM items WHERE position = ?", (position,)).fetchone()
        return None if row is None else _item(row)

    def frames_near(self, item: Item, each_side: int) -> list[Item]:
        """The queue's frames of `item`'s video just before and after it, in frame order, itself
        included (two look-ups on the (path, frame) index, however long the video)."""
        with self._connect() as db:
            before = db.execute(
                "SELECT * FROM items WHERE path = ? AND frame < ? ORDER BY frame DESC LIMIT ?",
                (item.path, item.frame, each_side),
            ).fetchall()
            after = db.execute(
                "SELECT * FROM items WHERE path = ? AND frame >= ? ORDER BY frame LIMIT ?",
                (item.path, item.frame, each_side + 1),
            ).fetchall()
        return [_item(row) for row in [*reversed(before), *after]]

    # decisions ------------------------------------------------------------------------------
    def record(
        self, item: Item, label: str, reviewer: str, model: str | None, shown: dict[str, Any]
    ) -> Decision:
        """Commit one decision about `item`, with the digest of the file as it is now."""
        digest = file_digest(item.path) if item.frame is None else item.digest
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        values = (
            item.position,
            item.path,
            item.frame,
            digest,
            label,
            reviewer,
            now,
            model,
            json.dumps(shown),
        )
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO decisions (position, path, frame, digest, label, reviewer, time, model, shown) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            decision_id = int(cursor.lastrowid or 0)
        return Decision(
            decision_id, item.position, item.path, item.frame, digest, label, reviewer, now, model
        )

    def undo(self, reviewer: str) -> Decision | None:
        """Mark `reviewer`'s latest decision not yet undone as undone; None when there is none."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT * FROM decisions WHERE reviewer = ? AND undone = 0 ORDER BY id DESC LIMIT 1",
                (reviewer,),
            ).fetchone()
            if row is not None:
                db.execute("UPDATE decisions SET undone = 1 WHERE id = ?", (row["id"],))
            db.execute("COMMIT")
        return None if row is None else _decision(row)

    def current(self, positions: Sequence[int] | None = None) -> dict[int, Decision]:
        """The standing decision (latest not undone) of each labelled queue position."""
        query = (
            "SELECT d.* FROM decisions d JOIN (SELECT position, MAX(id) AS id FROM decisions "
            "WHERE undone = 0 GROUP BY position) latest ON d.id = latest.id"
        )
        with self._connect() as db:
            if positions is None:
                rows = db.execute(query).fetchall()
            else:
                marks = ",".join("?" * len(positions))
                rows = db.execute(f"{query} WHERE d.position IN ({marks})", list(positions)).fetchall()
        return {row["position"]: _decision(row) for row in rows}

    def decision_count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM decisions WHERE undone = 0").fetchone()[0])

    def first_unlabelled(self) -> int:
        """Where the queue stopped: the first position without a standing decision."""
        with self._connect() as db:
            row = db.execute(
                "SELECT MIN(position) FROM items WHERE position NOT IN "
                "(SELECT position FROM decisions WHERE undone = 0)"
            ).fetchone()
        return int(row[0]) if row[0] is not None else max(self.size() - 1, 0)


def queue_rule(meta: dict[str, Any]) -> DecisionRule:
    """The decision rule the queue was scored with (its `threshold` and `costs`, stored with it), so
    the label a page shows as the prediction is the model's, whether or not the model is loaded."""
    costs = meta.get("costs")
    return DecisionRule(
        meta["classes"].index(meta["positive_class"]),
        float(meta.get("threshold", 0.5)),
        None if costs is None else tuple(tuple(float(v) for v in row) for row in costs),
    )


def changed_on_disk(decision: Decision) -> bool:
    """The photo's bytes are not those it was labelled on (video frames: not checked per frame)."""
    return decision.frame is None and file_digest(decision.path) != decision.digest


def reviewed_labels(store: LabelStore) -> tuple[dict[str, str], list[str]]:
    """Each labelled photo's standing label, by absolute path, and the photos left out because they
    changed on disk since they were labelled. Video frames are not photos a training set can list."""
    labels: dict[str, str] = {}
    changed: list[str] = []
    for decision in sorted(store.current().values(), key=lambda d: d.position):
        if decision.frame is not None:
            continue
        if changed_on_disk(decision):
            changed.append(decision.path)
        else:
            labels[decision.path] = decision.label
    return labels, changed


def write_manifest(store: LabelStore, output: str | Path) -> tuple[int, list[str]]:
    """The standing labels as the manifest.csv training reads (path,label,split,group; split and
    group empty: training splits them as it splits any photos). Written atomically."""
    labels, changed = reviewed_labels(store)
    with atomic_path(Path(output)) as tmp, tmp.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows([path, label, "", ""] for path, label in labels.items())
    return len(labels), changed


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _item(row: sqlite3.Row) -> Item:
    probs = json.loads(row["probs"]) if row["probs"] else None
    return Item(
        row["position"],
        row["path"],
        row["frame"],
        row["time_s"],
        row["digest"],
        probs,
        row["given"],
        row["score"],
    )


def _decision(row: sqlite3.Row) -> Decision:
    return Decision(
        row["id"],
        row["position"],
        row["path"],
        row["frame"],
        row["digest"],
        row["label"],
        row["reviewer"],
        row["time"],
        row["model"],
    )
