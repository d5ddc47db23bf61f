"""Activations on the 96^3 patch: upsampling, masks, best slice, NIfTI exports, concept overlap."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vfcore.constants import AIR_HU, PATCH_SIZE, PATCH_SPACING
from vfcore.io import atomic_save
from vfcore.patches import RECORD_NAME, Frame, patch_affine
from vfcore.run import RunFolder

from .quantile import M_k

__all__ = ["VIEWS", "upsample_to_patch", "patch_mask", "best_slice", "canonical_patch_affine",
           "patch_world_affine", "write_nifti_exemplar", "concept_group", "concept_overlap",
           "vertebra_overlap"]

#: The shape of a stored patch (``vfcore.constants.PATCH_SIZE`` per axis).
PATCH_SHAPE = (PATCH_SIZE,) * 3
#: Patch axes are (I, P, L) (``vfcore.patches``); a view keeps one axis fixed (as the explorer).
VIEWS: dict[str, int] = {"sagittal": 2, "coronal": 1, "axial": 0}


def upsample_to_patch(A: np.ndarray, field: Sequence[slice],
                      patch_shape: Sequence[int] = PATCH_SHAPE) -> np.ndarray:
    """Activation maps [..., d, h, w] -> [..., *patch_shape] float32.

    Trilinear interpolation with ``align_corners=False`` onto the region of the patch that the
    network input covers (``field``, e.g. the centre 64^3 crop ``slice(16, 80)`` per axis): a
    feature voxel then sits at the centre of the input block it summarises. Zero outside the
    field (the network never saw it). All-zero maps stay all-zero (no normalisation, no NaN).
    """
    a = torch.as_tensor(np.asarray(A, dtype=np.float32))
    lead = a.shape[:-3]
    size = tuple(int(s.stop - s.start) for s in field)
    up = F.interpolate(a.reshape(-1, 1, *a.shape[-3:]), size=size, mode="trilinear",
                       align_corners=False).reshape(*lead, *size).numpy()
    out = np.zeros((*lead, *patch_shape), dtype=np.float32)
    out[(Ellipsis, *field)] = up
    return out


def blocks_on_patch(A: np.ndarray, field: Sequence[slice], patch_shape: Sequence[int] = PATCH_SHAPE) -> np.ndarray:
    """A map on a coarser grid [..., d, h, w] -> [..., *patch_shape] float32: each voxel becomes
    the block of ``field`` it covers (nearest-neighbour upsampling), zero outside the field.
    Used for masks M_k (:func:`patch_mask`) and for input-grid maps such as gradients."""
    a = torch.as_tensor(np.asarray(A, dtype=np.float32))
    lead = a.shape[:-3]
    size = tuple(int(s.stop - s.start) for s in field)
    up = F.interpolate(a.reshape(-1, 1, *a.shape[-3:]), size=size, mode="nearest")
    out = np.zeros((*lead, *patch_shape), dtype=np.float32)
    out[(Ellipsis, *field)] = up.reshape(*lead, *size).numpy()
    return out


def patch_mask(M: np.ndarray, field: Sequence[slice], patch_shape: Sequence[int] = PATCH_SHAPE) -> np.ndarray:
    """M_k on the patch: each feature voxel of the mask M_k(x) = A_k(x) > T_k [..., d, h, w]
    becomes the block of the field it summarises (:func:`blocks_on_patch`: 8^3 mm blocks for
    down_tr512 of either preset); False outside the field.

    Why not NetDissect's "upsample A_k, then threshold at T_k": interpolation lowers a peak
    that lies only just above T_k (most of a unit's tail does), so masks vanish; on the small
    preset most exemplar masks were lost that way. The smooth upsampled activation is still
    what the figures colour inside the mask.
    """
    return blocks_on_patch(M, field, patch_shape) > 0.5


def best_slice(up: np.ndarray, T: float, view: str = "sagittal", mask: np.ndarray | None = None) -> int:
    """The slice of ``view`` where the unit's thresholded activation is largest: the paper
    shows "a single slice with high activation (after thresholding)".

    ``up``: the upsampled activation; the thresholded part is ``up`` inside ``mask`` (the
    upsampled M_k, :func:`patch_mask`) or, without a mask, where ``up > T``. Nothing
    thresholded: the slice with the largest activation sum; an all-zero map: the middle slice.
    """
    axis = VIEWS[view]
    other = tuple(a for a in range(up.ndim) if a != axis)
    a = np.asarray(up, dtype=np.float64)
    inside = M_k(a, T) if mask is None else np.asarray(mask, dtype=bool)
    for score in (np.where(inside, np.maximum(a, 0.0), 0.0).sum(axis=other),
                  inside.sum(axis=other).astype(np.float64), np.abs(a).sum(axis=other)):
        if np.any(score > 0):
            return int(np.argmax(score))
    return up.shape[axis] // 2


def canonical_patch_affine(shape: Sequence[int] = PATCH_SHAPE, spacing: float = 1.0) -> np.ndarray:
    """World affine of a patch in its own frame: axes (I, P, L) at ``spacing`` mm, centre at 0.

    Used when the patch store does not record where the vertebra was in the scan; every
    export of one patch shares it, so CT, activation and masked CT overlay in any viewer.
    """
    axes = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]).T  # columns I, P, L (RAS+)
    affine = np.eye(4)
    affine[:3, :3] = spacing * axes
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return affine


def patch_world_affine(run_dir: str | Path, case: str, label: int) -> np.ndarray:
    """The patch's affine in the original scan's world (``vfcore.patches.patch_affine`` of the
    frame recorded in ``<run>/patches/<case>/case.json``), so exports also overlay the source
    CT; :func:`canonical_patch_affine` when the record is missing."""
    record = RunFolder(run_dir).patch(str(case)) / RECORD_NAME
    try:
        rec = json.loads(record.read_text())
        v = next(v for v in rec["vertebrae"] if int(v["label"]) == int(label))
        frame = Frame(*(np.asarray(v[k], dtype=np.float64) for k in ("c", "e_S", "e_A", "e_L")))
        params = rec.get("params", {})
        return patch_affine(frame, params.get("size", PATCH_SIZE), params.get("spacing", PATCH_SPACING))
    except (OSError, ValueError, KeyError, StopIteration):
        return canonical_patch_affine()


def write_nifti_exemplar(folder: str | Path, stem: str, ct: np.ndarray, activation: np.ndarray,
                         T: float, affine: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Path]:
    """Three NIfTI files sharing one affine (1 mm; qform and sform set): the CT patch (int16
    HU), the unit's upsampled activation (float32) and the CT inside the unit's mask (``mask``,
    the upsampled M_k; default ``activation > T``), air elsewhere. Written atomically; never NaN."""
    act = np.nan_to_num(np.asarray(activation, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ct = np.asarray(ct).astype(np.int16)
    inside = M_k(act, T) if mask is None else np.asarray(mask, dtype=bool)
    volumes = {"ct": ct, "activation": act, "masked_ct": np.where(inside, ct, AIR_HU).astype(np.int16)}
    paths = {}
    for kind, data in volumes.items():
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        path = Path(folder) / f"{stem}_{kind}.nii.gz"
        paths[kind] = atomic_save(path, lambda tmp, img=img: nib.save(img, tmp), suffix=".nii.gz")
    return paths


def concept_group(value: int, names: Mapping[int, str]) -> str:
    """Name of a concept-mask value: discs (100 + L normal, 150 + L degenerated) are grouped."""
    value = int(value)
    if value >= 150:
        return "degenerated disc"
    if value >= 100:
        return "intervertebral disc"
    return names.get(value, f"concept {value}")


def concept_overlap(mask: np.ndarray, concepts: np.ndarray, names: Mapping[int, str],
                    field: Sequence[slice] | None = None) -> pd.DataFrame:
    """What a unit's mask covers, measured against a ground-truth concept mask (the phantom).

    ``mask`` bool (the unit's mask on the patch, :func:`patch_mask`), ``concepts`` the concept
    labels of the same patch. Per concept name: ``fraction`` = |mask & C| / |mask| (how much of
    what the unit marks is C), ``iou`` = |mask & C| / |mask | C|, ``share`` = |C| / |field|
    (how much of what the network sees is C) and ``lift`` = fraction / share (above 1: the unit
    prefers C to a random block of the field; a mask block is 8-16 mm wide, so fractions are
    diluted and the lift tells more). C is restricted to ``field``, the part of the patch the
    network sees (and so is the mask). Sorted by fraction; empty for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    concepts = np.asarray(concepts)
    visible = np.zeros(mask.shape, dtype=bool)
    visible[tuple(field) if field is not None else ...] = True
    concepts = np.where(visible, concepts, 0)
    mask = mask & visible
    total = int(mask.sum())
    rows = []
    if total:
        groups: dict[str, np.ndarray] = {}
        for value in np.unique(concepts):
            name = "background" if value == 0 else concept_group(value, names)
            groups[name] = groups.get(name, np.zeros(mask.shape, dtype=bool)) | (concepts == value)
        n_visible = int(visible.sum())
        for name, c in groups.items():
            inter = int((mask & c).sum())
            if inter:
                share = int((c & visible).sum()) / n_visible
                rows.append({"concept": name, "fraction": inter / total,
                             "iou": inter / int((mask | c).sum()), "share": share,
                             "lift": inter / total / share})
    table = pd.DataFrame(rows, columns=["concept", "fraction", "iou", "share", "lift"])
    return table.sort_values(["fraction", "concept"], ascending=[False, True]).reset_index(drop=True)


def vertebra_overlap(mask: np.ndarray, vertebrae: np.ndarray, label: int) -> dict[str, float]:
    """Fractions of a unit's mask on the target vertebra, the adjacent ones and outside bone
    (``vertebrae`` = the patch's vertebra label mask)."""
    mask = np.asarray(mask, dtype=bool)
    total = int(mask.sum())
    if not total:
        return {"target": 0.0, "adjacent": 0.0, "outside": 0.0}
    v = np.asarray(vertebrae)[mask]
    return {"target": float((v == label).mean()), "adjacent": float(((v != label) & (v > 0)).mean()),
            "outside": float((v == 0).mean())}
