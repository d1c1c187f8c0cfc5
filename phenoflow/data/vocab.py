"""Label vocabularies: an ordered list of names <-> contiguous integer indices.

A run has one vocabulary per label group (``perturbation``, ``experiment``, ``cell_type``). They are built once
over all splits when shards are written, stored in the shard manifest and copied into the run folder, so the
integer a model sees for a name never changes between training, resume and evaluation.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONTROL = "control"  # the name of the control (untreated / non-targeting) perturbation
LABEL_GROUPS = ("perturbation", "experiment", "cell_type")


class UnknownLabelError(ValueError):
    """A label that is not in its vocabulary; the message names the label and the vocabulary."""


class Vocab:
    """An immutable name <-> index mapping. ``Vocab(["control", "gene_01"]).index("gene_01") == 1``."""

    def __init__(self, names: Iterable[str], name: str = "labels"):
        self._names = [str(n) for n in names]
        self.name = name
        self._index = {n: i for i, n in enumerate(self._names)}
        if len(self._index) != len(self._names):
            dup = sorted({n for n in self._names if self._names.count(n) > 1})
            raise ValueError(f"vocabulary {name!r} has duplicate names: {dup[:10]}")

    @classmethod
    def build(cls, labels: Iterable[str], name: str = "labels", first: str | None = None) -> Vocab:
        """Sorted unique labels; ``first`` (e.g. "control"), when present, is placed at index 0."""
        uniq = sorted({str(x) for x in labels})
        if first is not None and first in uniq:
            uniq.remove(first)
            uniq.insert(0, first)
        return cls(uniq, name=name)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def index(self, label: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            shown = ", ".join(self._names[:8]) + (", ..." if len(self._names) > 8 else "")
            raise UnknownLabelError(
                f"unknown {self.name} label {label!r}: not in the {self.name} vocabulary "
                f"({len(self._names)} names: {shown})") from None

    def indices(self, labels: Iterable[object]) -> list[int]:
        """Index of each label, -1 for one that is not a name of this vocabulary (or not a string)."""
        get = self._index.get
        return [get(x, -1) if isinstance(x, str) else -1 for x in labels]

    def __contains__(self, label: object) -> bool:
        return label in self._index

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> str:
        return self._names[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._names == other._names

    def __repr__(self) -> str:
        return f"Vocab({self.name!r}, {len(self)} names)"

    # -- serialisation: {"name": ..., "names": [...]} --------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "names": list(self._names)}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | list[str]) -> Vocab:
        if isinstance(obj, list):
            return cls(obj)
        if not isinstance(obj, dict) or not isinstance(obj.get("names"), list):
            raise ValueError(f"not a vocabulary JSON object (expected {{'name', 'names'}}): {str(obj)[:200]}")  # noqa: TRY004
        return cls(obj["names"], name=obj.get("name", "labels"))

    def save(self, path: str | Path) -> None:
        """Atomic write: a temporary file, then rename."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e


def save_vocabs(vocabs: dict[str, Vocab], folder: str | Path) -> None:
    """Write ``<folder>/vocab_<group>.json`` for each group (used to copy them into a run folder)."""
    for group, v in vocabs.items():
        v.save(Path(folder) / f"vocab_{group}.json")


def load_vocabs(folder: str | Path) -> dict[str, Vocab]:
    return {g: Vocab.load(Path(folder) / f"vocab_{g}.json") for g in LABEL_GROUPS
            if (Path(folder) / f"vocab_{g}.json").exists()}
