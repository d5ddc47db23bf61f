"""Draft findings: one inference's most relevant units (r_k, Eq. 2) and a concept dictionary -> a short text.

    "T7: fracture suspected (p = 0.98). Evidence: superior endplate (units 87, 71),
    fracture-deformity zone (unit 103); also uses the disc above (unit 4)."

The dictionary maps a unit to a concept label, or to None when the unit has none: on the
phantom, :func:`concept_dictionary` takes the label measured by the alignment (detectors only);
on real data, :func:`student_dictionary` reads the student's labels from ``concepts.json``
(written by the explorer of notebook 05). "Evidence" are the fracture signs
(:data:`EVIDENCE`); every other labelled concept is context ("also uses"); units without a
significant concept are named as such, never given a label they did not earn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from vfcore.errors import CorruptFileError

from vfcore.dissect.ranking import top_units

#: Concepts reported as evidence for a fracture (the rest: context).
EVIDENCE = ("fracture-deformity zone", "sclerotic condensation band", "superior endplate",
            "inferior endplate", "anterior cortex", "posterior wall / middle column",
            "vertebral body", "trabecular core", "lateral cortex")


def concept_dictionary(table: pd.DataFrame) -> dict[int, str | None]:
    """unit -> its measured concept where it is a detector, else None (a
    :func:`~vfcore.analysis.alignment.unit_table`)."""
    return {int(r.unit): (str(r.concept) if bool(r.detector) else None) for r in table.itertuples()}


def student_dictionary(concepts: str | Path | Mapping) -> dict[int, str | None]:
    """unit -> the student's label from ``concepts.json`` (``{"units": {"17": {"label": ...}}}``,
    the explorer's format; a path or the loaded dict); an empty label counts as none."""
    if not isinstance(concepts, Mapping):
        path = Path(concepts)
        try:
            concepts = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CorruptFileError(path, f"unreadable concept dictionary ({e})") from None
    units = concepts.get("units", {}) if isinstance(concepts, Mapping) else {}
    out = {}
    for k, v in units.items():
        label = str(v.get("label", "") if isinstance(v, Mapping) else v).strip()
        out[int(k)] = label or None
    return out


def _unit_list(units: Sequence[int]) -> str:
    return ("unit " if len(units) == 1 else "units ") + ", ".join(str(u) for u in units)


def _grouped(pairs: Iterable[tuple[str, int]]) -> str:
    groups: dict[str, list[int]] = {}
    for concept, unit in pairs:
        groups.setdefault(concept, []).append(unit)
    return ", ".join(f"{c} ({_unit_list(us)})" for c, us in groups.items())


def off_target(units: Sequence[int], unit_masks, concepts: Mapping[str, np.ndarray],
               dictionary: Mapping[int, str | None]) -> list[int]:
    """The ``units`` whose concept (``dictionary``; measured over the dissected set) is one of this
    vertebra's ``concepts`` {name: bool [patch]} but whose mask M_k [patch] here touches none of it:
    detectors that fire elsewhere on this vertebra (:func:`draft_findings`' ``off_target``).
    ``unit_masks``: the units' masks in the order of ``units``."""
    return [int(u) for u, m in zip(units, unit_masks)
            if dictionary.get(int(u)) in concepts and not (np.asarray(m) & concepts[dictionary[int(u)]]).any()]


def draft_findings(level: str, probability: float, r: np.ndarray, dictionary: Mapping[int, str | None], *,
                   n_units: int = 5, threshold: float = 0.5,
                   evidence: Sequence[str] = EVIDENCE, none: str = "no significant concept",
                   off_target: Iterable[int] = ()) -> str:
    """The findings text for one inference.

    ``level`` (e.g. ``"T7"``), ``probability`` P(fracture), ``r`` [K] r_k of this sample (Eq. 2;
    ``Dissection.r[i]``), ``dictionary`` unit -> concept or None. The ``n_units`` most relevant
    units that fire (r_k > 0), in order of r_k, are grouped by concept: fracture signs as
    "Evidence", other concepts as "also uses", the rest as ``none`` ("no significant concept" for
    a measured dictionary; the explorer says "no label of yours yet" for the student's).
    ``off_target``: units whose mask on *this* vertebra does not touch their concept (a detector
    is measured over the dissected set): named as detectors of it that fire elsewhere here, not
    as evidence.
    """
    suspected = probability >= threshold
    head = f"{level}: {'fracture suspected' if suspected else 'no fracture suspected'} (p = {probability:.2f})."
    r = np.asarray(r, dtype=np.float64)
    units = [int(u) for u in top_units(r, n_units) if r[u] > 0]
    if not units:
        return head + " No unit of the dissected layer fires on this vertebra."
    off = {int(u) for u in off_target}
    labelled = [(dictionary.get(u), u) for u in units]
    ev = [(c, u) for c, u in labelled if c is not None and c in evidence and u not in off]
    ctx = [(c, u) for c, u in labelled if c is not None and c not in evidence and u not in off]
    away = [(c, u) for c, u in labelled if c is not None and u in off]
    unlabelled = [u for c, u in labelled if c is None]
    parts = []
    if ev:
        parts.append(f"Evidence: {_grouped(ev)}")
    if ctx:
        parts.append(("also uses " if ev else "Uses ") + _grouped(ctx))
    if away:
        parts.append(("d" if parts else "D") + f"etectors whose masks miss their concept on this vertebra: "
                     f"{_grouped(away)}")
    text = head + (" " + "; ".join(parts) + "." if parts else "")
    if unlabelled:
        verb = "has" if len(unlabelled) == 1 else "have"
        text += f" {_unit_list(unlabelled).capitalize()} {verb} {none}."
    return text
