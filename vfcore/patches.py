"""Spline-straightened 96^3 vertebra patches and the run's patch store.

The paper (Engstler, Keicher et al. 2022, Sec. 3, "Data Preparation") feeds the network one
vertebra at a time: a 96 x 96 x 96 patch at 1 mm, "centered on the vertebral body and oriented
along the spine by aligning the vertical axis with a spline constructed with the vertebral
centroids". The authors never published this step; this module is our reconstruction:

1. the body centroids c (world mm) ordered from head to feet, a cubic spline C(t) through
   them with the cumulative chord length t (mm) as parameter;
2. at the target vertebra a frame: e_S = unit tangent pointing to the head (towards the
   cranial neighbour), e_A = the scanner's anterior axis made orthogonal to e_S
   (Gram-Schmidt), e_L = e_S x e_A (patient left);
3. a 96^3 grid at 1 mm, voxel-centred, whose array axes point (I, P, L):
   world(i, j, k) = c + r_i (-e_S) + r_j (-e_A) + r_k e_L,   r_i = (i - 47.5) mm;
4. ONE interpolation from the original voxels (world -> voxel with the inverse affine,
   ``scipy.ndimage.map_coordinates``): linear for CT (-1024 HU outside the scan), nearest for
   label masks (0 outside; concept masks: the concept "outside the scan", 12). Everything is
   in mm, so anisotropic scans are not distorted.

:func:`extract_patches` runs this over a whole VerSe-layout root (phantom or real) and keeps
the result in ``<run>/patches/``: int16 HU patches, label patches, ``manifest.csv`` (one row
per vertebra, patient-level split) and ``report.json`` (failed scans, skipped vertebrae).
The store is resumable: each case writes its completion record last, finished cases with
unchanged sources (sha256) are skipped, and a restarted run produces byte-identical files.
Clipping to [-1000, 1000] HU and scaling to [0, 1] happen at load time (:mod:`vfcore.data`).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import shutil
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.interpolate import CubicSpline
from scipy.ndimage import center_of_mass, map_coordinates, spline_filter

from vfcore.errors import GeometryError, VfcoreError
from vfcore.io import save_npy, sha256_file, write_json
from vfcore.phantom.concepts import OUTSIDE_SCAN
from vfcore.verse import (
    SUBREG_BODY,
    Case,
    Volume,
    craniocaudal,
    find_cases,
    level_name,
    load_case,
    read_grades,
)

#: Edge length of a patch in voxels and its voxel size in mm (paper: 96^3 at 1 mm).
PATCH_SIZE = 96
PATCH_SPACING = 1.0
#: Hounsfield value written where the patch leaves the scan (air).
CT_FILL = -1024
#: Labels 1-7 are C1-C7: excluded, as in the paper (osteoporotic fractures are rare there).
CERVICAL = frozenset(range(1, 8))
#: World (RAS+) directions of the scanner: superior and anterior.
WORLD_S = np.array([0.0, 0.0, 1.0])
WORLD_A = np.array([0.0, 1.0, 0.0])
#: Bump when the stored patches would change for the same inputs (forces re-extraction).
METHOD_VERSION = 2

MANIFEST_COLUMNS = ["case", "patient", "label", "level", "fracture", "grade", "shape", "split",
                    "ct_path", "mask_path", "concept_path", "source_sha256", "out_of_field",
                    "reason"]
SPLITS = ("train", "val", "test")
_RELEASE_TO_SPLIT = {"training": "train", "validation": "val", "test": "test"}
RECORD_NAME = "case.json"
GRADE_TABLE_NAMES = ("fracture_grades.tsv", "fracture_grades.csv")


# --------------------------------------------------------------------------------------------
# The spine curve and the local frame
# --------------------------------------------------------------------------------------------


@dataclass
class Spine:
    """Body centroids ordered head -> feet, their chord-length parameter t (mm), the spline."""

    labels: list[int]
    points: np.ndarray            # [n, 3] world mm, cranio-caudal order
    t: np.ndarray                 # [n] cumulative chord length, mm
    spline: CubicSpline | None    # None for one or two centroids

    def tangent(self, label: int) -> np.ndarray:
        """dC/dt at ``label``: unit vector pointing CAUDALLY (t grows towards the feet)."""
        n = len(self.labels)
        if n == 1:
            warnings.warn(f"only one body centroid ({level_name(self.labels[0])}): the "
                          "patch axis is the scanner's superior axis, not the spine's",
                          stacklevel=3)
            d = -WORLD_S
        elif n == 2:
            d = self.points[1] - self.points[0]
        else:
            d = self.spline(self.t[self.labels.index(label)], 1)
        return d / np.linalg.norm(d)


def fit_spine(centroids_world: Mapping[int, np.ndarray], source=None) -> Spine:
    """Cubic spline through the world-mm centroids, ordered cranio-caudally (step 1-2).

    Parameter: cumulative chord length, so t is roughly arc length in mm. Three or more
    centroids: ``scipy.interpolate.CubicSpline``; two: the line through them; one: no curve
    (the frame falls back to the scanner axis, with a warning).

    End conditions: the slope at each end is that of the parabola through the three end
    centroids (a clamped spline). It depends only on the last two segments, so a bend further
    in (e.g. a wedge fracture two levels away) does not swing the end vertebra's axis, as the
    default not-a-knot condition (a cubic through the last four points) does. Measured on 60
    phantom scans: end vertebrae within 2.6 degrees of the truth, against up to 18 degrees with
    not-a-knot; inner vertebrae unchanged (about 0.2 degrees median).
    """
    if not centroids_world:
        raise GeometryError(source, "no vertebral-body centroids to fit a spine through")
    labels = craniocaudal(centroids_world)
    points = np.array([np.asarray(centroids_world[lb], dtype=np.float64) for lb in labels])
    chord = np.linalg.norm(np.diff(points, axis=0), axis=1)
    if np.any(chord < 1e-3):
        i = int(np.argmin(chord))
        raise GeometryError(source, f"centroids of {level_name(labels[i])} and "
                                    f"{level_name(labels[i + 1])} coincide: cannot fit a spine")
    t = np.concatenate([[0.0], np.cumsum(chord)])
    if len(labels) == 3:
        spline = CubicSpline(t, points, axis=0)  # not-a-knot with three points: the parabola
    elif len(labels) > 3:
        head = CubicSpline(t[:3], points[:3], axis=0)(t[0], 1)      # parabola slopes at the ends
        tail = CubicSpline(t[-3:], points[-3:], axis=0)(t[-1], 1)
        spline = CubicSpline(t, points, axis=0, bc_type=((1, head), (1, tail)))
    else:
        spline = None
    return Spine(labels, points, t, spline)


@dataclass
class Frame:
    """Local frame at a vertebra: centre c and unit axes e_S, e_A, e_L (world, RAS+ mm)."""

    c: np.ndarray
    e_S: np.ndarray
    e_A: np.ndarray
    e_L: np.ndarray

    @property
    def axes(self) -> np.ndarray:
        """3x3 matrix whose columns are the patch axes (I, P, L) in world: -e_S, -e_A, e_L."""
        return np.column_stack([-self.e_S, -self.e_A, self.e_L])


def spine_frame(spine: Spine, label: int, anterior: np.ndarray = WORLD_A, source=None) -> Frame:
    """Step 3: e_S = tangent towards the head, e_A = ``anterior`` minus its e_S part,
    e_L = e_S x e_A.

    No Frenet frame (its normal flips at inflection points and twists the patches): the
    anterior axis of the scanner is projected onto the plane normal to the spine.
    """
    c = spine.points[spine.labels.index(label)]
    e_S = -spine.tangent(label)
    a = np.asarray(anterior, dtype=np.float64)
    e_A = a - (a @ e_S) * e_S
    norm = np.linalg.norm(e_A)
    if norm < 0.1:
        raise GeometryError(source, f"at {level_name(label)} the spine runs along the "
                                    "anterior-posterior axis: no anterior direction is defined")
    e_A = e_A / norm
    e_L = np.cross(e_S, e_A)
    return Frame(c, e_S, e_A, e_L)


def patch_affine(frame: Frame, size: int = PATCH_SIZE,
                 spacing: float = PATCH_SPACING) -> np.ndarray:
    """Step 4: the 4x4 map patch index (i, j, k) -> world mm, voxel-centred on c.

    world = c + r_i (-e_S) + r_j (-e_A) + r_k e_L with r = (index - (size - 1) / 2) * spacing,
    so the patch centre (47.5, 47.5, 47.5) for size 96 lands exactly on c.
    """
    affine = np.eye(4)
    affine[:3, :3] = spacing * frame.axes
    affine[:3, 3] = frame.c - affine[:3, :3] @ np.full(3, (size - 1) / 2)
    return affine


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def voxel_coordinates(volume_affine: np.ndarray, affine: np.ndarray,
                      size: int = PATCH_SIZE) -> np.ndarray:
    """Continuous source-voxel indices of every patch voxel: float32 [3, size, size, size].

    source index = inverse(volume affine) @ patch affine @ (i, j, k, 1); the map is affine in
    (i, j, k), so each coordinate is a sum of three broadcast 1D ramps (cheap).
    """
    m = np.linalg.inv(volume_affine) @ affine
    idx = np.arange(size, dtype=np.float64)
    coords = np.empty((3, size, size, size), dtype=np.float32)
    for d in range(3):
        coords[d] = ((m[d, 3] + idx * m[d, 0])[:, None, None]
                     + (idx * m[d, 1])[None, :, None]
                     + (idx * m[d, 2])[None, None, :])
    return coords


def outside_field(coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Boolean [size^3]: the patch voxel lies outside the scan (beyond the outer voxel faces)."""
    upper = np.asarray(shape, dtype=np.float32)[:, None, None, None] - 0.5
    return np.any((coords < -0.5) | (coords > upper), axis=0)


def sample(volume: Volume, coords: np.ndarray, outside: np.ndarray, *, order: int,
           fill: float, prefiltered: bool = False) -> np.ndarray:
    """Step 5: one ``map_coordinates`` call; ``fill`` where the patch leaves the scan.

    Within half a voxel of the outer voxel centres the edge value is used (``mode="nearest"``);
    beyond the scan's faces, ``fill``. Order >= 1 returns float32, order 0 the input's dtype.
    Cubic (order 3) prefilters the whole volume unless ``prefiltered`` (done once per scan
    with ``scipy.ndimage.spline_filter(data, 3, mode="nearest")``).
    """
    data = volume.data
    out_dtype = np.float32 if order > 0 else data.dtype
    if order <= 1 or prefiltered:  # speed: sample from a contiguous copy of the patch's box
        corners = coords[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]].reshape(3, -1)
        shape = np.array(data.shape)
        lo = np.clip(np.floor(corners.min(1)).astype(int) - order - 1, 0, shape - 1)
        hi = np.clip(np.ceil(corners.max(1)).astype(int) + order + 2, lo + 1, shape)
        data = np.ascontiguousarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
        coords = coords - lo.astype(np.float32)[:, None, None, None]
    out = map_coordinates(data, coords, order=order, mode="nearest",
                          prefilter=order > 1 and not prefiltered, output=out_dtype)
    out[outside] = fill
    return out


def _to_int16(hu: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int16)
    return np.clip(np.rint(hu), info.min, info.max).astype(np.int16)


def _label_dtype(labels: np.ndarray) -> np.ndarray:
    """Label patches as uint8 when every label fits (VerSe: <= 28), else int16."""
    if labels.size == 0 or (labels.min() >= 0 and labels.max() <= 255):
        return labels.astype(np.uint8)
    return labels.astype(np.int16)


@dataclass
class Patch:
    """One straightened vertebra: arrays with axes (I, P, L) at ``spacing`` mm.

    ``ct`` int16 HU, ``mask`` vertebra labels and ``concepts`` concept labels (uint8, or int16
    if a label exceeds 255), each None when the source has no such volume; ``affine`` maps
    patch indices to world mm; ``out_of_field`` is the fraction of the patch outside the scan.
    """

    label: int
    frame: Frame
    affine: np.ndarray
    out_of_field: float
    ct: np.ndarray | None = None
    mask: np.ndarray | None = None
    concepts: np.ndarray | None = None

    @property
    def level(self) -> str:
        return level_name(self.label)


def straighten(ct: Volume | None, mask: Volume | None, centroids_world: Mapping[int, np.ndarray],
               label: int, size: int = PATCH_SIZE, spacing: float = PATCH_SPACING, *,
               concepts: Volume | None = None, ct_order: int = 1,
               ct_prefiltered: bool = False, anterior: np.ndarray = WORLD_A,
               spine: Spine | None = None) -> Patch:
    """Cut the straightened ``size``^3 patch of vertebra ``label`` (steps 1-5 above).

    ``ct``, ``mask`` and ``concepts`` share one voxel grid (any may be None, not all); the
    centroids are world mm (``Centroids.world(affine)``). Pass a prefitted ``spine`` to reuse
    one spline for all vertebrae of a scan. CT: ``ct_order`` (1 linear, 3 cubic) with -1024 HU
    outside (``ct_prefiltered``: ``ct.data`` already holds cubic spline coefficients, see
    :func:`sample`); labels: nearest, 0 outside; concepts: nearest,
    :data:`~vfcore.phantom.concepts.OUTSIDE_SCAN` outside.
    """
    volumes = [v for v in (ct, mask, concepts) if v is not None]
    if not volumes:
        raise ValueError("straighten needs at least one of ct, mask, concepts")
    ref = volumes[0]
    source = ref.path
    if spine is None:
        spine = fit_spine(centroids_world, source)
    if label not in spine.labels:
        raise GeometryError(source, f"no body centroid for {level_name(label)} (label {label})")
    frame = spine_frame(spine, label, anterior, source)
    affine = patch_affine(frame, size, spacing)
    coords = voxel_coordinates(ref.affine, affine, size)
    outside = outside_field(coords, ref.shape)
    patch = Patch(label, frame, affine, float(outside.mean()))
    if ct is not None:
        patch.ct = _to_int16(sample(ct, coords, outside, order=ct_order, fill=CT_FILL,
                                    prefiltered=ct_prefiltered))
    if mask is not None:
        patch.mask = _label_dtype(sample(mask, coords, outside, order=0, fill=0))
    if concepts is not None:  # outside the scan is a concept of its own, not "nothing"
        patch.concepts = _label_dtype(sample(concepts, coords, outside, order=0,
                                             fill=OUTSIDE_SCAN))
    return patch


def centroids_from_subreg(mask: Volume, subreg: Volume) -> dict[int, np.ndarray]:
    """Body centroids (world mm) as centres of mass of (mask == L) & (subreg == 50).

    For data with a subregion mask but no centroid JSON (e.g. TPTBox samples).
    """
    body = subreg.data == SUBREG_BODY
    labels = [int(lb) for lb in np.flatnonzero(np.bincount(mask.data[body].ravel())) if lb > 0]
    out = {}
    for lb, com in zip(labels, center_of_mass(body, mask.data * body, labels)):
        out[lb] = mask.affine[:3, :3] @ np.asarray(com) + mask.affine[:3, 3]
    return out


# --------------------------------------------------------------------------------------------
# One case -> patch files + completion record
# --------------------------------------------------------------------------------------------


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def source_files(case: Case) -> dict[str, Path]:
    """The files of a case that the patches are made from, by role."""
    roles = ("ct", "mask", "centroids", "subreg", "concepts")
    return {role: getattr(case, role) for role in roles if getattr(case, role) is not None}


def case_checksum(hashes: Mapping[str, str]) -> str:
    """One sha256 over the role:sha256 lines of a case's source files (manifest column)."""
    text = "".join(f"{role}:{hashes[role]}\n" for role in sorted(hashes))
    return hashlib.sha256(text.encode()).hexdigest()


def _params(size: int, spacing: float, ct_order: int) -> dict:
    return {"size": int(size), "spacing": float(spacing), "ct_order": int(ct_order),
            "method_version": METHOD_VERSION}


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _extract_case(case: Case, root: Path, out_dir: Path, params: dict) -> dict:
    """Straighten every non-cervical vertebra of one case into ``out_dir/<case_id>/``.

    Reads each source file once, writes the patches (atomic), removes files of an earlier
    extraction that are no longer produced, and writes ``case.json`` LAST: its presence means
    the case is complete. Returns the record.
    """
    case_dir = out_dir / case.case_id
    record_path = case_dir / RECORD_NAME
    hashes = {role: sha256_file(p) for role, p in source_files(case).items()}
    checksum = case_checksum(hashes)
    old = _read_record(record_path)
    if (old is not None and old.get("source_sha256") == checksum and old.get("params") == params
            and all((out_dir / v[k]).is_file() for v in old["vertebrae"]
                    for k in ("ct_path", "mask_path", "concept_path") if v[k])):
        _remove_partial(case_dir)
        return old
    if record_path.exists():
        record_path.unlink()  # redo: the case is incomplete until the new record lands
    case_dir.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_case(case)
        ref = next(v for v in (data.ct, data.mask, data.concepts) if v is not None)
        if data.centroids is not None:
            centroids = data.centroids.world(ref.affine)
        elif data.mask is not None and data.subreg is not None:
            warnings.warn("no centroid file: body centroids computed from the subregion mask "
                          "(label 50)")
            centroids = centroids_from_subreg(data.mask, data.subreg)
        else:
            raise GeometryError(case.ct or case.mask, "no centroid file (*_ctd.json) and no "
                                "subregion mask: the patches are centred on the body centroids")
        spine = fit_spine(centroids, case.centroids or case.subreg)
        ct = data.ct
        if ct is not None and params["ct_order"] > 1:  # cubic: spline coefficients once per scan
            ct = Volume(spline_filter(ct.data, order=params["ct_order"], mode="nearest",
                                      output=np.float32), ct.affine, ct.path)
        skipped = []
        if data.mask is not None:
            in_mask = {int(lb) for lb in np.flatnonzero(np.bincount(data.mask.data.ravel()))
                       if lb > 0}
            for lb in craniocaudal(in_mask - set(centroids)):
                skipped.append({"label": lb, "level": level_name(lb),
                                "reason": "mask label without a body centroid"})
        vertebrae, written = [], {RECORD_NAME}
        for lb in spine.labels:
            if lb in CERVICAL:
                skipped.append({"label": lb, "level": level_name(lb),
                                "reason": "cervical vertebra (C1-C7): excluded as in the paper"})
                continue
            patch = straighten(ct, data.mask, centroids, lb, params["size"],
                               params["spacing"], concepts=data.concepts,
                               ct_order=params["ct_order"], ct_prefiltered=True, spine=spine)
            files = {}
            for kind, array in (("ct", patch.ct), ("mask", patch.mask),
                                ("concept", patch.concepts)):
                if array is None:
                    files[f"{kind}_path"] = ""
                    continue
                name = f"{patch.level}_{kind}.npy"
                save_npy(case_dir / name, array)
                written.add(name)
                files[f"{kind}_path"] = f"{case.case_id}/{name}"
            f = patch.frame
            vertebrae.append({"label": lb, "level": patch.level, **files,
                              "out_of_field": round(patch.out_of_field, 6),
                              "c": f.c.tolist(), "e_S": f.e_S.tolist(), "e_A": f.e_A.tolist(),
                              "e_L": f.e_L.tolist()})
    order = craniocaudal([s["label"] for s in skipped])
    for stale in case_dir.iterdir():  # leftovers of an older extraction or a killed write
        if stale.name in written:
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    record = {"case": case.case_id, "patient": case.patient, "session": case.session,
              "release_split": case.release_split,
              "sources": {role: {"path": _relative(p, root), "sha256": hashes[role]}
                          for role, p in source_files(case).items()},
              "source_sha256": checksum, "params": params, "vertebrae": vertebrae,
              "skipped": sorted(skipped, key=lambda s: order.index(s["label"])),
              "warnings": sorted({str(w.message) for w in caught})}
    write_json(record_path, record)
    return record


def _remove_partial(folder: Path) -> None:
    """Delete temporaries that a killed ``vfcore.io`` write left behind (``.<name>.*.part*``)."""
    for stray in folder.glob(".*.part*"):
        if stray.is_file():
            stray.unlink()


def _extract_worker(case: Case, root: str, out_dir: str, params: dict) -> dict:
    """Process-pool entry point: a failure becomes a dict with the reason, never a crash."""
    try:
        return _extract_case(case, Path(root), Path(out_dir), params)
    except (VfcoreError, OSError, ValueError, MemoryError) as err:
        return {"case": case.case_id, "failed": f"{type(err).__name__}: {err}"}
    except Exception as err:  # keep the other scans going; the traceback tells what broke
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        return {"case": case.case_id, "failed": f"unexpected {tb}"}


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


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def _grade_table(root: Path, grades) -> pd.DataFrame | None:
    if isinstance(grades, pd.DataFrame):
        return grades
    if grades is not None:
        return read_grades(grades)
    for name in GRADE_TABLE_NAMES:
        if (root / name).is_file():
            return read_grades(root / name)
    return None


def _manifest_rows(record: dict, grades: dict | None) -> list[dict]:
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


def extract_patches(root: str | os.PathLike, run_dir: str | os.PathLike, *, workers: int = 1,
                    seed: int = 0, grades=None, size: int = PATCH_SIZE,
                    spacing: float = PATCH_SPACING, ct_order: int = 1,
                    fractions: Sequence[float] = (0.6, 0.2, 0.2), require_ct: bool = True,
                    progress: bool = True) -> pd.DataFrame:
    """Straighten every scan under ``root`` into ``<run_dir>/patches/``; returns the manifest.

    ``grades``: a grade table path or ``read_grades`` frame (default: ``<root>/
    fracture_grades.tsv`` if present); ``workers`` processes over scans (tqdm progress bar);
    ``fractions`` train/val/test for patients without an official VerSe split; ``seed`` fixes
    the split. Re-running skips cases whose ``case.json`` matches the sources' sha256 and the
    parameters; a failing scan is reported in ``report.json`` and does not stop the others.
    """
    from tqdm.auto import tqdm

    root, out_dir = Path(root), Path(run_dir) / "patches"
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial(out_dir)
    table = _grade_table(root, grades)
    cases = find_cases(root, require_ct=require_ct)
    params = _params(size, spacing, ct_order)

    failed, unique, seen = [], [], set()
    for case in cases:
        if case.case_id in seen:
            failed.append({"case": case.case_id, "reason": f"duplicate case id (also at "
                           f"another place in the root): {case.ct or case.mask}"})
            continue
        seen.add(case.case_id)
        unique.append(case)

    results: dict[str, dict] = {}
    jobs = [(c, str(root), str(out_dir), params) for c in unique]
    bar = tqdm(total=len(jobs), desc="straightening scans", unit="scan", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results[job[0].case_id] = _extract_worker(*job)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_extract_worker, *job): job[0].case_id for job in jobs}
            for future in cf.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()

    grade_rows = None if table is None else {
        (r["case"], int(r["label"])): r for r in table.to_dict("records")}
    rows, skipped, warned, records = [], [], [], []
    for case in unique:
        rec = results[case.case_id]
        if "failed" in rec:
            failed.append({"case": case.case_id, "reason": rec["failed"]})
            continue
        records.append(rec)
        rows.extend(_manifest_rows(rec, grade_rows))
        skipped.extend({"case": rec["case"], **s} for s in rec["skipped"])
        warned.extend({"case": rec["case"], "warning": w} for w in rec["warnings"])

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    has_fx = {}
    for patient, fx in zip(manifest["patient"], manifest["fracture"]):
        has_fx[patient] = has_fx.get(patient, False) or fx == 1
    for rec in records:  # patients whose every vertebra was skipped still get a split
        has_fx.setdefault(rec["patient"], False)
    fixed = {}
    for rec in records:
        official = _RELEASE_TO_SPLIT.get(rec.get("release_split") or "")
        if official:  # a patient in two releases goes to the later stage (no leakage)
            prev = fixed.get(rec["patient"])
            fixed[rec["patient"]] = max(filter(None, [prev, official]), key=SPLITS.index)
    split_of = patient_splits(has_fx, seed, fractions, fixed)
    manifest["split"] = manifest["patient"].map(split_of)
    write_manifest(out_dir / "manifest.csv", manifest)

    labelled = manifest[manifest["fracture"] != ""]
    report = {
        "root": str(root.resolve()), "params": params, "seed": seed,
        "fractions": list(fractions), "versions": _versions(),
        "cases": len(cases), "extracted": len(records), "vertebrae": len(manifest),
        "labelled": len(labelled), "fractured": int((labelled["fracture"] == 1).sum()),
        "splits": {s: {"patients": sum(1 for v in split_of.values() if v == s),
                       "vertebrae": int((manifest["split"] == s).sum()),
                       "fractured": int(((labelled["split"] == s)
                                         & (labelled["fracture"] == 1)).sum())}
                   for s in SPLITS},
        "failed": sorted(failed, key=lambda f: f["case"]),
        "skipped": skipped,
        "excluded": [{"case": r.case, "label": int(r.label), "level": r.level,
                      "reason": r.reason} for r in manifest.itertuples() if r.reason],
        "warnings": warned,
    }
    write_json(out_dir / "report.json", report)
    return read_manifest(out_dir / "manifest.csv")


def _versions() -> dict[str, str]:
    """Versions of what shapes the patches (``vfcore.io.versions`` would import torch and
    MONAI, which takes seconds and is not needed here)."""
    import platform

    import nibabel
    import scipy

    import vfcore

    return {"python": platform.python_version(), "vfcore": vfcore.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "nibabel": nibabel.__version__}


def write_manifest(path: Path, manifest: pd.DataFrame) -> None:
    """CSV with :data:`MANIFEST_COLUMNS`, written atomically (deterministic bytes)."""
    from vfcore.io import atomic_write

    with atomic_write(path, "w") as f:
        manifest.to_csv(f, index=False, columns=MANIFEST_COLUMNS, lineterminator="\n")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest with typed columns: ``fracture``/``grade``/``shape`` nullable Int64."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("label",):
        df[col] = df[col].astype(int)
    for col in ("fracture", "grade", "shape"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["out_of_field"] = df["out_of_field"].astype(float)
    return df
