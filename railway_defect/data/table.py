"""Samples as compact columns, for data sets of millions of files (data.storage=stream): paths in
one byte string, labels as integer codes, groups as codes, content digests as fixed-width bytes.
A few bytes per image plus its path, instead of ~1 KB of Path, Sample and str objects; a Sample
is built only when one is asked for."""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from railway_defect.data.discovery import Sample

# a group code that means "the sample's own path" (the default group of a file)
OWN_PATH = -1


class StringColumn(Sequence[str]):
    """Strings stored end to end in one byte string with their end offsets (1 byte per character
    plus 8 per string; file-system encoding, so any path round-trips)."""

    def __init__(self, strings: Iterable[str] = ()):
        data, ends = bytearray(), array("q")
        for s in strings:
            data += os.fsencode(s)
            ends.append(len(data))
        self.data, self.ends = bytes(data), np.frombuffer(ends, dtype=np.int64).copy()

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        start = int(self.ends[i - 1]) if i else 0
        return os.fsdecode(self.data[start : int(self.ends[i])])

    def take(self, indices: Iterable[int]) -> StringColumn:
        """The strings at `indices`, in that order."""
        return StringColumn(self[int(i)] for i in indices)


class SampleTable(Sequence[Sample]):
    """A split's samples as columns; indexing and iteration give Sample objects, one at a time."""

    def __init__(
        self,
        paths: StringColumn,
        codes: np.ndarray,
        labels: Sequence[str],
        groups: np.ndarray,
        group_names: StringColumn,
        digests: np.ndarray | None = None,
    ):
        self.paths, self.codes, self.labels = paths, codes, list(labels)
        self.groups, self.group_names, self.digests = groups, group_names, digests

    @classmethod
    def from_samples(cls, samples: Iterable[Sample], labels: Sequence[str]) -> SampleTable:
        """The table of `samples`; `labels` lists every label they use (codes index it)."""
        code_of = {label: i for i, label in enumerate(labels)}
        group_code: dict[str, int] = {}
        codes, groups = array("h"), array("l")
        names: list[str] = []

        def path_strings() -> Iterator[str]:
            for s in samples:
                path = str(s.path)
                codes.append(code_of[s.label])
                if s.group == path:
                    groups.append(OWN_PATH)
                else:
                    groups.append(group_code.setdefault(s.group, len(group_code)))
                    if len(names) < len(group_code):
                        names.append(s.group)
                yield path

        paths = StringColumn(path_strings())
        return cls(
            paths,
            np.array(codes, dtype=np.int16),
            labels,
            np.array(groups, dtype=np.int64),
            StringColumn(names),
        )

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...
    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path = self.paths[i]
        group = int(self.groups[i])
        return Sample(
            Path(path), self.labels[self.codes[i]], path if group == OWN_PATH else self.group_names[group]
        )

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def take(self, indices: Sequence[int] | np.ndarray) -> SampleTable:
        """The rows at `indices`, in that order (group names are kept whole)."""
        indices = np.asarray(indices, dtype=np.int64)
        digests = None if self.digests is None else self.digests[indices]
        return SampleTable(
            self.paths.take(indices),
            self.codes[indices],
            self.labels,
            self.groups[indices],
            self.group_names,
            digests,
        )

    def label_counts(self) -> Counter[str]:
        """How many samples carry each label (labels with none are left out)."""
        counts = np.bincount(self.codes, minlength=len(self.labels)) if len(self) else []
        return Counter({self.labels[i]: int(n) for i, n in enumerate(counts) if n})


def label_counts(samples: Sequence[Sample]) -> Counter[str]:
    """Samples per label, of a list of Samples or a SampleTable (without building its Samples)."""
    if isinstance(samples, SampleTable):
        return samples.label_counts()
    return Counter(s.label for s in samples)


def label_codes(samples: Sequence[Sample], classes: Sequence[str]) -> np.ndarray:
    """Each sample's index in `classes`."""
    if isinstance(samples, SampleTable):
        remap = np.array([classes.index(label) if label in classes else -1 for label in samples.labels])
        return remap[samples.codes] if len(samples) else np.zeros(0, dtype=np.int64)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return np.array([class_to_idx[s.label] for s in samples], dtype=np.int64)


def to_tables(splits: dict[str, Any]) -> None:
    """Each split's list of Samples replaced by its table, one split at a time (in place: the
    Samples of a split are freed before the next one is converted)."""
    labels = sorted({s.label for samples in splits.values() for s in samples})
    for split in list(splits):
        splits[split] = SampleTable.from_samples(splits[split], labels)
