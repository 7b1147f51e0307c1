"""A triage session: its label store (`<run>/triage.sqlite`) holding the queue and every decision.
Opening a store that already holds the queue asked for continues it where it stopped; the queue
can be exported as the manifest training reads, or as Label Studio tasks (with the model's
predictions and the labels given so far) to label it in Label Studio instead."""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from railway_defect.data.label_store import LabelStore, write_manifest
from railway_defect.data.label_studio import export_tasks
from railway_defect.inference.model import Predictor, load_predictor
from railway_defect.labelling.app import LOOPBACK_HOSTS
from railway_defect.labelling.queue import build_items, collect
from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

EXPORTS = ("manifest", "label_studio")


def queue_key(input: str, order: str, predictor: Predictor) -> dict[str, Any]:
    """What makes a queue the same queue: its source, order and model."""
    return {"input": str(Path(input).expanduser().resolve()), "order": order, "model": predictor.model_id}


def open_store(
    db: str | Path,
    input: str | None,
    order: str,
    predictor: Predictor | None,
    every_s: float = 1.0,
    batch_size: int = 32,
    rebuild: bool = False,
) -> LabelStore:
    """The store at `db` with the queue of `input` in `order`: built when new (or `rebuild`), else
    the one stored (a different queue in it is refused: its decisions would be mixed up)."""
    store = LabelStore(db)
    stored = store.meta()
    if input is None:
        if not stored:
            raise UserError(f"{db} holds no queue yet: give input=FOLDER|GLOB|VIDEO|predictions.csv.")
        return store
    if predictor is None:
        raise UserError("Give the model that scores the queue: ckpt_path=... (or model_path=...).")
    wanted = queue_key(input, order, predictor)
    if stored and all(stored.get(k) == v for k, v in wanted.items()) and not rebuild:
        log.info("Continuing the queue of %s at position %d.", db, store.first_unlabelled() + 1)
        return store
    if stored and not rebuild:
        raise UserError(
            f"{db} holds the queue of {stored.get('input')} (order={stored.get('order')}, model "
            f"{stored.get('model')}); give another db=..., or rebuild=true to replace the queue "
            "(decisions stay)."
        )
    contract = predictor.contract
    items = build_items(collect(input, order, predictor, every_s, batch_size), order, predictor)
    meta = {
        **wanted,
        "classes": list(contract.class_names),
        "positive_class": contract.positive_class,
        "rule": predictor.rule.describe(contract.class_names),
        "threshold": predictor.rule.threshold,
        "costs": None if predictor.rule.costs is None else [list(row) for row in predictor.rule.costs],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store.set_queue(meta, items)
    log.info("Queue of %d item(s) in %s, order=%s.", len(items), db, order)
    return store


def export(store: LabelStore, kind: str, output: str | Path, document_root: str | None = None) -> Path:
    """The store's labels as training's manifest.csv (`manifest`), or its photos as Label Studio tasks
    and their labelling config beside them (`label_studio`: export_tasks logs the counts, the config's
    path and how to start Label Studio on them)."""
    output = Path(output)
    if kind == "manifest":
        rows, changed = write_manifest(store, output)
        log.info("%d labelled photo(s) written to %s.", rows, output)
        if changed:
            log.warning(
                "%d photo(s) left out: changed on disk since labelled (e.g. %s).", len(changed), changed[0]
            )
        return output
    if kind == "label_studio":
        return export_tasks(store, output, document_root)
    raise UserError(f"export={kind}: use one of {', '.join(EXPORTS)}.")


def access_token(host: str, token: str | None) -> str | None:
    """The token every request must carry: the one given, or on a bind other than loopback a new
    random one (printed with the address); None on loopback without one."""
    if token is not None and len(token) < 16:
        raise UserError("token=... must be at least 16 characters (or leave it out to have one generated).")
    if token is None and host not in LOOPBACK_HOSTS:
        return secrets.token_urlsafe(24)
    return token


def model_for(model_path: str | None, device: str, threshold: float | None) -> Predictor | None:
    return load_predictor(model_path, device, threshold) if model_path else None
