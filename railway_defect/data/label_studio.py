"""Label Studio interop: a triage queue leaves as Label Studio tasks, and Label Studio's labels come
back as (photo, label) pairs that training reads (`data.labels=<export.json>`).

- `export_tasks` writes the queue's photos as a tasks JSON file (Label Studio's "Basic Label Studio
  JSON format", docs "Get data into Label Studio" and "Import pre-annotated data"): each task
  carries the model's prediction by the queue's own decision rule and, when the photo already has
  a standing label in triage, that label as an annotation, so no review is done twice. Beside it
  goes the labelling config (`<stem>.xml`) to create the project with. Photos are named by Label
  Studio's local-files URLs (`/data/local-files/?d=<path under the document root>`): Label Studio
  serves them from the disk they are on, nothing is uploaded or copied.
- `read_annotations` reads a project's "JSON" export (docs "Export annotations": a list of tasks,
  each with its `annotations`) or its "JSON-MIN" export, and gives each task's latest choice that
  was not cancelled."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit
from urllib.request import url2pathname
from xml.sax.saxutils import quoteattr

import numpy as np

from railway_defect.data.label_store import Item, LabelStore, changed_on_disk, queue_rule
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import atomic_open, write_text_atomic

log = logging.getLogger(__name__)

# the names the labelling config gives its tags: every result names them (from_name, to_name)
FROM_NAME = "label"
TO_NAME = "image"
LOCAL_FILES = "/data/local-files/"
UPLOADS = "/data/upload/"
PAGE = 1000
EXPORT_HINT = 'export the project from Label Studio as "JSON" (Export > JSON)'
NO_TIME = datetime.min.replace(tzinfo=timezone.utc)


# export ---------------------------------------------------------------------------------------
def labelling_config(classes: Sequence[str]) -> str:
    """The labelling config of a project for these tasks: the photo and one choice among the classes
    (the names the tasks' results use: `label` from, `image` to)."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInLine="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def config_path(output: str | Path) -> Path:
    """Where `export_tasks` writes the labelling config: `<output stem>.xml` beside the tasks."""
    output = Path(output)
    return output.with_name(f"{output.stem}.xml")


def export_tasks(store: LabelStore, output: str | Path, document_root: str | Path | None = None) -> Path:
    """Write the queue's photos as Label Studio tasks to `output` (JSON) and the labelling config to
    `config_path(output)`, both atomically. Video frames are left out: a task names an image file.

    `document_root`: the folder the photos' local-files URLs are relative to; Label Studio must run
    with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to it (and LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED
    =true), and the project needs a Local files source storage at a folder under it that holds the
    photos. By default the parent of the folder the photos share: Label Studio refuses a storage at
    the document root itself, so the storage can then be that shared folder (the log names it)."""
    output = Path(output)
    config = config_path(output)
    if config == output:
        raise UserError(f"output={output}: give the tasks a .json name (the labelling config is {config}).")
    meta = store.meta()
    items = list(_queue(store))
    photos = [item for item in items if item.frame is None]
    if not photos:
        raise UserError(f"{store.path} holds no photos to export (Label Studio tasks name image files).")
    if len(photos) < len(items):
        log.warning(
            "%d video frame(s) left out: a Label Studio task names an image file.", len(items) - len(photos)
        )
    root, storage = _document_root([item.path for item in photos], document_root)
    tasks, carried = _tasks(store, photos, meta, root)
    with atomic_open(output, "w") as file:
        json.dump(tasks, file, indent=1, ensure_ascii=False)
        file.write("\n")
    write_text_atomic(config, labelling_config(meta["classes"]))
    log.info(
        "%d Label Studio task(s) written to %s (%d with a triage label), labelling config %s. Start "
        "Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=%s, add Local files source storage(s) at %s (import "
        "method Tasks, Save without Sync), then import %s.",
        len(tasks),
        output,
        carried,
        config,
        root,
        storage,
        output,
    )
    return output


def _queue(store: LabelStore) -> Iterator[Item]:
    """Every item of the queue, in order, a page at a time."""
    offset = 0
    while page := store.items(offset, PAGE):
        yield from page
        offset = page[-1].position + 1


def _document_root(paths: Sequence[str], given: str | Path | None) -> tuple[str, str]:
    """(document root, the folder(s) Local files storages serve all the photos from: Label Studio
    serves a file only from a storage of the project, and refuses one at the document root)."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    shared = os.path.commonpath(sorted(folders))
    if given is None:
        return os.path.dirname(shared), shared
    root = os.path.abspath(os.path.expanduser(str(given)))
    outside = [p for p in paths if os.path.commonpath([root, os.path.abspath(p)]) != root]
    if outside:
        raise UserError(
            f"document_root={root} does not hold {len(outside)} photo(s) of the queue (e.g. {outside[0]}); "
            "give a folder above all of them."
        )
    if root in folders:
        log.warning(
            "Some photos lie directly in document_root=%s, where Label Studio allows no storage: it will not "
            "show them; give a document_root one folder higher.",
            root,
        )
    if shared != root:
        return root, shared
    tops = sorted({os.path.join(root, os.path.relpath(f, root).split(os.sep)[0]) for f in folders - {root}})
    return root, ", ".join(tops) or root


def _tasks(
    store: LabelStore, photos: Sequence[Item], meta: dict[str, Any], root: str
) -> tuple[list[dict[str, Any]], int]:
    """The tasks of `photos`, and how many carry a triage label as an annotation (a photo changed
    on disk since it was labelled keeps its task, without the label given to other pixels)."""
    rule, classes, model = queue_rule(meta), meta["classes"], meta.get("model")
    decisions = store.current()
    tasks, carried = [], 0
    for item in photos:
        task: dict[str, Any] = {"data": _data(item, root)}
        if item.probs is not None:
            index = int(rule.labels(np.asarray([item.probs], dtype=np.float64))[0])
            prediction: dict[str, Any] = {"model_version": str(model)} if model is not None else {}
            prediction.update(
                score=float(item.probs[index]), result=[_choice(f"p{item.position}", classes[index])]
            )
            task["predictions"] = [prediction]
        decision = decisions.get(item.position)
        if decision is not None and not changed_on_disk(decision):
            task["annotations"] = [
                {"result": [_choice(f"a{item.position}", decision.label)], "was_cancelled": False}
            ]
            carried += 1
        tasks.append(task)
    return tasks, carried


def _data(item: Item, root: str) -> dict[str, Any]:
    """A task's data: the local-files URL Label Studio shows, the absolute path read back (so the
    export names the photo whatever root it is read with), the queue position (0-based)."""
    relative = Path(os.path.relpath(os.path.abspath(item.path), root)).as_posix()
    url = f"{LOCAL_FILES}?d={quote(relative, safe='/')}"
    return {"image": url, "path": os.path.abspath(item.path), "position": item.position}


def _choice(result_id: str, label: str) -> dict[str, Any]:
    return {
        "id": result_id,
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "choices",
        "value": {"choices": [label]},
    }


# import ---------------------------------------------------------------------------------------
def read_annotations(path: str | Path, root: str | Path | None = None) -> list[tuple[str, str]]:
    """(absolute photo path, label) of each labelled task of a Label Studio "JSON" (or "JSON-MIN")
    export, in task order. A task's label is the choice of its latest annotation not cancelled.
    `root`: the LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT that `/data/local-files/?d=...` URLs are
    relative to (tasks written by `export_tasks` name their photo's absolute path and need none).
    Tasks without such an annotation, or whose photo is not a local file, are skipped and counted."""
    source = Path(path).expanduser()
    tasks = _load_tasks(source)
    pairs: list[tuple[str, str]] = []
    unlabelled, not_local = 0, 0
    for number, task in enumerate(tasks, start=1):
        label = _label(task, source, number)
        if label is None:
            unlabelled += 1
            continue
        photo = _photo(task["data"], root, source, _task_name(task, number))
        if photo is None:
            not_local += 1
            continue
        pairs.append((photo, label))
    if unlabelled:
        log.warning(
            "%d task(s) of %s skipped: no annotation with a choice that was not cancelled.",
            unlabelled,
            source,
        )
    if not_local:
        log.warning(
            "%d labelled task(s) of %s skipped: their photo is not a local file (uploaded to Label Studio "
            "or a URL); add photos through a Local files storage (triage export=label_studio writes "
            "such tasks).",
            not_local,
            source,
        )
    return pairs


def _load_tasks(source: Path) -> list[dict[str, Any]]:
    """The export's tasks, each with `data` (a dict) and `annotations` (a list); a JSON-MIN export's
    records are made into such tasks. Anything else is refused in one line that says what to do."""
    if not source.is_file():
        raise UserError(f"{source} is not a file; {EXPORT_HINT}.")
    try:
        tasks = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{source} is not JSON ({e}); {EXPORT_HINT}.") from None
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise UserError(f"{source} is not a list of Label Studio tasks; {EXPORT_HINT}.")
    if tasks and all("data" not in task and "annotations" not in task and "image" in task for task in tasks):
        return _from_json_min(tasks)
    for number, task in enumerate(tasks, start=1):
        if not isinstance(task.get("data"), dict) or not isinstance(task.get("annotations", []), list):
            raise UserError(
                f"{source}: {_task_name(task, number)} has no `data` object or no `annotations` list, so it "
                f"is not a Label Studio JSON export; {EXPORT_HINT}."
            )
    return tasks


def _from_json_min(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-MIN lists one flat record per annotation (the task's data, then the choice under the
    labelling config's name, single choices as a string): records of one task id become one task."""
    meta_keys = {"id", FROM_NAME, "annotator", "annotation_id", "created_at", "updated_at", "lead_time"}
    tasks: dict[Any, dict[str, Any]] = {}
    for number, record in enumerate(records):
        key = record.get("id", f"record {number + 1}")
        task = tasks.setdefault(
            key,
            {"id": key, "data": {k: v for k, v in record.items() if k not in meta_keys}, "annotations": []},
        )
        value = record.get(FROM_NAME)
        if value is None:
            continue
        choices = (
            [value] if isinstance(value, str) else value.get("choices") if isinstance(value, dict) else None
        )
        result = [{"type": "choices", "value": {"choices": choices}}]
        task["annotations"].append(
            {k: record.get(k) for k in ("created_at", "updated_at")} | {"result": result}
        )
    return list(tasks.values())


def _label(task: dict[str, Any], source: Path, number: int) -> str | None:
    """The choice of the task's latest annotation (by updated_at, else created_at, else order) that
    was not cancelled and has one; None when none has."""
    found = []
    for order, annotation in enumerate(task.get("annotations") or []):
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        choices = _choices(annotation.get("result"))
        if choices:
            found.append((_time(annotation), order, choices))
    if not found:
        return None
    choices = max(found, key=lambda f: (f[0], f[1]))[2]
    if len(choices) > 1 or not isinstance(choices[0], str):
        raise UserError(
            f"{source}: {_task_name(task, number)} is labelled {choices}: a photo takes one label; make the "
            'Choices single (choice="single") and label it again.'
        )
    return choices[0]


def _choices(result: Any) -> list[Any] | None:
    """The choices of the first `choices` item of an annotation's result."""
    for item in result if isinstance(result, list) else []:
        if isinstance(item, dict) and item.get("type") == "choices":
            value = item.get("value")
            choices = value.get("choices") if isinstance(value, dict) else None
            return choices if isinstance(choices, list) else None
    return None


def _time(annotation: dict[str, Any]) -> datetime:
    """When an annotation was last changed (Label Studio writes ISO 8601, `Z` for UTC)."""
    for key in ("updated_at", "created_at"):
        value = annotation.get(key)
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return NO_TIME


def _photo(data: dict[str, Any], root: str | Path | None, source: Path, task: str) -> str | None:
    """The absolute path of a task's photo: `data.path` (tasks from `export_tasks`), else decoded from
    `data.image` (a local-files URL under `root`, a file:// URL or an absolute path); None for a photo
    Label Studio holds itself (`/data/upload/...`) or one behind another URL."""
    if isinstance(data.get("path"), str) and os.path.isabs(data["path"]):
        return data["path"]
    image = data.get(TO_NAME)
    if not isinstance(image, str):
        return None
    parts = urlsplit(image)
    if (parts.path.rstrip("/") + "/").endswith(LOCAL_FILES):
        relative = parse_qs(parts.query).get("d")
        if not relative:
            return None
        if root is None:
            raise UserError(
                f"{source}: {task} names its photo by a Label Studio local-files URL ({image}); give the "
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT it is relative to."
            )
        base = os.path.abspath(os.path.expanduser(str(root)))
        return os.path.normpath(os.path.join(base, relative[0].lstrip("/")))
    if parts.path.startswith(UPLOADS):
        return None
    if os.path.isabs(image):
        return image
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return url2pathname(parts.path)
    return None


def _task_name(task: dict[str, Any], number: int) -> str:
    return f"task {task['id']}" if "id" in task else f"task number {number}"
