"""Label Studio interop: the tasks triage exports follow Label Studio's documented import format
(with the queue's own predictions and the labels given so far), the labelling config names what the
tasks name, and a project's JSON export reads back as (photo, label) pairs: the latest annotation
not cancelled wins, tasks without a local photo or a label are skipped, bad files are one line."""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest

from railway_defect.data.label_store import Item, LabelStore, file_digest, reviewed_labels
from railway_defect.data.label_studio import config_path, export_tasks, read_annotations
from railway_defect.labelling.session import EXPORTS, export
from railway_defect.utils.errors import UserError
from tests.helpers import write_image

CLASSES = ["Defective", "Non defective"]

# One result of a labelling tag, as "Import pre-annotated data into Label Studio" (predictions.md,
# "Add results to the predictions array": id, from_name, to_name, type, value, readonly, hidden)
# and "Export annotations and data" (export.md, "Relevant JSON property descriptions": result.*)
# describe it; a Choices tag's value is {"choices": [...]} (tags/choices).
RESULT = {
    "type": "object",
    "required": ["id", "from_name", "to_name", "type", "value"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "from_name": {"type": "string"},
        "to_name": {"type": "string"},
        "type": {"type": "string"},
        "value": {"type": "object"},
        "readonly": {"type": "boolean"},
        "hidden": {"type": "boolean"},
        "origin": {"type": "string"},
    },
}
CHOICES_RESULT = {
    "allOf": [RESULT],
    "properties": {
        "type": {"const": "choices"},
        "value": {
            "type": "object",
            "required": ["choices"],
            "properties": {"choices": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        },
    },
}

# The tasks file Label Studio imports: "Get data into Label Studio" (tasks.md, "Basic Label Studio
# JSON format": a list of tasks, each with `data` and the optional `annotations` and `predictions`)
# and "Import pre-annotated data into Label Studio" (predictions.md, "JSON format for
# pre-annotations": predictions.model_version, predictions.score, predictions.result). Task data
# naming a local file uses "/data/local-files/?d=path/file" (storage_local.md, "Tasks with local
# storage file references"). Keys the pages do not name are refused, so a misspelt one fails here.
IMPORT_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            "data": {
                "type": "object",
                "required": ["image"],
                "properties": {"image": {"type": "string", "pattern": r"^/data/local-files/\?d=[^/]"}},
            },
            "meta": {"type": "object"},
            "predictions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["result"],
                    "additionalProperties": False,
                    "properties": {
                        "model_version": {"type": "string"},
                        "score": {"type": "number"},
                        "result": {"type": "array", "items": CHOICES_RESULT},
                    },
                },
            },
            "annotations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["result"],
                    "additionalProperties": False,
                    "properties": {
                        "result": {"type": "array", "items": CHOICES_RESULT},
                        "was_cancelled": {"type": "boolean"},
                        "ground_truth": {"type": "boolean"},
                        "lead_time": {"type": "number"},
                        "completed_by": {},
                    },
                },
            },
        },
    },
}

# A project's "JSON" export: "Export annotations and data from Label Studio" (export.md, "JSON" and
# "Label Studio JSON format of annotated tasks" with its property table: id, data, project,
# annotations[].{id, result, was_cancelled, ground_truth, created_at, updated_at, lead_time, task,
# completed_by}, predictions[].{model_version, score, result}).
EXPORT_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id", "data", "annotations"],
        "properties": {
            "id": {"type": "integer"},
            "data": {"type": "object"},
            "project": {"type": "integer"},
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
            "annotations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "result", "was_cancelled", "ground_truth", "created_at", "updated_at"],
                    "properties": {
                        "id": {"type": ["integer", "string"]},
                        "result": {"type": "array", "items": RESULT},
                        "was_cancelled": {"type": "boolean"},
                        "ground_truth": {"type": "boolean"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "updated_at": {"type": "string", "format": "date-time"},
                        "lead_time": {"type": "number"},
                        "task": {"type": "integer"},
                        "completed_by": {"type": ["integer", "object"]},
                    },
                },
            },
            "predictions": {"type": "array"},
        },
    },
}


def _validate(document: Any, schema: dict[str, Any]) -> None:
    jsonschema.validate(document, schema, format_checker=jsonschema.FormatChecker())


def _meta(**rule: Any) -> dict[str, Any]:
    """The queue's meta as session.open_store writes it."""
    return {
        "input": "/photos",
        "order": "defect",
        "model": "run-2024/best.ckpt@abc123",
        "classes": CLASSES,
        "positive_class": "Defective",
        "rule": "Defective when p >= 0.12, else the likeliest other",
        "threshold": 0.12,
        "costs": None,
        "created": "2024-05-01T10:00:00+00:00",
        **rule,
    }


def _store(tmp_path: Path, probs: list[list[float] | None], **rule: Any) -> tuple[LabelStore, list[Path]]:
    """A queue of photos in two folders under tmp_path/photos (the last one's name needs quoting in
    a URL), then one video frame."""
    names = ["line 1/a.png", "line 1/b+c.png", "line 2/d é.png", "line 2/e.png"][: len(probs)]
    photos = [write_image(tmp_path / "photos" / name, size=(16, 12), seed=i) for i, name in enumerate(names)]
    items = [
        Item(i, str(p), None, None, file_digest(p), pr)
        for i, (p, pr) in enumerate(zip(photos, probs, strict=True))
    ]
    video = tmp_path / "photos" / "run.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"not really a video")
    items.append(Item(len(items), str(video), 30, 1.0, "digest", [0.9, 0.1]))
    store = LabelStore(tmp_path / "t.sqlite")
    store.set_queue(_meta(**rule), items)
    return store, photos


def _resolve(url: str, root: Path) -> str:
    """What Label Studio serves for a local-files URL: the file `d` names under its document root."""
    relative = parse_qs(urlsplit(url).query)["d"][0]
    return os.path.normpath(root / relative)


def test_the_tasks_follow_label_studios_import_format(tmp_path: Path) -> None:
    store, photos = _store(tmp_path, [[0.2, 0.8], [0.05, 0.95], None])
    store.record(
        store.item(1), "Defective", "ann", "m", {"probs": [0.05, 0.95], "predicted": "Non defective"}
    )
    output = export_tasks(store, tmp_path / "out" / "tasks.json")
    tasks = json.loads(output.read_text(encoding="utf-8"))
    _validate(tasks, IMPORT_SCHEMA)
    assert [task["data"]["path"] for task in tasks] == [str(p) for p in photos]  # no video frame
    assert [task["data"]["position"] for task in tasks] == [0, 1, 2]
    # the default document root is the folder above the one the photos share (photos/)
    assert [_resolve(task["data"]["image"], tmp_path) for task in tasks] == [str(p) for p in photos]
    assert "%20" in tasks[0]["data"]["image"] and "%2B" in tasks[1]["data"]["image"]
    first = tasks[0]["predictions"][0]
    # the stored rule (p(Defective) >= 0.12), not argmax: Defective, with its own p as the score
    assert first["result"][0]["value"]["choices"] == ["Defective"] and first["score"] == pytest.approx(0.2)
    assert first["model_version"] == "run-2024/best.ckpt@abc123"
    second = tasks[1]["predictions"][0]
    # below the threshold: the likeliest other class, with its p
    assert second["result"][0]["value"]["choices"] == ["Non defective"] and second["score"] == pytest.approx(
        0.95
    )
    assert "predictions" not in tasks[2]  # not scored: nothing to pre-annotate
    assert tasks[1]["annotations"] == [
        {
            "result": [
                {
                    "id": "a1",
                    "from_name": "label",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": ["Defective"]},
                }
            ],
            "was_cancelled": False,
        }
    ]
    assert "annotations" not in tasks[0] and "annotations" not in tasks[2]
    ids = [
        r["id"]
        for t in tasks
        for key in ("predictions", "annotations")
        for p in t.get(key, [])
        for r in p["result"]
    ]
    assert len(ids) == len(set(ids))  # Label Studio wants every result id distinct


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"threshold": 0.5}, ["Non defective", "Defective"]),
        ({"threshold": 0.12}, ["Defective", "Defective"]),
        # missing a defect costs 20 times a false alarm: Defective from p = 1/21 up
        ({"costs": [[0, 20], [1, 0]]}, ["Defective", "Non defective"]),
    ],
)
def test_the_prediction_follows_the_queues_stored_rule(
    tmp_path: Path, rule: dict[str, Any], expected: list[str]
) -> None:
    store, _ = _store(
        tmp_path, [[0.2, 0.8], [0.6, 0.4]] if "threshold" in rule else [[0.2, 0.8], [0.04, 0.96]], **rule
    )
    tasks = json.loads(export_tasks(store, tmp_path / "tasks.json").read_text(encoding="utf-8"))
    predicted = [t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks]
    assert predicted == expected
    scores = [t["predictions"][0]["score"] for t in tasks]
    probs = [store.item(i).probs for i in range(2)]
    assert scores == [p[CLASSES.index(label)] for p, label in zip(probs, expected, strict=True)]


def test_the_labelling_config_names_what_the_tasks_name(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, [[0.3, 0.7]])
    meta = store.meta()
    classes = ["Good", 'Poor & "worn" <sleeper>', "Défaut"]
    store.set_queue({**meta, "classes": classes, "positive_class": "Good"}, store.items(0, 10))
    output = export_tasks(store, tmp_path / "tasks.json")
    config = config_path(output)
    assert config == tmp_path / "tasks.xml" and config.is_file()
    view = ET.fromstring(config.read_text(encoding="utf-8"))
    assert view.tag == "View"
    image, choices = view.find("Image"), view.find("Choices")
    assert image is not None and choices is not None
    assert image.attrib == {"name": "image", "value": "$image"}
    assert choices.attrib == {"name": "label", "toName": "image", "choice": "single", "showInLine": "true"}
    assert [c.attrib["value"] for c in choices.findall("Choice")] == classes
    result = json.loads(output.read_text(encoding="utf-8"))[0]["predictions"][0]["result"][0]
    assert (result["from_name"], result["to_name"]) == (choices.attrib["name"], image.attrib["name"])
    assert image.attrib["value"] == "$" + next(
        iter(json.loads(output.read_text(encoding="utf-8"))[0]["data"])
    )


def test_a_document_root_given_names_the_photos_under_it_and_must_hold_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, photos = _store(tmp_path, [[0.3, 0.7], [0.3, 0.7], [0.3, 0.7]])
    with caplog.at_level(logging.INFO, logger="railway_defect.data.label_studio"):
        output = export_tasks(store, tmp_path / "t.json", document_root=tmp_path / "photos")
    tasks = json.loads(output.read_text(encoding="utf-8"))
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=line%201/a.png"
    assert [_resolve(t["data"]["image"], tmp_path / "photos") for t in tasks] == [str(p) for p in photos]
    # Label Studio allows no storage at its document root: one per folder under it is needed
    summary = caplog.records[-1].getMessage()
    assert f"DOCUMENT_ROOT={tmp_path / 'photos'}," in summary
    assert f"at {tmp_path / 'photos' / 'line 1'}, {tmp_path / 'photos' / 'line 2'} (" in summary
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "directly" in r.getMessage()]
    caplog.clear()
    with pytest.raises(UserError, match=r"does not hold 1 photo\(s\) of the queue \(e.g. .*d é.png\)"):
        export_tasks(store, tmp_path / "t.json", document_root=tmp_path / "photos" / "line 1")
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8")) == tasks  # left as it was
    store, _ = _store(tmp_path / "flat", [[0.3, 0.7], [0.3, 0.7]])  # both photos in photos/line 1
    with caplog.at_level(logging.WARNING, logger="railway_defect.data.label_studio"):
        export_tasks(store, tmp_path / "t.json", document_root=tmp_path / "flat" / "photos" / "line 1")
    assert any("directly in document_root" in r.getMessage() for r in caplog.records)


def test_a_queue_of_video_frames_only_is_refused(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, [])
    with pytest.raises(UserError, match="no photos"):
        export_tasks(store, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.xml").exists()


def _annotation(
    annotation_id: int, label: str | None, updated: str, cancelled: bool = False, task: int = 1
) -> dict[str, Any]:
    """One annotation as Label Studio exports it (export.md, "Label Studio JSON format of annotated
    tasks")."""
    result = (
        []
        if label is None
        else [
            {
                "id": f"r{annotation_id}",
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "origin": "manual",
                "value": {"choices": [label]},
            }
        ]
    )
    return {
        "id": annotation_id,
        "completed_by": 1,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2024-05-02T09:00:00.000000Z",
        "updated_at": updated,
        "draft_created_at": None,
        "lead_time": 3.2,
        "prediction": {},
        "result_count": 0,
        "unique_id": f"u-{annotation_id}",
        "import_id": None,
        "last_action": None,
        "task": task,
        "project": 7,
        "updated_by": 1,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def _task(task_id: int, image: str, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": task_id,
        "annotations": annotations,
        "file_upload": None,
        "drafts": [],
        "predictions": [],
        "data": {"image": image},
        "meta": {},
        "created_at": "2024-05-01T10:00:00.000000Z",
        "updated_at": "2024-05-02T11:00:00.000000Z",
        "inner_id": task_id,
        "total_annotations": len(annotations),
        "cancelled_annotations": sum(a["was_cancelled"] for a in annotations),
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 7,
        "updated_by": 1,
        "comment_authors": [],
    }


def test_a_label_studio_export_reads_back_the_latest_choice_of_each_local_photo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "ls-root"
    exported = [
        # two annotations: the later one wins, though it is listed first
        _task(
            1,
            "/data/local-files/?d=photos/a%20b.jpg",
            [
                _annotation(11, "Non defective", "2024-05-02T11:00:00.000000Z"),
                _annotation(10, "Defective", "2024-05-02T10:00:00.000000Z"),
            ],
        ),
        # the newest annotation was cancelled (skipped): the one before it stands
        _task(
            2,
            "/data/local-files/?d=photos/sub/c.jpg",
            [
                _annotation(20, "Non defective", "2024-05-02T10:00:00.000000Z"),
                _annotation(21, "Defective", "2024-05-02T12:00:00.000000Z", cancelled=True),
            ],
        ),
        _task(3, "/data/local-files/?d=photos/d.jpg", []),  # not annotated yet
        _task(4, "/data/local-files/?d=photos/e.jpg", [_annotation(40, None, "2024-05-02T10:00:00Z", True)]),
        _task(5, "/data/upload/7/3f2a9c1e-f.jpg", [_annotation(50, "Defective", "2024-05-02T10:00:00Z")]),
        _task(6, "https://example.com/g.jpg", [_annotation(60, "Defective", "2024-05-02T10:00:00Z")]),
        _task(7, (tmp_path / "h.jpg").as_uri(), [_annotation(70, "Defective", "2024-05-02T10:00:00Z")]),
        _task(8, str(tmp_path / "i.jpg"), [_annotation(80, "Non defective", "2024-05-02T10:00:00Z")]),
    ]
    _validate(exported, EXPORT_SCHEMA)
    path = tmp_path / "project-7-at-2024-05-02-11-00.json"
    path.write_text(json.dumps(exported), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="railway_defect.data.label_studio"):
        pairs = read_annotations(path, root)
    assert pairs == [
        (str(root / "photos" / "a b.jpg"), "Non defective"),
        (str(root / "photos" / "sub" / "c.jpg"), "Non defective"),
        (str(tmp_path / "h.jpg"), "Defective"),
        (str(tmp_path / "i.jpg"), "Non defective"),
    ]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("2 task(s)") and "no annotation" in m for m in warnings)
    assert any(m.startswith("2 labelled task(s)") and "Local files storage" in m for m in warnings)


def _as_label_studio_exports_it(
    tasks: list[dict[str, Any]], new_labels: dict[int, str]
) -> list[dict[str, Any]]:
    """What Label Studio's JSON export holds after importing `tasks`: ids given, the imported
    annotations kept, a reviewer's annotation added to the tasks of `new_labels` (by position)."""
    exported = []
    for task_id, task in enumerate(tasks, start=1):
        annotations = [
            {
                **_annotation(100 * task_id + n, None, "2024-05-02T09:30:00Z", task=task_id),
                "result": a["result"],
            }
            for n, a in enumerate(task.get("annotations", []))
        ]
        if task["data"]["position"] in new_labels:
            label = new_labels[task["data"]["position"]]
            annotations.append(_annotation(100 * task_id + 9, label, "2024-05-02T10:30:00Z", task=task_id))
        exported.append({**_task(task_id, task["data"]["image"], annotations), "data": task["data"]})
    return exported


def test_the_round_trip_gives_the_stores_labels_and_label_studios(tmp_path: Path) -> None:
    store, photos = _store(tmp_path, [[0.2, 0.8], [0.7, 0.3], None, [0.5, 0.5]])
    store.record(store.item(0), "Non defective", "ann", "m", {})
    store.record(store.item(3), "Defective", "bob", "m", {})
    tasks = json.loads(export_tasks(store, tmp_path / "tasks.json").read_text(encoding="utf-8"))
    # in Label Studio a reviewer labels photo 1, overrules bob on photo 3 and leaves photo 2
    exported = _as_label_studio_exports_it(tasks, {1: "Defective", 3: "Non defective"})
    _validate(exported, EXPORT_SCHEMA)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(exported), encoding="utf-8")
    labels, _ = reviewed_labels(store)
    assert labels == {str(photos[0]): "Non defective", str(photos[3]): "Defective"}
    # the tasks name the photos' absolute paths: any root (or none) reads them back
    assert (
        read_annotations(path, tmp_path / "elsewhere")
        == read_annotations(path)
        == [
            (str(photos[0]), "Non defective"),
            (str(photos[1]), "Defective"),
            (str(photos[3]), "Non defective"),
        ]
    )
    # without data.path (tasks Label Studio's own storage sync made), the document root resolves them
    for task in exported:
        del task["data"]["path"]
    path.write_text(json.dumps(exported), encoding="utf-8")
    assert [p for p, _ in read_annotations(path, tmp_path)] == [str(photos[i]) for i in (0, 1, 3)]


def test_a_json_min_export_reads_back_too(tmp_path: Path) -> None:
    records = [
        {
            "image": "/data/local-files/?d=p/a.jpg",
            "id": 1,
            "label": "Defective",
            "annotator": 1,
            "annotation_id": 1,
            "created_at": "2024-05-02T10:00:00Z",
            "updated_at": "2024-05-02T10:00:00Z",
            "lead_time": 2.0,
        },
        {
            "image": "/data/local-files/?d=p/b.jpg",
            "id": 2,
            "annotator": 1,
            "annotation_id": 2,
            "created_at": "2024-05-02T10:00:00Z",
            "updated_at": "2024-05-02T10:00:00Z",
            "lead_time": 2.0,
        },
        {
            "image": "/data/local-files/?d=p/a.jpg",
            "id": 1,
            "label": {"choices": ["Non defective"]},
            "annotator": 2,
            "annotation_id": 3,
            "created_at": "2024-05-02T11:00:00Z",
            "updated_at": "2024-05-02T11:00:00Z",
            "lead_time": 2.0,
        },
    ]
    path = tmp_path / "min.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert read_annotations(path, tmp_path) == [(str(tmp_path / "p" / "a.jpg"), "Non defective")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,label\n/p/a.jpg,Defective\n", "is not JSON"),
        ('{"data": {"image": "/p/a.jpg"}, "annotations": []}', "is not a list of Label Studio tasks"),
        ('["/p/a.jpg"]', "is not a list of Label Studio tasks"),
        ('[{"id": 4, "path": "/p/a.jpg", "label": "Defective"}]', "task 4 has no `data` object"),
        ('[{"id": 5, "data": {"image": "/p/a.jpg"}, "annotations": {"result": []}}]', "task 5 has no"),
        (
            json.dumps([_task(6, "/p/a.jpg", [_annotation(1, "Defective", "2024-05-02T10:00:00Z")])]).replace(
                '["Defective"]', '["Defective", "Non defective"]'
            ),
            "task 6 is labelled .* a photo takes one label",
        ),
        (
            json.dumps(
                [_task(7, "/data/local-files/?d=p/a.jpg", [_annotation(1, "Defective", "2024-05-02T10:00Z")])]
            ),
            "task 7 names its photo by a Label Studio local-files URL",
        ),
    ],
)
def test_a_file_that_is_not_a_label_studio_json_export_is_one_line(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "export.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as error:
        read_annotations(path)
    assert "\n" not in str(error.value)
    if "labelled" not in message and "local-files" not in message:
        assert 'as "JSON"' in str(error.value)


def test_triage_exports_label_studio_tasks(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, [[0.2, 0.8]])
    assert "label_studio" in EXPORTS
    assert export(store, "label_studio", tmp_path / "ls" / "tasks.json") == tmp_path / "ls" / "tasks.json"
    _validate(json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8")), IMPORT_SCHEMA)
    assert (tmp_path / "ls" / "tasks.xml").is_file()
    with pytest.raises(UserError, match="manifest, label_studio"):
        export(store, "coco", tmp_path / "x.json")
