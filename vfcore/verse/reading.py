"""Read the files of one scan: CT in HU, label masks, centroid JSON; open a whole case.

The paper (Engstler, Keicher et al. 2022, Sec. 3) cuts one patch per vertebra "centered on the
vertebral body"; this module gives :mod:`vfcore.patches` the CT in Hounsfield units, the
vertebra labels and the body centroids c (voxel indices; world mm through the affine), and
refuses any file it cannot read correctly with a typed :mod:`vfcore.errors` exception that
names the file.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine
from nibabel.filebasedimages import ImageFileError

from vfcore.errors import CorruptFileError, DataValueError, FormatError, GeometryError, LabelError
from vfcore.io import atomic_write
from vfcore.verse.layout import LEVEL_NAMES, SUBREG_LABELS, VERTEBRA_LABELS, Case, _ranges, level_name

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
