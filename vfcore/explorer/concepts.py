"""The student's concept dictionary (notebook 05): unit -> label and note, saved in the run folder."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vfcore.io import write_json
from vfcore.lock import writer_lock
from vfcore.run import RunFolder


@dataclass
class ConceptBook:
    """The student's concept dictionary: unit -> {"label", "note"} for one checkpoint.

    Stored in the run folder (``RunFolder(run).concepts``): ``{"checkpoint_sha256": ..., "layer": ...,
    "units": {"17": {"label": "endplate", "note": "..."}, ...}}``. Edits live in memory
    until :meth:`save` (atomic); an unreadable file is never overwritten silently: it is
    kept beside it with the suffix ``.unreadable`` before the first save.
    """

    path: Path
    units: dict[int, dict[str, str]] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    layer: str | None = None
    problem: str | None = None  # why the file on disk could not be used (shown in the status)
    dirty: bool = False

    @classmethod
    def load(cls, path: str | Path, checkpoint_sha256: str | None = None, layer: str | None = None) -> "ConceptBook":
        path = Path(path)
        book = cls(path=path, checkpoint_sha256=checkpoint_sha256, layer=layer)
        if not path.exists():
            return book
        try:
            doc = json.loads(path.read_text())
            units = {int(k): {"label": str(v.get("label", "")), "note": str(v.get("note", ""))}
                     for k, v in doc.get("units", {}).items()}
        except (ValueError, AttributeError, TypeError) as exc:
            book.problem = f"{path}: unreadable concept dictionary ({exc}); it is kept and not overwritten"
            return book
        book.units = units
        saved_for = doc.get("checkpoint_sha256")
        if checkpoint_sha256 and saved_for and saved_for != checkpoint_sha256:
            book.problem = (f"{path}: these labels were written for another checkpoint "
                            f"({saved_for[:12]}...); unit numbers may mean other concepts now")
        return book

    def get(self, unit: int) -> dict[str, str]:
        return self.units.get(int(unit), {"label": "", "note": ""})

    def set(self, unit: int, label: str | None = None, note: str | None = None) -> None:
        entry = dict(self.get(unit))
        if label is not None:
            entry["label"] = label
        if note is not None:
            entry["note"] = note
        if entry != self.get(unit):
            if entry["label"] or entry["note"]:
                self.units[int(unit)] = entry
            else:
                self.units.pop(int(unit), None)
            self.dirty = True

    def save(self) -> Path:
        """Write atomically; an unreadable previous file is moved aside first."""
        if self.problem and "unreadable" in self.problem and self.path.exists():
            aside = self.path.with_name(self.path.name + ".unreadable")
            self.path.replace(aside)
            self.problem = None
        doc = {
            "checkpoint_sha256": self.checkpoint_sha256,
            "layer": self.layer,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "units": {str(k): v for k, v in sorted(self.units.items())},
        }
        with writer_lock(self.path.parent, "the concept explorer (concepts.json)"):
            write_json(self.path, doc)
        self.dirty = False
        return self.path


def load_concepts(run_dir: str | Path) -> dict[int, dict[str, str]]:
    """The concept labels saved with the explorer (``RunFolder(run_dir).concepts``): unit -> {label, note}."""
    return ConceptBook.load(RunFolder(run_dir).concepts).units
