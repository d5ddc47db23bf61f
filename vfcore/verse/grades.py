"""Fracture grade tables: the Löffler et al. 2020 appendix E1, FX-Grader ratings, a long table.

The task's label (paper, Sec. 3): fractured = Genant grade >= 1; vertebrae graded ``x``
(foreign material) or not graded are excluded.
"""
from __future__ import annotations

import fnmatch
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from vfcore.errors import CorruptFileError, EmptyRootError, FormatError, GradeTableError, LabelError
from vfcore.verse.layout import _RANK, LEVEL_LABELS, LEVEL_NAMES, _ranges

# --------------------------------------------------------------------------------------------
# Fracture grades
# --------------------------------------------------------------------------------------------

GRADE_COLUMNS = ["case", "label", "level", "grade", "shape", "fracture", "status", "reason"]
#: FX-Grader ``def_<LEVEL>`` codes other than 0-3 (Genant grade): all excluded from the task.
FXGRADER_CODES = {4: "Schmorl node", 5: "non-osteoporotic fracture", 6: "sclerotic change",
                  7: "cortical lesion", 8: "foreign material", 9: "malignant", 10: "metastasis",
                  11: "unclear"}
NOT_GRADED = "not graded"
#: Largest grade table read (the Löffler appendix is 50 kB; FX-Grader's table a few hundred kB).
TABLE_MAX_BYTES = 64 << 20
FOREIGN = "foreign material (x)"


def _cell(value) -> int | str | None:
    """A grade/shape cell: None (empty), ``"x"``, or an int; anything else -> ValueError."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(value)  # a TRUE/FALSE cell is not a grade
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in ("nan", "na", "n/a"):
            return None
        if text.lower() == "x":
            return "x"
        value = float(text)
    value = float(value)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(value)  # inf, nan spelt otherwise, 1.5
    return int(value)


def _plain(value):
    """A numpy scalar as the Python value (for messages: ``nan``, not ``np.float64(nan)``)."""
    return value.item() if isinstance(value, np.generic) else value


def _row(path, case, label, grade, shape, where) -> dict:
    """One output row from parsed grade/shape cells (Genant grade 0-3, shape 0-3)."""
    for name, v in (("grade", grade), ("shape", shape)):
        if isinstance(v, int) and not 0 <= v <= 3:
            raise GradeTableError(path, f"{where}: {name} {v} is not 0-3, x or empty")
    if isinstance(grade, int):
        status, reason = "graded", ""
    elif grade == "x":
        status, reason = "excluded", FOREIGN
    else:
        status, reason = "excluded", NOT_GRADED
    return {"case": case, "label": label, "level": LEVEL_NAMES[label],
            "grade": grade if isinstance(grade, int) else pd.NA,
            "shape": shape if isinstance(shape, int) else pd.NA,
            "fracture": (grade >= 1) if isinstance(grade, int) else pd.NA,
            "status": status, "reason": reason}


def _frame(path: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=GRADE_COLUMNS)
    twice = df[df.duplicated(["case", "label"])]
    if len(twice):
        first = twice.iloc[0]
        raise GradeTableError(path, f"{first.case} {first.level} appears more than once "
                                    f"({len(twice)} repeated rows)")
    df = df.astype({"case": str, "label": int, "level": str, "grade": "Int64",
                    "shape": "Int64", "fracture": "boolean", "status": str, "reason": str})
    order = df["label"].map(_RANK)
    return (df.assign(_o=order).sort_values(["case", "_o"], kind="stable")
            .drop(columns="_o").reset_index(drop=True))


def appendix_case_id(verse_id: int, subject_id: int) -> str:
    """Löffler appendix ids -> VerSe stem: ``sub-verse004`` or ``sub-verse408_split-verse223``."""
    if int(verse_id) == int(subject_id):
        return f"sub-verse{int(subject_id):03d}"
    return f"sub-verse{int(subject_id):03d}_split-verse{int(verse_id):03d}"


def _read_appendix(path: Path) -> pd.DataFrame:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no default style"
            table = pd.read_excel(path, sheet_name="VerSe_dataset", engine="openpyxl")
    except ValueError as err:
        raise GradeTableError(path, f"no sheet 'VerSe_dataset' (not the Löffler et al. 2020 "
                                    f"appendix E1?): {err}") from err
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise CorruptFileError(path, f"cannot read the xlsx workbook: {err}") from err
    table = table.dropna(axis=1, how="all")  # openpyxl reports 16384 formatted columns
    missing = {"verse_ID", "subject_ID"} - set(table.columns)
    if missing:
        raise GradeTableError(path, f"missing columns {sorted(missing)}")
    levels = [c[: -len("_fx-g")] for c in table.columns if c.endswith("_fx-g")]
    unknown = [lv for lv in levels if lv not in LEVEL_LABELS]
    if unknown or not levels:
        raise GradeTableError(path, f"grade columns <LEVEL>_fx-g with unknown levels {unknown}"
                              if unknown else "no <LEVEL>_fx-g grade columns")
    rows = []
    for i, rec in table.iterrows():
        ids = [_plain(rec["verse_ID"]), _plain(rec["subject_ID"])]
        try:
            if any(isinstance(v, (bool, np.bool_)) or float(v) != int(float(v)) for v in ids):
                raise ValueError(ids)
        except (ValueError, TypeError, OverflowError):
            raise GradeTableError(path, f"row {i + 2}: verse_ID/subject_ID {ids[0]!r}/{ids[1]!r} "
                                        "are not whole numbers (an empty cell?)") from None
        case = appendix_case_id(*ids)
        for level in levels:
            where = f"row {i + 2} ({case}), {level}"
            try:
                grade = _cell(rec[f"{level}_fx-g"])
                shape = _cell(rec.get(f"{level}_fx-s"))
            except ValueError:
                raise GradeTableError(path, f"{where}: grade/shape "
                                            f"{_plain(rec[f'{level}_fx-g'])!r}/"
                                            f"{_plain(rec.get(f'{level}_fx-s'))!r}"
                                            " is not 0-3, x or empty") from None
            rows.append(_row(path, case, LEVEL_LABELS[level], grade, shape, where))
    return _frame(path, rows)


def _read_text_table(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CorruptFileError(path, f"cannot read the table: {err}") from err
    header = pd.read_csv(path, sep=sep, dtype=str, header=None, nrows=1, keep_default_na=False)
    names = [str(c).strip() for c in header.iloc[0]] if len(header) else []
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:   # pandas would rename the second one 'grade.1' and read the first
        raise GradeTableError(path, f"column(s) {', '.join(map(repr, twice))} appear more than "
                              f"once in the header: which one holds the grades is ambiguous")
    table.columns = [str(c).strip() for c in table.columns]
    if "ID" in table.columns and any(c.startswith("def_") for c in table.columns):
        return _read_fxgrader(path, table)
    missing = {"case", "label", "grade"} - set(table.columns)
    if missing:
        raise GradeTableError(path, f"missing columns {sorted(missing)}; expected the long "
                                    "format with columns case, label, grade[, shape]")
    rows, seen = [], set()
    for i, rec in table.iterrows():
        where = f"line {i + 2}"
        case, text = rec["case"].strip(), rec["label"].strip()
        if not case:
            raise GradeTableError(path, f"{where}: empty case")
        if text in LEVEL_LABELS:
            label = LEVEL_LABELS[text]
        else:
            try:
                label = int(float(text))
            except (ValueError, OverflowError):
                raise GradeTableError(path, f"{where}: label {text!r} is neither a VerSe label "
                                            "nor a level name") from None
            if label not in LEVEL_NAMES or float(text) != label:
                raise LabelError(path, f"{where}: label {text!r} is not a VerSe vertebra label "
                                       f"(allowed: {_ranges(LEVEL_NAMES)})")
        if (case, label) in seen:
            raise GradeTableError(path, f"{where}: {case} {LEVEL_NAMES[label]} appears twice")
        seen.add((case, label))
        try:
            grade = _cell(rec["grade"])
            shape = _cell(rec["shape"]) if "shape" in table.columns else None
        except ValueError:
            raise GradeTableError(path, f"{where}: grade/shape {rec['grade']!r}/"
                                        f"{rec.get('shape')!r} is not 0-3, x or empty") from None
        rows.append(_row(path, case, label, grade, shape, where))
    return _frame(path, rows)


def _read_fxgrader(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """FX-Grader ratings: ``def_<LEVEL>`` 0 normal, 1-3 Genant grade, 4-11 other findings."""
    rows = []
    for i, rec in table.iterrows():
        case = rec["ID"].strip()
        if not case:
            raise GradeTableError(path, f"line {i + 2}: empty ID")
        for col in (c for c in table.columns if c.startswith("def_")):
            level = col[len("def_"):]
            if level not in LEVEL_LABELS:
                raise GradeTableError(path, f"column {col}: unknown level {level!r}")
            where = f"line {i + 2} ({case}), {col}"
            try:
                code = _cell(rec[col])
            except ValueError:
                raise GradeTableError(path, f"{where}: {rec[col]!r} is not an FX-Grader code") from None
            if code is None or (isinstance(code, int) and code <= 3):
                row = _row(path, case, LEVEL_LABELS[level], code, None, where)
            elif code in FXGRADER_CODES:
                row = _row(path, case, LEVEL_LABELS[level], None, None, where)
                row["reason"] = f"FX-Grader code {code}: {FXGRADER_CODES[code]}"
            else:
                raise GradeTableError(path, f"{where}: {code!r} is not an FX-Grader code (0-11)")
            rows.append(row)
    return _frame(path, rows)


def read_grades(path: str | os.PathLike, known_cases: Iterable[str] | None = None) -> pd.DataFrame:
    """Fracture grades as one row per (case, vertebra).

    Columns ``case, label, level, grade, shape, fracture, status, reason``: ``grade`` and
    ``shape`` are nullable ints (Genant grade 0-3; shape 0 none, 1 wedge, 2 biconcave,
    3 crush), ``fracture`` is ``grade >= 1`` (the paper's label), ``status`` is ``graded`` or
    ``excluded`` with the ``reason`` (``foreign material (x)``, ``not graded``, an FX-Grader
    finding). Reads the Löffler et al. 2020 appendix E1 (``.xlsx``; every T1-L6 cell becomes a
    row, empty cells as ``not graded``), the long table (``.tsv``/``.csv`` with columns
    ``case, label, grade[, shape]``; ``label`` a number or a level name) and FX-Grader
    ``def_<LEVEL>`` tables.

    ``known_cases``: the case ids of the data at hand; a table naming any other case raises
    :class:`GradeTableError` (pass it when table and data describe the same set of scans).
    """
    path = Path(path)
    if path.is_dir():
        raise CorruptFileError(path, "is a folder, not a grade table")
    if not path.is_file():
        raise CorruptFileError(path, "no such grade table")
    size = path.stat().st_size
    if size > TABLE_MAX_BYTES:
        raise FormatError(path, f"grade table of {size:,} bytes is larger than the limit of "
                                f"{TABLE_MAX_BYTES:,} bytes")
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        grades = _read_appendix(path)
    else:
        grades = _read_text_table(path)
    if known_cases is not None:
        unknown = sorted(set(grades["case"]) - set(known_cases))
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise GradeTableError(path, f"{len(unknown)} case(s) not in the data: {shown}")
    return grades


# --------------------------------------------------------------------------------------------
# Finding the grade table of a data root
# --------------------------------------------------------------------------------------------

#: Names (``fnmatch`` patterns, case-insensitive) of the grade tables found automatically, in the
#: order they are preferred: the long table (what :mod:`vfcore.phantom` writes; also the format
#: to bring your own), FX-Grader's ratings (``dataset_ctfu_labels.tsv`` beside ``rawdata/`` in
#: its sample dataset), the VerSe'19 grades (Löffler et al. 2020 appendix E1, file name as
#: published by Radiology: AI).
GRADE_TABLE_PATTERNS: tuple[str, ...] = (
    "fracture_grades.tsv", "fracture_grades.csv", "dataset_ctfu_labels*.tsv",
    "ryai190138_appendixe1*.xlsx", "*appendix*e1*.xlsx",
)


@dataclass(frozen=True)
class GradeTable:
    """The grades of a root and where they came from (``path``/``grades`` None: no table)."""

    path: Path | None
    kind: str  # "long table", "FX-Grader ratings", "VerSe'19 appendix E1" or "none"
    grades: pd.DataFrame | None

    def describe(self) -> str:
        """One line for the user: which table was used."""
        if self.path is None:
            return "no grade table found: every vertebra is unlabelled"
        n = 0 if self.grades is None else int((self.grades["status"] == "graded").sum())
        return f"grades from {self.path} ({self.kind}, {n} graded vertebrae)"


def _table_kind(path: Path) -> str:
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return "VerSe'19 appendix E1"
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline(1 << 16)
    columns = {c.strip() for c in first.replace("\t", ",").split(",")}
    if "ID" in columns and any(c.startswith("def_") for c in columns):
        return "FX-Grader ratings"
    return "long table"


def _matches(folder: Path) -> list[tuple[int, Path]]:
    """(preference, path) of every grade table directly in ``folder``."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        for rank, pattern in enumerate(GRADE_TABLE_PATTERNS):
            if fnmatch.fnmatch(path.name.lower(), pattern):
                found.append((rank, path))
                break
    return found


def find_grade_table(root: str | os.PathLike) -> Path | None:
    """The grade table of a data root: in ``root`` itself, else in one of its direct subfolders.

    Names are :data:`GRADE_TABLE_PATTERNS` (earlier patterns win). Two equally preferred
    tables at the same depth are ambiguous: :class:`GradeTableError` listing both (pass one
    explicitly). ``None`` when there is no table.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmptyRootError(root, "is not a folder")
    found = _matches(root)
    if not found:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found += _matches(sub)
    if not found:
        return None
    best = min(rank for rank, _ in found)
    paths = [p for rank, p in found if rank == best]
    if len(paths) > 1:
        raise GradeTableError(root, f"several grade tables: {', '.join(map(str, paths))}; pass "
                                    "the one to use explicitly")
    return paths[0]


def grades_for_root(root: str | os.PathLike, table: str | os.PathLike | None = None
                    ) -> GradeTable:
    """Read the grades of ``root``: ``table`` when given, else :func:`find_grade_table`.

    Returns a :class:`GradeTable` that says which file was used and its kind. An explicit
    ``table`` that does not exist is :class:`CorruptFileError` (never silently no grades).
    """
    path = Path(table) if table is not None else find_grade_table(root)
    if path is None:
        return GradeTable(None, "none", None)
    grades = read_grades(path)
    return GradeTable(path, _table_kind(path), grades)


def grade_table_mismatch(grades: pd.DataFrame, case_ids: Iterable[str],
                         table: str | os.PathLike | None = None) -> str | None:
    """A warning when no case id of the table names a scan of the root; None when some do.

    The caller warns (``warnings.warn`` or a printed line): a table for other scans would
    otherwise leave every vertebra unlabelled without a word.
    """
    scans = sorted(set(case_ids))
    cases = sorted(set(grades["case"]))
    if set(cases) & set(scans):
        return None
    where = f"{table}: " if table is not None else ""
    return (f"{where}none of the {len(cases)} case id(s) of the grade table (e.g. "
            f"{', '.join(cases[:3]) or 'none'}) names one of the {len(scans)} scan(s) of the root "
            f"(e.g. {', '.join(scans[:3]) or 'none'}): every vertebra will be unlabelled")
