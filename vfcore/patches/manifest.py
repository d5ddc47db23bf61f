"""The patch store's tables: the manifest (one row per vertebra), the patient-level split and
the grade table each vertebra's label comes from.

The manifest's columns: :data:`MANIFEST_COLUMNS`. ``fracture`` is 1/0 for a graded vertebra
and empty otherwise (``reason`` says why: no grade table, not graded, excluded).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from vfcore.checks import patient_overlap, regular_file, store_path
from vfcore.constants import DISSECT_SPLIT, SPLIT_TABLE
from vfcore.errors import CorruptFileError, DataValueError, FormatError, GradeTableError
from vfcore.verse import read_grades

MANIFEST_COLUMNS = ["case", "patient", "label", "level", "fracture", "grade", "shape", "split",
                    "ct_path", "mask_path", "concept_path", "source_sha256", "out_of_field",
                    "reason"]
SPLITS = ("train", "val", "test")
#: Largest grade table read (checked with ``os.stat`` first): the VerSe tables are kilobytes.
GRADE_TABLE_MAX_BYTES = 64 << 20
_RELEASE_TO_SPLIT = {"training": "train", "validation": "val", "test": "test"}


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def patient_splits(has_fracture: Mapping[str, bool], seed: int = 0,
                   fractions: Sequence[float] = (0.6, 0.2, 0.2),
                   fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Patient -> ``train``/``val``/``test``; no patient in two splits.

    ``fixed`` patients keep their split (VerSe's official release split). The others are
    shuffled with ``seed`` within two strata (has a fracture / has none) and cut by
    ``fractions``; a stratum of three or more patients puts at least one in val and test.
    """
    fixed = dict(fixed or {})
    out = {p: s for p, s in fixed.items() if p in has_fracture}
    rng = np.random.default_rng(seed)
    f_train, f_val, f_test = (float(x) / sum(fractions) for x in fractions)
    for stratum in (True, False):
        ps = sorted(p for p, fx in has_fracture.items() if bool(fx) == stratum and p not in out)
        ps = [ps[i] for i in rng.permutation(len(ps))]
        n = len(ps)
        n_test, n_val = round(n * f_test), round(n * f_val)
        if n >= 3:
            n_test, n_val = max(1, n_test) if f_test > 0 else 0, max(1, n_val) if f_val > 0 else 0
        n_test = min(n_test, n)
        n_val = min(n_val, n - n_test)
        for i, p in enumerate(ps):
            out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def read_split_table(root: Path) -> dict[str, str]:
    """Patient -> split pinned by the root's :data:`SPLIT_TABLE` (empty when there is none).

    Columns ``patient`` and ``split`` (one of :data:`SPLITS` or :data:`DISSECT_SPLIT`); a
    malformed table raises :class:`FormatError` naming it and the row.
    """
    path = Path(root) / SPLIT_TABLE
    if not path.exists():
        return {}
    regular_file(path, None, GRADE_TABLE_MAX_BYTES, "split table")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CorruptFileError(path, f"not a readable split table ({type(err).__name__})") from None
    if not {"patient", "split"} <= set(table.columns):
        raise FormatError(path, "a split table needs the columns patient and split")
    allowed = SPLITS + (DISSECT_SPLIT,)
    for i, (patient, split) in enumerate(zip(table["patient"], table["split"]), start=2):
        if not patient or split not in allowed:
            raise FormatError(path, f"row {i}: patient {patient!r}, split {split!r} (allowed: "
                                    f"{', '.join(allowed)})")
    return dict(zip(table["patient"], table["split"]))


def split_records(manifest: pd.DataFrame, records: Sequence[dict], seed: int,
                  fractions: Sequence[float], pinned: Mapping[str, str] | None = None
                  ) -> dict[str, str]:
    """Patient -> split for the extracted cases: ``pinned`` patients (the root's split table)
    keep theirs; VerSe's official split where the folder names tell it (a patient in two
    releases goes to the later stage: no leakage); the others :func:`patient_splits`
    stratified by "has a fractured vertebra"."""
    has_fx: dict[str, bool] = {}
    for patient, fx in zip(manifest["patient"], manifest["fracture"]):
        has_fx[patient] = has_fx.get(patient, False) or fx == 1
    for rec in records:  # patients whose every vertebra was skipped still get a split
        has_fx.setdefault(rec["patient"], False)
    fixed: dict[str, str] = {}
    for rec in records:
        official = _RELEASE_TO_SPLIT.get(rec.get("release_split") or "")
        if official:
            prev = fixed.get(rec["patient"])
            fixed[rec["patient"]] = max(filter(None, [prev, official]), key=SPLITS.index)
    fixed.update(pinned or {})
    return patient_splits(has_fx, seed, fractions, fixed)


# --------------------------------------------------------------------------------------------
# The grade table
# --------------------------------------------------------------------------------------------


def find_grade_table(root: Path, grades=None) -> tuple[pd.DataFrame | None, str | None]:
    """The grade table and where it came from: ``grades`` (a path or a ``read_grades``
    frame), else the label table that ships with the root (:func:`vfcore.verse.find_grade_table`:
    our long table, FX-Grader's ``dataset_ctfu_labels.tsv``, the VerSe'19 appendix), else
    ``(None, None)``. This is the one place the store looks for labels.
    """
    if isinstance(grades, pd.DataFrame):
        return grades, "<table given in Python>"
    if grades is not None:
        if not Path(grades).exists() or Path(grades).is_dir():
            kind = "a folder, not a table" if Path(grades).is_dir() else "no such file"
            raise GradeTableError(grades, f"grade table not found ({kind})")
        regular_file(grades, None, GRADE_TABLE_MAX_BYTES, "grade table")   # no FIFO, no device
        return read_grades(grades), str(grades)
    from vfcore.verse import find_grade_table as find_release_table  # the releases' label tables

    found = find_release_table(root)
    if found is None:
        return None, None
    regular_file(found, None, GRADE_TABLE_MAX_BYTES, "grade table")
    return read_grades(found), str(found)


def grade_table_summary(table: pd.DataFrame | None, source: str | None,
                        case_ids: Sequence[str]) -> dict:
    """What ``report.json`` says about the grade table: its source, how many of its cases match
    a scan of the root, and a ``warning`` when none does (every vertebra stays unlabelled)."""
    if table is None:
        return {"source": None, "cases": 0, "matched_cases": 0, "warning": None}
    in_table = set(table["case"].astype(str))
    matched = in_table & set(case_ids)
    warning = None
    if in_table and not matched and case_ids:
        some = ", ".join(sorted(in_table)[:3])
        warning = (f"grade table {source}: none of its {len(in_table)} case ids ({some}, ...) "
                   f"matches a scan of the root: every vertebra is unlabelled")
    return {"source": source, "cases": len(in_table), "matched_cases": len(matched),
            "unmatched_cases": sorted(in_table - matched)[:20], "warning": warning}


# --------------------------------------------------------------------------------------------
# Manifest rows, reading and writing
# --------------------------------------------------------------------------------------------


def manifest_rows(record: dict, grades: dict | None) -> list[dict]:
    """Manifest rows of one case; ``grades`` maps (case, label) -> grade row (None: no table)."""
    rows = []
    for v in record["vertebrae"]:
        g = None if grades is None else grades.get((record["case"], v["label"]))
        if g is None:
            fracture, grade, shape = "", "", ""
            reason = "no grade table" if grades is None else "not graded"
        else:
            grade = "" if pd.isna(g["grade"]) else int(g["grade"])
            shape = "" if pd.isna(g["shape"]) else int(g["shape"])
            graded = g["status"] == "graded"
            fracture = int(bool(g["fracture"])) if graded else ""
            reason = "" if graded else (g["reason"] or "excluded")
        rows.append({"case": record["case"], "patient": record["patient"], "label": v["label"],
                     "level": v["level"], "fracture": fracture, "grade": grade, "shape": shape,
                     "split": "", "ct_path": v["ct_path"], "mask_path": v["mask_path"],
                     "concept_path": v["concept_path"], "source_sha256": record["source_sha256"],
                     "out_of_field": v["out_of_field"], "reason": reason})
    return rows


def write_manifest(path: Path, manifest: pd.DataFrame) -> None:
    """CSV with :data:`MANIFEST_COLUMNS`, written atomically (deterministic bytes)."""
    from vfcore.io import atomic_write

    with atomic_write(path, "w") as f:
        manifest.to_csv(f, index=False, columns=MANIFEST_COLUMNS, lineterminator="\n")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest with typed columns: ``fracture``/``grade``/``shape`` nullable Int64.

    A file that is not the store's manifest raises a typed error naming it:
    :class:`CorruptFileError` (unreadable, not a CSV table), :class:`FormatError` (columns
    missing), :class:`DataValueError` (a label or out-of-field value that is not a number).
    """
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CorruptFileError(path, f"not a readable manifest table ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:120]})") from None
    except OSError as err:
        raise CorruptFileError(path, f"cannot read the manifest: {err.strerror or err}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise FormatError(path, f"not a patch-store manifest: columns {', '.join(missing)} "
                                f"missing (rebuild it with `vfcore patches`)")
    try:
        df["label"] = df["label"].astype(int)
        df["out_of_field"] = df["out_of_field"].astype(float)
    except ValueError as err:
        raise DataValueError(path, f"a label or out_of_field value is not a number ({err})") from None
    for col in ("fracture", "grade", "shape"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    store = Path(path).parent
    for col in ("ct_path", "mask_path", "concept_path"):   # rows stay inside the store
        for rel in df[col]:
            store_path(rel, store, path, col)
    patient_overlap(df["patient"], df["split"], path)       # no patient in two splits
    twice = df.duplicated(["case", "label"], keep=False)
    if twice.any():
        some = ", ".join(sorted({f"{c} label {lb}" for c, lb in zip(df.loc[twice, "case"],
                                                                     df.loc[twice, "label"])})[:4])
        raise DataValueError(path, f"the same vertebra in more than one row ({some}): rebuild "
                                   f"the store with `vfcore patches`")
    return df
