"""Shortcut audit: can how a photo was stored predict its label?

A model learns whatever separates the classes. When defect photos are camera originals and sound-track
photos are 224x224 thumbnails (as in the sample data), image size alone scores as well as a trained
model on Validation, and a model can learn the storage form instead of the rail, bolt and clip. This
module reads properties that say nothing about the track (size, format, compression, camera, folder,
file name) from the file headers only (no pixels are decoded), and measures with group-aware
cross-validation of a small scikit-learn model how well each one alone, and all together, predict
the label. A property scoring >= SHORTCUT_THRESHOLD is reported as a shortcut with what to do.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.compose import ColumnTransformer
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder
from sklearn.tree import DecisionTreeClassifier

from railway_defect.data.discovery import MANIFEST_NAME, Sample, _manifest_path, _manifest_rows

log = logging.getLogger(__name__)

SHORTCUT_THRESHOLD = 0.70
MAX_FOLDS = 5
RANDOM_STATE = 0
# IJG (libjpeg) standard luminance quantization table; quality q scales it (see _IJG_TABLES)
_IJG_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ]
).ravel()
# row q-1: the sorted luminance table libjpeg writes at quality q (scale 5000/q below 50, 200-2q above)
_IJG_TABLES = np.array(
    [
        np.sort(np.clip((_IJG_LUMINANCE * (5000 // q if q < 50 else 200 - 2 * q) + 50) // 100, 1, 255))
        for q in range(1, 101)
    ]
)
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Property:
    description: str  # how a warning names it: "<description> alone predicts the label"
    numeric: tuple[str, ...] = ()  # columns of the feature table it uses
    categorical: tuple[str, ...] = ()
    shown: str | None = None  # the column that shows how the classes differ, if not the first one


PROPERTIES: dict[str, Property] = {
    "image_size": Property("image size (width x height)", numeric=("width", "height")),
    "width": Property("image width", numeric=("width",)),
    "height": Property("image height", numeric=("height",)),
    "aspect_ratio": Property("aspect ratio", numeric=("aspect_ratio",)),
    "megapixels": Property("megapixels", numeric=("megapixels",)),
    "file_format": Property("file format", categorical=("file_format",)),
    "bytes_per_pixel": Property(
        "bytes per pixel (compression)", numeric=("bytes_per_pixel_octave",), shown="bytes_per_pixel"
    ),
    "jpeg_quality": Property("JPEG quality", numeric=("jpeg_quality",)),
    "camera": Property("EXIF camera make/model", categorical=("camera",)),
    "colour_mode": Property("colour mode", categorical=("colour_mode",)),
    "source": Property("sub-folder/source", categorical=("source",)),
    "file_name_pattern": Property("file-name pattern", categorical=("file_name_pattern",)),
}
NUMERIC = ("width", "height", "aspect_ratio", "megapixels", "bytes_per_pixel_octave", "jpeg_quality")
CATEGORICAL = ("file_format", "camera", "colour_mode", "source", "file_name_pattern")
ADVICE = (
    "a model can learn how photos were stored instead of the track. Use data.harmonize=thumbnail and "
    "augmentation=nuisance, and judge models by out-of-fold metrics per stratum (experiment=cv)."
)
# the same, when the storage form is already harmonized: what is left to do
ADVICE_HARMONIZED = (
    "data.harmonize={mode} gives the model one storage form, but content and scale still differ "
    "between the strata: judge models by out-of-fold metrics per stratum (experiment=cv)."
)


def jpeg_quality(quantization: dict[int, Sequence[int]] | None) -> float | None:
    """The IJG (libjpeg, PIL, most cameras' software) quality 1-100 whose luminance table is closest to
    the file's; None if not a JPEG. Sorted tables are compared, so zigzag or natural order do not matter."""
    table = (quantization or {}).get(0)
    if table is None or len(table) != 64:
        return None
    distance = np.abs(_IJG_TABLES - np.sort(np.asarray(table, dtype=int))).sum(axis=1)
    return float(np.argmin(distance) + 1)


def _camera(image: Image.Image) -> str:
    """EXIF Make + Model, read from the header (PNG's getexif() would decode the image: use its info)."""
    if image.format == "PNG":
        if "exif" not in image.info:
            return "none"
        exif = Image.Exif()
        exif.load(image.info["exif"])
    else:
        exif = image.getexif()
    camera = " ".join(str(exif.get(tag, "")).strip("\x00 ") for tag in (0x010F, 0x0110)).strip()
    return camera or "none"


def _folder(path: Path, label: str, root: Path | None) -> str:
    """The folder below the class folder (`Train/Defective/cam2/x.jpg` -> `cam2`); without a class folder
    in the path, the folder relative to the root."""
    parents = path.parent.parts
    if label in parents:
        below = parents[len(parents) - parents[::-1].index(label) :]
        return "/".join(below) or "."
    if root is not None and path.parent.is_relative_to(root):
        return path.parent.relative_to(root).as_posix()
    return path.parent.name


def manifest_sources(root: Path | None) -> dict[str, str]:
    """Absolute path -> the `source` column of the root's manifest.csv ({} without one)."""
    manifest = root / MANIFEST_NAME if root is not None else None
    if manifest is None or not manifest.is_file():
        return {}
    try:
        return {
            os.path.abspath(_manifest_path(root, row["path"], str(manifest))): row["source"]
            for row in _manifest_rows(manifest)
            if row.get("source") and row.get("path")
        }
    except Exception:  # discovery reports a broken manifest; the audit then uses folders
        return {}


def read_properties(path: Path, label: str, root: Path | None = None, source: str | None = None) -> dict:
    """The nuisance properties of one file, from os.stat and the image header (no pixels decoded)."""
    props: dict[str, Any] = {
        "source": source if source is not None else _folder(Path(path), label, root),
        "file_name_pattern": _DIGITS.sub("#", Path(path).stem) + Path(path).suffix.lower(),
    }
    try:
        size = os.stat(path).st_size
        with Image.open(path) as image:
            width, height = image.size
            props |= {
                "file_format": image.format or "unknown",
                "colour_mode": image.mode,
                "jpeg_quality": jpeg_quality(getattr(image, "quantization", None)),
                "camera": _camera(image),
            }
    except Exception as e:  # unreadable headers are an unknown, not an error of the audit
        log.debug("Shortcut audit: cannot read the header of %s: %s", path, e)
        return props | {"file_format": "unreadable", "colour_mode": "unknown", "camera": "unknown"}
    pixels = max(1, width * height)
    return props | {
        "width": width,
        "height": height,
        "aspect_ratio": width / max(1, height),
        "megapixels": pixels / 1e6,
        "bytes_per_pixel": size / pixels,
        # what the model sees, rounded down to a power of two: image content moves the size of a file by
        # some percent (a flat area compresses better), a change of storage (re-encoding at another
        # quality or size, another format) by a factor. Unrounded, a tree finds the content.
        "bytes_per_pixel_octave": float(np.floor(np.log2(max(size, 1) / pixels))),
    }


def _model(numeric: Sequence[str], categorical: Sequence[str]) -> Pipeline | DecisionTreeClassifier:
    """A shallow tree with balanced class weights: it finds the few thresholds or categories that
    separate the classes, which is what a shortcut is. Missing values (jpeg_quality of a PNG) are a
    branch of their own; categories are one-hot encoded, those seen once pooled as infrequent."""
    tree = DecisionTreeClassifier(
        max_depth=3, min_samples_leaf=2, class_weight="balanced", random_state=RANDOM_STATE
    )
    if not categorical:
        return tree
    one_hot = OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=2)
    encode = ColumnTransformer(
        [("numeric", "passthrough", list(numeric)), ("categorical", one_hot, list(categorical))],
        sparse_threshold=0.0,
    )
    return Pipeline([("encode", encode), ("tree", tree)])


def _number_of_folds(labels: Sequence[str], groups: Sequence[str]) -> int:
    """As many folds (up to MAX_FOLDS) as the class with the fewest photo groups allows."""
    groups_per_class = Counter(
        label for label, _ in {(label, g) for label, g in zip(labels, groups, strict=True)}
    )
    return min(MAX_FOLDS, *groups_per_class.values()) if len(groups_per_class) > 1 else 0


def _contrast(values: pd.Series, labels: np.ndarray) -> str:
    """How the property differs between the classes: the share of its most common value in each class
    (`224x224: Defective 24 of 76, Non defective 27 of 31`), or the medians of a continuous one."""
    present = values.notna().to_numpy()
    classes = sorted(set(labels.tolist()))
    counts = Counter(values[present].tolist())
    if not counts:
        return "not available"
    value, count = counts.most_common(1)[0]
    if count >= 0.2 * present.sum() or values.dtype.kind != "f":
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        shares = [
            f"{c} {int(((values == value).to_numpy() & (labels == c)).sum())} of {(labels == c).sum()}"
            for c in classes
        ]
        return f"{shown}: {', '.join(shares)}"
    medians = [f"{c} {values[present & (labels == c)].median():.3g}" for c in classes]
    return f"median: {', '.join(medians)}"


def property_table(samples: Sequence[Sample], root: Path | None) -> tuple[pd.DataFrame, bool]:
    """One row of nuisance properties per sample; and whether sources came from a manifest."""
    sources = manifest_sources(root)
    rows = [
        read_properties(s.path, s.label, root, sources.get(os.path.abspath(s.path)) if sources else None)
        for s in samples
    ]
    table = pd.DataFrame(rows, columns=[*NUMERIC, "bytes_per_pixel", *CATEGORICAL]).astype(
        {**dict.fromkeys([*NUMERIC, "bytes_per_pixel"], float), **dict.fromkeys(CATEGORICAL, object)}
    )
    table[list(CATEGORICAL)] = table[list(CATEGORICAL)].fillna("unknown").astype(str)
    return table, bool(sources)


def _out_of_fold_score(
    table: pd.DataFrame, labels: np.ndarray, splits: list, numeric: Sequence[str], categorical: Sequence[str]
) -> dict[str, Any]:
    """Balanced accuracy of the small model on `numeric` + `categorical`, predicted out of fold."""
    columns = [*numeric, *categorical]
    entry: dict[str, Any] = {
        "balanced_accuracy": 1.0 / len(set(labels.tolist())),
        "folds": len(splits),
        "n": len(labels),
    }
    if all(table[c].nunique(dropna=False) <= 1 for c in columns):
        return entry | {"note": "the same for every image"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a fold without a rare category
        features = table[columns] if categorical else table[columns].to_numpy()
        predicted = cross_val_predict(_model(numeric, categorical), features, labels, cv=splits)
    return entry | {"balanced_accuracy": round(float(balanced_accuracy_score(labels, predicted)), 4)}


def _property_contrast(table: pd.DataFrame, labels: np.ndarray, prop: Property) -> Any:
    if prop.numeric == ("width", "height"):
        sizes = table["width"].map("{:.0f}".format) + "x" + table["height"].map("{:.0f}".format)
        return _contrast(sizes.where(table["width"].notna()), labels)
    return _contrast(table[prop.shown or (prop.numeric + prop.categorical)[0]], labels)


def audit_samples(samples: Sequence[Sample], root: Path | None = None) -> dict[str, Any]:
    """Out-of-fold balanced accuracy with which each nuisance property (and all together) predicts
    the label of `samples`, grouped by `Sample.group` so near-duplicates never sit on both sides."""
    start = time.perf_counter()
    table, from_manifest = property_table(samples, Path(root) if root is not None else None)
    labels = np.array([s.label for s in samples])
    groups = np.array([s.group for s in samples])
    folds = _number_of_folds(labels.tolist(), groups.tolist()) if len(samples) else 0
    result: dict[str, Any] = {
        "threshold": SHORTCUT_THRESHOLD,
        "metric": f"balanced accuracy over the {len(set(labels.tolist()))} classes (mean recall)",
        "chance": round(1.0 / max(len(set(labels.tolist())), 1), 4),
        "n": len(samples),
        "counts": dict(sorted(Counter(labels.tolist()).items())),
        "folds": folds,
        "model": "decision tree (depth 3, balanced class weights), StratifiedGroupKFold by photo group",
        "source": "manifest.csv source column" if from_manifest else "folder below the class folder",
        "note": None,
        "properties": {},
        "all_properties": None,
        "flagged": [],
        "seconds": None,
    }
    if folds < 2:
        result["note"] = (
            "skipped: needs at least 2 classes with 2 photo groups each for cross-validation "
            f"(classes: {result['counts']})"
        )
        return result
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=RANDOM_STATE)
    splits = list(splitter.split(table, labels, groups))  # the same folds for every property
    for name, prop in PROPERTIES.items():
        entry = _out_of_fold_score(table, labels, splits, prop.numeric, prop.categorical)
        result["properties"][name] = entry | {"contrast": _property_contrast(table, labels, prop)}
    result["all_properties"] = _out_of_fold_score(table, labels, splits, NUMERIC, CATEGORICAL)
    result["flagged"] = [
        name for name, e in result["properties"].items() if e["balanced_accuracy"] >= SHORTCUT_THRESHOLD
    ]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def shortcut_warnings(audit: dict[str, Any] | None, harmonize: str = "none") -> list[str]:
    """One line per property that predicts the label (and for the combination, when no single
    property does): what it means and what to do (given the storage form `harmonize` in use)."""
    if not audit or not audit.get("properties"):
        return []
    advice = ADVICE if harmonize == "none" else ADVICE_HARMONIZED.format(mode=harmonize)
    lines = []
    for name in audit["flagged"]:
        entry = audit["properties"][name]
        lines.append(
            f"Shortcut: {PROPERTIES[name].description} alone predicts the label (cross-validated balanced "
            f"accuracy {entry['balanced_accuracy']:.2f} >= {audit['threshold']:.2f}; {entry['contrast']}); "
            f"{advice}"
        )
    together = audit.get("all_properties") or {}
    if not lines and together.get("balanced_accuracy", 0.0) >= audit["threshold"]:
        lines.append(
            "Shortcut: the storage properties together (size, format, compression, camera, folder, file "
            f"name) predict the label (cross-validated balanced accuracy {together['balanced_accuracy']:.2f}"
            f" >= {audit['threshold']:.2f}); {advice}"
        )
    return lines


def audit_and_warn(
    samples: Sequence[Sample], root: Path | None = None, harmonize: str = "none"
) -> dict[str, Any]:
    """audit_samples, with each shortcut logged as one warning line."""
    audit = audit_samples(samples, root)
    for line in shortcut_warnings(audit, harmonize):
        log.warning("%s", line)
    if audit["note"]:
        log.info("Shortcut audit %s", audit["note"])
    return audit


def audit_summary(audit: dict[str, Any] | None) -> str:
    """One sentence: which properties predict the label, or the best score when none does."""
    if not audit:
        return "shortcut audit: not run"
    if audit.get("note") and not audit.get("properties"):
        return f"shortcut audit: {audit['note']}"
    if audit["flagged"]:
        found = ", ".join(
            f"{PROPERTIES[n].description} {audit['properties'][n]['balanced_accuracy']:.2f}"
            for n in audit["flagged"]
        )
        return (
            f"shortcut audit: **shortcut** - predicts the label alone (cross-validated balanced accuracy): "
            f"{found}; metrics on these images can reward how photos were stored"
        )
    best = max(audit["properties"], key=lambda n: audit["properties"][n]["balanced_accuracy"])
    return (
        f"shortcut audit: no storage property predicts the label (best: {PROPERTIES[best].description} "
        f"{audit['properties'][best]['balanced_accuracy']:.2f}, all together "
        f"{audit['all_properties']['balanced_accuracy']:.2f}, threshold {audit['threshold']:.2f})"
    )


def audit_markdown(audit: dict[str, Any] | None) -> str:
    """The audit as a Markdown table (TensorBoard's Text tab renders it)."""
    if not audit:
        return "Shortcut audit: not run."
    lines = [f"{audit_summary(audit)}.", ""]
    if not audit.get("properties"):
        return "\n".join(lines)
    lines += [
        f"{audit['n']} images, {audit['folds']}-fold group-aware cross-validation ({audit['model']}).",
        "",
        "| property | balanced accuracy | how the classes differ |",
        "| --- | --- | --- |",
    ]
    for name, entry in [*audit["properties"].items(), ("all_properties", audit["all_properties"])]:
        flag = " **shortcut**" if name in audit["flagged"] else ""
        label = PROPERTIES[name].description if name in PROPERTIES else "all together"
        lines.append(f"| {label} | {entry['balanced_accuracy']:.2f}{flag} | {entry.get('contrast', '')} |")
    return "\n".join(lines)
