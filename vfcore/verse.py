"""Read VerSe-layout data (CT, vertebra masks, centroid JSON, grade tables) and download VerSe.

VerSe (Sekuboyina et al. 2021; Löffler et al. 2020) stores each scan in a BIDS-like layout::

    <root>/rawdata/<sub>[/ses-*]/<stem>_ct.nii.gz
    <root>/derivatives/<sub>[/ses-*]/<stem>_seg-vert_msk.nii.gz
    <root>/derivatives/<sub>[/ses-*]/<stem>_seg-subreg_ctd.json   (VerSe'19: _seg-vb_ctd.json)

The paper (Engstler, Keicher et al. 2022, Sec. 3) cuts one patch per vertebra "centered on the
vertebral body"; this module gives the next stage (:mod:`vfcore.patches`) the CT in Hounsfield
units, the vertebra labels, the body centroids c in world millimetres and the fracture labels
(Genant grade >= 1), and refuses any file it cannot read correctly with a typed
:mod:`vfcore.errors` exception that names the file.

Files are found by walking the tree, so the same code reads the phantom, VerSe'19, VerSe'20,
flat folders of loose files (like the test fixtures) and clinical data with session folders.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import http.client
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import apply_affine
from nibabel.filebasedimages import ImageFileError

from vfcore.errors import (
    CorruptFileError,
    DataValueError,
    DownloadError,
    EmptyRootError,
    FormatError,
    GeometryError,
    GradeTableError,
    LabelError,
)
from vfcore.io import atomic_write, sha256_file, write_json

# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------

#: VerSe vertebra labels: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6 (L6 transitional), 28 T13.
LEVEL_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i: f"T{i - 7}" for i in range(8, 20)},
    **{i: f"L{i - 19}" for i in range(20, 26)},
    28: "T13",
}
#: Level name -> label (inverse of :data:`LEVEL_NAMES`).
LEVEL_LABELS: dict[str, int] = {name: label for label, name in LEVEL_NAMES.items()}
#: Labels a vertebra mask may hold (0 = background).
VERTEBRA_LABELS: frozenset[int] = frozenset({0, *LEVEL_NAMES})
#: Labels of a subregion mask (``_seg-subreg_msk``): 41-49 posterior parts, 50 vertebral body.
SUBREG_LABELS: frozenset[int] = frozenset({0, *range(41, 51)})
#: Subregion label of the vertebral body.
SUBREG_BODY = 50

_CRANIOCAUDAL = [*range(1, 20), 28, *range(20, 26)]
_RANK = {label: i for i, label in enumerate(_CRANIOCAUDAL)}


def level_name(label: int) -> str:
    """``8 -> "T1"``, ``28 -> "T13"``; :class:`LabelError` for labels VerSe does not define."""
    try:
        return LEVEL_NAMES[int(label)]
    except (KeyError, ValueError, TypeError):
        raise LabelError(None, f"vertebra label {label!r} is not a VerSe label "
                               "(1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 28 T13)") from None


def craniocaudal(labels: Iterable[int]) -> list[int]:
    """Sort vertebra labels from head to feet: 1..19, then T13 (28), then 20..25."""
    labels = [int(label) for label in labels]
    for label in labels:
        level_name(label)  # raises LabelError for unknown labels
    return sorted(labels, key=_RANK.__getitem__)


# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One scan's files in a VerSe-layout root (any of them may be missing: ``None``).

    ``case_id`` is the file stem without the ``seg-*`` entity and suffix, e.g.
    ``sub-verse408_split-verse223``; ``patient`` is its ``sub-`` entity (``sub-verse408``), the
    unit of patient-level splits; ``release_split`` is ``training``/``validation``/``test``
    when the files sit under a VerSe release folder (``dataset-verse19training``,
    ``dataset-02validation``, ...).
    """

    case_id: str
    patient: str
    ct: Path | None = None
    mask: Path | None = None
    centroids: Path | None = None
    subreg: Path | None = None
    concepts: Path | None = None
    session: str | None = None
    release_split: str | None = None


_RELEASE = re.compile(r"^dataset-(?:verse\d\d|\d\d)(training|validation|test)$")
_NIFTI_EXT = (".nii.gz", ".nii")
# Which kind of file a (suffix, seg entity) pair is; centroids prefer seg-subreg over seg-vb.
_CTD_PREFERENCE = {"subreg": 0, "vb": 1}


def _parse_name(name: str) -> tuple[str, dict[str, str], str, str] | None:
    """Split a BIDS-like file name into (stem, entities, suffix, extension); None otherwise.

    ``sub-ct_seg-vert_label-22_msk.nii.gz`` -> (``sub-ct_label-22``, {sub, seg, label}, ``msk``,
    ``.nii.gz``): the ``seg-`` entity is dropped from the stem wherever it stands.
    """
    for ext in (*_NIFTI_EXT, ".json"):
        if name.endswith(ext):
            break
    else:
        return None
    parts = name[: -len(ext)].split("_")
    if len(parts) < 2:
        return None
    *entities, suffix = parts
    pairs = {}
    for part in entities:
        key, sep, value = part.partition("-")
        if not sep or not key or not value:
            return None
        pairs[key] = value
    stem = "_".join(p for p in entities if not p.startswith("seg-"))
    return stem, pairs, suffix, ext


def _kind(pairs: dict[str, str], suffix: str, ext: str) -> str | None:
    seg = pairs.get("seg")
    if ext in _NIFTI_EXT:
        if suffix == "ct" and seg is None:
            return "ct"
        if suffix == "msk":
            return {"vert": "mask", "subreg": "subreg", "concept": "concepts"}.get(seg)
    elif suffix == "ctd":
        return "centroids"
    return None


def _dataset_root(path: Path, root: Path) -> Path:
    """The folder holding ``rawdata``/``derivatives`` above ``path``, else ``path``'s folder."""
    for parent in path.parents:
        if parent.name in ("rawdata", "derivatives"):
            return parent.parent
        if parent == root:
            break
    return path.parent


def find_cases(root: str | os.PathLike, *, require_ct: bool = True) -> list[Case]:
    """Walk ``root`` (any depth) and group CT, masks and centroid files into :class:`Case` s.

    Files of one scan share a stem and sit under the same dataset folder (the parent of
    ``rawdata``/``derivatives``, or one flat folder). By default only cases with a CT are
    returned; ``require_ct=False`` also returns cases that have only a vertebra mask (e.g. the
    official VerSe sample ``sub-verse004``, published without its CT). Hidden files and folders
    (names starting with ``.``, e.g. half-written temporaries) are skipped.

    Raises :class:`EmptyRootError` when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmptyRootError(root, "is not a folder (expected a VerSe-layout root with "
                                   "rawdata/<sub>/<stem>_ct.nii.gz files)")
    groups: dict[tuple, dict[str, Path]] = {}
    ctd_rank: dict[tuple, int] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            parsed = _parse_name(name)
            if parsed is None:
                continue
            stem, pairs, suffix, ext = parsed
            kind = _kind(pairs, suffix, ext)
            if kind is None:
                continue
            path = Path(folder) / name
            ses_dirs = [d for d in Path(folder).relative_to(root).parts if d.startswith("ses-")]
            session = f"ses-{pairs['ses']}" if "ses" in pairs else (ses_dirs[-1] if ses_dirs else None)
            key = (_dataset_root(path, root), session, stem)
            files_of = groups.setdefault(key, {})
            if kind == "centroids":
                rank = _CTD_PREFERENCE.get(pairs.get("seg", ""), 2)
                if key in ctd_rank and rank > ctd_rank[key]:
                    continue
                if key in ctd_rank and rank == ctd_rank[key]:
                    raise FormatError(path, f"two centroid files for case {stem}: "
                                            f"{files_of['centroids']} and {path}")
                ctd_rank[key] = rank
            elif kind in files_of:
                raise FormatError(path, f"two {kind} files for case {stem}: "
                                        f"{files_of[kind]} and {path}")
            files_of[kind] = path

    cases = []
    mask_only = 0
    for (dataset_root, session, stem), files_of in groups.items():
        if "ct" not in files_of and "mask" not in files_of:
            continue
        if require_ct and "ct" not in files_of:
            mask_only += 1
            continue
        any_file = next(iter(files_of.values()))
        release = None
        for part in reversed(any_file.resolve().parts):
            match = _RELEASE.match(part)
            if match:
                release = match.group(1)
                break
        sub = re.match(r"^(sub-[^_]+)", stem)
        cases.append(Case(case_id=stem, patient=sub.group(1) if sub else stem,
                          session=session, release_split=release,
                          **{k: files_of.get(k) for k in
                             ("ct", "mask", "centroids", "subreg", "concepts")}))
    if not cases:
        hint = (f"; found {mask_only} vertebra mask(s) without a CT: pass require_ct=False "
                "to list them") if mask_only else ""
        raise EmptyRootError(root, "no VerSe-layout cases found (expected files named "
                                   "<stem>_ct.nii.gz and <stem>_seg-vert_msk.nii.gz)" + hint)
    return sorted(cases, key=lambda c: (c.case_id, str(c.ct or c.mask)))


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


@dataclass
class Volume:
    """A 3D image: voxel array, its 4x4 voxel -> world (mm, RAS+) affine, and its file."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along array axes 0, 1, 2 (column norms of the affine)."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """``nibabel.aff2axcodes``: the anatomical direction each array axis points to."""
        return nib.aff2axcodes(self.affine)


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, ImageFileError, gzip.BadGzipFile)


def _load_nifti(path: Path, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Voxel values (scl_slope/scl_inter applied by nibabel) and the affine.

    ``dtype=None`` keeps the stored integer type when the file has no scaling (a uint8 mask
    stays uint8: VerSe scans reach 512 x 512 x 1000 voxels, so float64 copies matter).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(path)
        if len(img.shape) != 3:
            raise FormatError(path, f"expected a 3D image, got shape {img.shape}")
        data = np.asarray(img.dataobj) if dtype is None else img.get_fdata(dtype=dtype)
        affine = np.asarray(img.affine, dtype=np.float64)
    except FormatError:
        raise
    except _READ_ERRORS as err:
        raise CorruptFileError(path, f"cannot read NIfTI (truncated or corrupt?): "
                                     f"{type(err).__name__}: {err}") from err
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise GeometryError(path, f"the affine is singular or not finite:\n{affine}")
    return data, affine


def _check_finite(path: Path, data: np.ndarray) -> None:
    if data.dtype.kind != "f":
        return
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataValueError(path, f"{int(bad.sum())} voxels are NaN or inf (first at index "
                                   f"{first})")


def read_ct(path: str | os.PathLike) -> Volume:
    """CT in Hounsfield units as float32 (scl_slope/scl_inter honoured, e.g. uint8 storage).

    Raises :class:`CorruptFileError` (unreadable file) and :class:`DataValueError` (NaN/inf).
    """
    path = Path(path)
    data, affine = _load_nifti(path, dtype=np.float32)
    _check_finite(path, data)
    return Volume(data, affine, path)


def read_mask(path: str | os.PathLike,
              valid: Iterable[int] | None = VERTEBRA_LABELS) -> Volume:
    """Label mask as int16 after rounding (VerSe masks are sometimes stored as float64).

    ``valid`` is the set of allowed labels (default: 0 and the VerSe vertebra labels; pass
    :data:`SUBREG_LABELS` for subregion masks, ``None`` for no check). Values that are not
    within 0.01 of an integer (a mask resampled with linear interpolation) raise
    :class:`DataValueError`; labels outside ``valid`` raise :class:`LabelError`.
    """
    path = Path(path)
    data, affine = _load_nifti(path)
    if data.dtype.kind == "f":
        _check_finite(path, data)
        rounded = np.rint(data)
        off = np.abs(data - rounded) > 0.01
        if off.any():
            raise DataValueError(path, f"{int(off.sum())} voxels are not integer labels (e.g. "
                                       f"{data[off][0]:g}); was the mask resampled with linear "
                                       "interpolation instead of nearest neighbour?")
        data = rounded
    elif data.dtype.kind not in "iub":
        raise FormatError(path, f"voxel type {data.dtype} is not a label type")
    low, high = data.min(), data.max()
    if low < np.iinfo(np.int16).min or high > np.iinfo(np.int16).max:
        raise LabelError(path, f"labels outside the int16 range: {low:g}..{high:g}")
    labels = data.astype(np.int16)
    if valid is not None:
        unknown = sorted(set(np.unique(labels).tolist()) - set(valid))
        if unknown:
            raise LabelError(path, f"unknown labels {unknown} (allowed: {_ranges(valid)})")
    return Volume(labels, affine, path)


def read_subreg(path: str | os.PathLike) -> Volume:
    """Subregion mask (labels 41-49 posterior parts, 50 vertebral body), see :func:`read_mask`."""
    return read_mask(path, valid=SUBREG_LABELS)


def _ranges(values: Iterable[int]) -> str:
    """``{0, 1, 2, 3, 28}`` -> ``"0-3, 28"``."""
    values = sorted(values)
    runs = [[values[0], values[0]]]
    for v in values[1:]:
        if v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


# --------------------------------------------------------------------------------------------
# Centroids
# --------------------------------------------------------------------------------------------


@dataclass
class Centroids:
    """Vertebral-body centroids of one scan, in continuous voxel indices (array axes 0, 1, 2).

    ``direction`` is the image's ``nibabel.aff2axcodes``, as the VerSe JSON records it.
    """

    path: Path | None
    direction: tuple[str, str, str]
    voxel: dict[int, np.ndarray] = field(default_factory=dict)

    def world(self, affine: np.ndarray) -> dict[int, np.ndarray]:
        """Label -> centroid in world mm: ``apply_affine(affine, voxel index)``."""
        return {label: apply_affine(affine, v) for label, v in self.voxel.items()}


_OLD_FORMAT = ("no 'direction' entry: this is the old VerSe'19 challenge centroid format "
               "(coordinates in mm relative to another origin, not voxel indices); reading it "
               "as voxel indices would put every centroid in the wrong place, so it is refused. "
               "Use the current release (VerSe-complete archives, *_ctd.json with a "
               "'direction' entry) or convert the file")


def read_centroids(path: str | os.PathLike, reference: Volume | None = None) -> Centroids:
    """Read a VerSe centroid JSON: ``[{"direction": [..]}, {"label": L, "X":, "Y":, "Z":}, ..]``.

    X, Y, Z are continuous voxel indices; NaN entries are skipped. With a ``reference`` image,
    ``direction`` must equal ``nib.aff2axcodes(reference.affine)`` and every point must lie
    inside ``reference.shape`` (:class:`GeometryError` otherwise).
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(path, f"not valid JSON: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise FormatError(path, "expected a JSON list of objects "
                                '[{"direction": [...]}, {"label": .., "X": .., "Y": .., "Z": ..}, ...]')
    heads = [e for e in entries if "direction" in e]
    if not heads:
        raise FormatError(path, _OLD_FORMAT)
    direction = heads[0]["direction"]
    if (len(heads) > 1 or not isinstance(direction, list) or len(direction) != 3
            or not all(isinstance(d, str) for d in direction)
            or sorted(_axis_of(d) for d in direction) != [0, 1, 2]):
        raise FormatError(path, f"bad 'direction' entry {heads[0]!r}: expected three axis codes, "
                                'one of L/R, one of A/P, one of S/I, e.g. ["P", "I", "R"]')
    direction = tuple(direction)
    voxel: dict[int, np.ndarray] = {}
    for entry in entries:
        if "direction" in entry:
            continue
        if not {"label", "X", "Y", "Z"} <= set(entry):
            raise FormatError(path, f"entry {entry!r} lacks one of label, X, Y, Z")
        label = entry["label"]
        if not isinstance(label, (int, float)) or float(label) != int(label):
            raise FormatError(path, f"entry {entry!r}: label is not an integer")
        label = int(label)
        if label not in LEVEL_NAMES:
            raise LabelError(path, f"centroid label {label} is not a VerSe vertebra label "
                                   f"(allowed: {_ranges(LEVEL_NAMES)})")
        xyz = [entry[k] for k in ("X", "Y", "Z")]
        if any(v is None for v in xyz) or any(isinstance(v, float) and math.isnan(v) for v in xyz):
            continue  # VerSe writes NaN for vertebrae it could not place
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xyz):
            raise FormatError(path, f"entry {entry!r}: X, Y, Z must be numbers")
        if not all(math.isfinite(v) for v in xyz):
            raise DataValueError(path, f"entry {entry!r}: infinite coordinate")
        if label in voxel:
            raise FormatError(path, f"label {label} ({level_name(label)}) appears twice")
        voxel[label] = np.array(xyz, dtype=np.float64)
    centroids = Centroids(path, direction, voxel)
    if reference is not None:
        check_centroids(centroids, reference)
    return centroids


def _axis_of(code: str) -> int:
    return {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(code, -9)


def check_centroids(centroids: Centroids, reference: Volume) -> None:
    """:class:`GeometryError` unless the direction matches and all points lie in the volume."""
    expected = tuple(reference.axcodes)
    if tuple(centroids.direction) != expected:
        raise GeometryError(centroids.path, f"direction {list(centroids.direction)} disagrees "
                                            f"with the image {reference.path} whose axis codes "
                                            f"are {list(expected)}")
    upper = np.array(reference.shape, dtype=np.float64) - 0.5
    for label, v in centroids.voxel.items():
        if np.any(v < -0.5) or np.any(v > upper):
            raise GeometryError(centroids.path, f"centroid of label {label} "
                                                f"({level_name(label)}) at voxel {v.tolist()} lies "
                                                f"outside the image {reference.path} of shape "
                                                f"{list(reference.shape)}")


def centroids_json(voxel: Mapping[int, Sequence[float]], affine: np.ndarray,
                   path: str | os.PathLike | None = None) -> str:
    """The exact VerSe text: ``json.dumps`` default separators, 1 decimal, labels ascending.

    ``path`` only names the destination in error messages.
    """
    entries: list[dict] = [{"direction": list(nib.aff2axcodes(affine))}]
    for label in sorted(int(k) for k in voxel):
        xyz = np.asarray(voxel[label], dtype=np.float64).reshape(-1)
        if xyz.shape != (3,) or not np.all(np.isfinite(xyz)):
            raise DataValueError(path, f"centroid of label {label} must be 3 finite numbers, "
                                       f"got {xyz.tolist()}")
        if label not in LEVEL_NAMES:
            raise LabelError(path, f"centroid label {label} is not a VerSe vertebra label "
                                   f"(allowed: {_ranges(LEVEL_NAMES)})")
        entries.append({"label": label,
                        **{k: round(float(v), 1) + 0.0 for k, v in zip("XYZ", xyz)}})
    return json.dumps(entries)


def write_centroids(path: str | os.PathLike, voxel: Mapping[int, Sequence[float]],
                    affine: np.ndarray) -> Path:
    """Write centroids (continuous voxel indices) as the exact VerSe JSON bytes, atomically.

    ``direction`` is ``nib.aff2axcodes(affine)``; coordinates are rounded to 1 decimal; no
    trailing newline (the format of VerSe's own ``sub-verse004_seg-subreg_ctd.json``).
    """
    text = centroids_json(voxel, affine, path)
    with atomic_write(path, "wb") as f:
        f.write(text.encode("utf-8"))
    return Path(path)


# --------------------------------------------------------------------------------------------
# Loading a case
# --------------------------------------------------------------------------------------------


@dataclass
class CaseData:
    """The opened files of one :class:`Case` (``None`` where the case has no such file)."""

    case: Case
    ct: Volume | None
    mask: Volume | None
    centroids: Centroids | None
    subreg: Volume | None = None
    concepts: Volume | None = None


def check_same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> None:
    """:class:`GeometryError` (naming both files) unless shapes and affines agree."""
    if a.shape != b.shape:
        raise GeometryError(b.path, f"shape {list(b.shape)} differs from {a.path} shape "
                                    f"{list(a.shape)}")
    if not np.allclose(a.affine, b.affine, atol=atol, rtol=0):
        diff = float(np.abs(a.affine - b.affine).max())
        raise GeometryError(b.path, f"affine differs from {a.path} by up to {diff:.4g} "
                                    f"(> {atol}):\n{b.affine}\nvs\n{a.affine}")


def load_case(case: Case) -> CaseData:
    """Read all files of a case and check they share one voxel grid.

    CT (float32 HU), vertebra mask, subregion mask and concept mask (phantom only; labels
    are not checked here, see ``concept_labels.json``) must have the same shape and affine;
    the centroids are checked against the CT (or the mask when there is no CT).
    """
    ct = read_ct(case.ct) if case.ct else None
    mask = read_mask(case.mask) if case.mask else None
    subreg = read_subreg(case.subreg) if case.subreg else None
    concepts = read_mask(case.concepts, valid=None) if case.concepts else None
    volumes = [v for v in (ct, mask, subreg, concepts) if v is not None]
    for other in volumes[1:]:
        check_same_grid(volumes[0], other)
    centroids = None
    if case.centroids:
        if not volumes:
            raise FormatError(case.centroids, "centroids without an image to check them against")
        centroids = read_centroids(case.centroids, reference=volumes[0])
    return CaseData(case, ct, mask, centroids, subreg, concepts)


# --------------------------------------------------------------------------------------------
# Fracture grades
# --------------------------------------------------------------------------------------------

GRADE_COLUMNS = ["case", "label", "level", "grade", "shape", "fracture", "status", "reason"]
#: FX-Grader ``def_<LEVEL>`` codes other than 0-3 (Genant grade): all excluded from the task.
FXGRADER_CODES = {4: "Schmorl node", 5: "non-osteoporotic fracture", 6: "sclerotic change",
                  7: "cortical lesion", 8: "foreign material", 9: "malignant", 10: "metastasis",
                  11: "unclear"}
NOT_GRADED = "not graded"
FOREIGN = "foreign material (x)"


def _cell(value) -> int | str | None:
    """A grade/shape cell: None (empty), ``"x"``, or an int; anything else -> ValueError."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in ("nan", "na", "n/a"):
            return None
        if text.lower() == "x":
            return "x"
        value = float(text)
    value = float(value)
    if value != int(value):
        raise ValueError(value)
    return int(value)


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
        case = appendix_case_id(rec["verse_ID"], rec["subject_ID"])
        for level in levels:
            where = f"row {i + 2} ({case}), {level}"
            try:
                grade = _cell(rec[f"{level}_fx-g"])
                shape = _cell(rec.get(f"{level}_fx-s"))
            except ValueError:
                raise GradeTableError(path, f"{where}: grade/shape "
                                            f"{rec[f'{level}_fx-g']!r}/{rec.get(f'{level}_fx-s')!r}"
                                            " is not 0-3, x or empty") from None
            rows.append(_row(path, case, LEVEL_LABELS[level], grade, shape, where))
    return _frame(path, rows)


def _read_text_table(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise CorruptFileError(path, f"cannot read the table: {err}") from err
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
            except ValueError:
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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
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
# Download
# --------------------------------------------------------------------------------------------

_S3 = "https://s3.bonescreen.de/public/VerSe-complete"
#: Public VerSe archives (CC BY-SA 4.0); no checksums are published, see :func:`download`.
VERSE_ARCHIVES: dict[str, str] = {
    f"verse{year}{split}": f"{_S3}/dataset-verse{year}{split}.zip"
    for year in ("19", "20") for split in ("training", "validation", "test")
}
#: Release name -> its archives (``download("verse19", ...)`` fetches all three splits).
VERSE_RELEASES: dict[str, list[str]] = {
    f"verse{year}": [f"verse{year}{split}" for split in ("training", "validation", "test")]
    for year in ("19", "20")
}
#: Name of the JSON record (size + sha256 per archive) kept beside the archives.
RECORD_NAME = "archives.sha256.json"


def _fetch(url: str, part: Path, *, timeout: float, chunk_size: int, progress: bool,
           desc: str) -> None:
    """Append the rest of ``url`` to ``part`` (HTTP Range from its current size)."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vfcore"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        # a fresh opener reads the proxy settings of the environment at call time
        response = urllib.request.build_opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # range not satisfiable: .part is complete or too long
            total = _total_size(err.headers)
            if total is not None and total == offset:
                return
            part.unlink()
            return _fetch(url, part, timeout=timeout, chunk_size=chunk_size,
                          progress=progress, desc=desc)
        raise
    with response:
        if offset and response.status == 206:
            start = _range_start(response.headers)
            if start != offset:
                raise DownloadError(part, f"server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # server ignored Range: start over
        total = _total_size(response.headers)
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B",
                                         unit_scale=True, unit_divisor=1024, desc=desc,
                                         disable=not progress) as bar:
            while block := response.read(chunk_size):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def _range_start(headers) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _total_size(headers) -> int | None:
    """Full size of the resource from Content-Range (``bytes a-b/N``) or Content-Length."""
    match = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", headers.get("Content-Range", "") or "")
    if match:
        return int(match.group(1))
    length = headers.get("Content-Length")
    return int(length) if length is not None else None


def _load_record(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(path, f"checksum record is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise FormatError(path, "checksum record must be a JSON object {archive: {size, sha256}}")
    return record


def _verify(archive: Path, entry: dict, record_path: Path) -> None:
    size = archive.stat().st_size
    if size != entry["size"]:
        raise DownloadError(archive, f"size {size} differs from {entry['size']} recorded in "
                                     f"{record_path}")
    digest = sha256_file(archive)
    if digest != entry["sha256"]:
        raise DownloadError(archive, f"sha256 {digest} differs from {entry['sha256']} recorded "
                                     f"in {record_path}")


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse absolute paths, ``..``, drive letters and symlinks (zip-slip)."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DownloadError(archive, f"member {name!r} is a symbolic link: refused")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise DownloadError(archive, f"member {name!r} would be written outside the target "
                                     "folder: refused")


def extract_zip(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract safely: check every member, unpack into a hidden temp folder, then rename.

    A zip whose members all sit in one top-level folder (VerSe: ``dataset-verse19training/``)
    becomes ``target/<that folder>``; otherwise ``target/<archive stem>``. Existing folders
    are never overwritten (:class:`DownloadError`); on any failure nothing is left behind.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=f".extract-{archive.stem}-"))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in members:
                    _check_member(info, archive)
                root = tmp.resolve()
                for info in members:
                    dest = (tmp / info.filename).resolve()
                    if root != dest and root not in dest.parents:
                        raise DownloadError(archive, f"member {info.filename!r} escapes the "
                                                     "target folder: refused")
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise DownloadError(archive, f"corrupt zip archive: {err}") from err
        top = [p for p in tmp.iterdir()]
        if len(top) == 1 and top[0].is_dir():
            source, dest = top[0], target / top[0].name
        else:
            source, dest = tmp, target / archive.stem
        if dest.exists():
            raise DownloadError(dest, "already exists: remove it to extract again")
        os.replace(source, dest)
        return [dest]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a sound zip (CRCs of all members checked), or None."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        return f"not a readable zip ({err})"
    return f"member {bad!r} fails its CRC check" if bad else None


def _check_zip(part: Path, archive: Path) -> None:
    """Delete a fresh download ``part`` and raise :class:`DownloadError` unless it is sound."""
    problem = _zip_problem(part)
    if problem:
        part.unlink()
        raise DownloadError(archive, f"corrupt zip archive: {problem}; the download was deleted")


def _check_zip_kept(archive: Path) -> None:
    """Like :func:`_check_zip` for an archive the user placed: it is kept, not deleted."""
    problem = _zip_problem(archive)
    if problem:
        raise DownloadError(archive, f"corrupt zip archive: {problem}; delete it to download "
                                     "it again")


def _fetch_with_retries(url: str, part: Path, *, retries: int, retry_wait: float,
                        **fetch_kwargs) -> None:
    """:func:`_fetch`, resumed up to ``retries`` times after a dropped connection."""
    for attempt in range(retries + 1):
        try:
            return _fetch(url, part, **fetch_kwargs)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as err:
            if isinstance(err, urllib.error.HTTPError) or attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(url, f"download failed ({err}); {kept} bytes kept in "
                                         f"{part}, run again to resume") from err
            time.sleep(retry_wait * 2 ** attempt)


def _record_entry(url: str, archive: Path) -> dict:
    return {"url": url, "size": archive.stat().st_size, "sha256": sha256_file(archive),
            "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def download(archives: Iterable[str] | Mapping[str, str], target: str | os.PathLike, *,
             extract: bool = True, retries: int = 3, retry_wait: float = 2.0,
             timeout: float = 60.0, chunk_size: int = 1 << 20,
             progress: bool = True) -> list[Path]:
    """Download and unpack VerSe archives into ``target``; returns the extracted folders.

    ``archives``: names of :data:`VERSE_ARCHIVES` (``"verse19training"``, ...) or of
    :data:`VERSE_RELEASES` (``"verse19"``: its three splits), or a mapping name -> URL. Each archive is fetched to ``target/<file>.zip.part`` (resumed with an HTTP
    Range request after an interruption, up to ``retries`` times per call, and on the next
    call), then renamed to ``target/<file>.zip``. VerSe publishes no checksums, so the size
    and sha256 are recorded in ``target/archives.sha256.json`` on first download (only once
    the zip's CRCs check out) and every later call verifies the archive against that record
    (:class:`DownloadError` on mismatch; a mismatching new download is deleted). Extraction:
    :func:`extract_zip`, once per archive (the record remembers the folder). With
    ``extract=False`` the archive paths are returned.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if isinstance(archives, str):
        archives = [archives]
    if isinstance(archives, Mapping):
        urls = dict(archives)
    else:
        names = [n for name in archives for n in VERSE_RELEASES.get(name, [name])]
        unknown = [name for name in names if name not in VERSE_ARCHIVES]
        if unknown:
            raise DownloadError(None, f"unknown archive(s) {unknown}; choose from "
                                      f"{sorted(VERSE_ARCHIVES)} or {sorted(VERSE_RELEASES)}")
        urls = {name: VERSE_ARCHIVES[name] for name in names}
    record_path = target / RECORD_NAME
    out = []
    for name, url in urls.items():
        filename = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or f"{name}.zip"
        archive = target / filename
        record = _load_record(record_path)
        if not archive.exists():
            part = archive.with_name(archive.name + ".part")
            _fetch_with_retries(url, part, retries=retries, retry_wait=retry_wait,
                                timeout=timeout, chunk_size=chunk_size, progress=progress,
                                desc=filename)
            if filename in record:
                try:
                    _verify(part, record[filename], record_path)
                except DownloadError as err:
                    part.unlink()
                    raise DownloadError(archive, f"{err.problem}; the new download was deleted "
                                                 "(the server's file changed or the transfer "
                                                 "was corrupted)") from None
            else:
                _check_zip(part, archive)
                record[filename] = _record_entry(url, part)
                write_json(record_path, record)
            os.replace(part, archive)
        elif filename in record:
            _verify(archive, record[filename], record_path)
        else:  # an archive put there by hand: record it now (trust on first use)
            _check_zip_kept(archive)
            record[filename] = _record_entry(url, archive)
            write_json(record_path, record)
        if not extract:
            out.append(archive)
            continue
        done = record[filename].get("extracted")
        if done and (target / done).is_dir():
            out.append(target / done)  # unpacked by an earlier call
            continue
        (folder,) = extract_zip(archive, target)
        record[filename]["extracted"] = folder.name
        write_json(record_path, record)
        out.append(folder)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vfcore.verse download --target data/verse verse19training ...``."""
    parser = argparse.ArgumentParser(prog="python -m vfcore.verse",
                                     description="Download the public VerSe archives.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download, verify and unpack archives")
    dl.add_argument("archives", nargs="*", default=list(VERSE_ARCHIVES),
                    help=f"any of {', '.join([*VERSE_RELEASES, *VERSE_ARCHIVES])} "
                         "(default: all)")
    dl.add_argument("--target", required=True, help="folder for the archives and data")
    dl.add_argument("--no-extract", action="store_true", help="only download and verify")
    args = parser.parse_args(argv)
    for folder in download(args.archives, args.target, extract=not args.no_extract):
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
