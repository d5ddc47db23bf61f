"""Spline-straightened 96^3 vertebra patches and the run's patch store.

The paper (Engstler, Keicher et al. 2022, Sec. 3, "Data Preparation") feeds the network one
vertebra at a time: a 96 x 96 x 96 patch at 1 mm, centred on the vertebral body and oriented
along a spline through the vertebral centroids. The sub-package, one step a module (every
name is importable from ``vfcore.patches``):

* :mod:`~vfcore.patches.geometry`: the spine spline, the local frame, one interpolation per
  patch (:func:`fit_spine`, :func:`spine_frame`, :func:`straighten`);
* :mod:`~vfcore.patches.store`: every scan of a root into the run's patch store, resumable,
  checked, surviving dying workers (:func:`extract_patches`);
* :mod:`~vfcore.patches.manifest`: the manifest, the patient-level split, the grade table
  (:func:`read_manifest`, :func:`patient_splits`).
"""
from vfcore.constants import PATCH_SIZE, PATCH_SPACING
from vfcore.io import save_npy

from .geometry import (CERVICAL, CT_FILL, WORLD_A, WORLD_S, Frame, Patch, Spine,
                       centroids_from_subreg, fit_spine, outside_field, patch_affine, sample,
                       spine_frame, straighten, voxel_coordinates)
from .manifest import (DISSECT_SPLIT, MANIFEST_COLUMNS, SPLIT_TABLE, SPLITS, read_split_table, find_grade_table,
                       patient_splits, read_manifest, write_manifest)
from .store import (KILL_ENV, METHOD_VERSION, RECORD_NAME, case_checksum, damaged_patch,
                    extract_patches, source_files)

__all__ = [
    "PATCH_SIZE", "PATCH_SPACING", "CERVICAL", "CT_FILL", "WORLD_A", "WORLD_S", "Frame", "Patch",
    "Spine", "centroids_from_subreg", "fit_spine", "outside_field", "patch_affine", "sample",
    "spine_frame", "straighten", "voxel_coordinates", "DISSECT_SPLIT", "SPLIT_TABLE", "read_split_table", "MANIFEST_COLUMNS",
    "SPLITS", "find_grade_table", "patient_splits", "read_manifest", "write_manifest",
    "KILL_ENV", "METHOD_VERSION", "RECORD_NAME", "case_checksum", "damaged_patch",
    "extract_patches", "source_files", "save_npy",
]
