"""Uploaded vertebra patches (``.nii``, ``.nii.gz``, ``.npy``) -> a 96^3 HU patch in (I, P, L)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from vfcore.constants import AIR_HU, PATCH_SIZE
from vfcore.errors import InputError, VfcoreError
from vfcore.verse import UPLOAD_MAX_BYTES, read_nifti_bytes

PATCH_SHAPE = (PATCH_SIZE,) * 3
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".npy")


def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii", ".npy"):
        if lower.endswith(suffix):
            return suffix
    return Path(lower).suffix


def _reorient_to_ipl(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder/flip a NIfTI volume so its array axes point (I, P, L), like the patch store."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("I", "P", "L")))
    return apply_orientation(data, transform)


def _read_npy(name: str, content: bytes) -> np.ndarray:
    """A ``.npy`` upload, its header's shape x dtype checked against the bytes present and
    :data:`~vfcore.verse.UPLOAD_MAX_BYTES` before the array is made (never unpickled)."""
    if len(content) > UPLOAD_MAX_BYTES:
        raise InputError(name, f"is {len(content):,} bytes, more than the upload limit of "
                               f"{UPLOAD_MAX_BYTES:,} bytes")
    buf = io.BytesIO(content)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(buf)
    except ValueError as exc:
        raise InputError(name, f"cannot be read as .npy ({exc})") from None
    claimed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    present = len(content) - buf.tell()
    if claimed > UPLOAD_MAX_BYTES or claimed * 4 // max(dtype.itemsize, 1) > UPLOAD_MAX_BYTES:
        raise InputError(name, f"its header claims {claimed:,} bytes of data, more than the upload "
                               f"limit of {UPLOAD_MAX_BYTES:,} bytes")
    if claimed > present:
        raise InputError(name, f"its header claims {claimed:,} bytes of data but only {present:,} "
                               f"are present (truncated)")
    return np.load(io.BytesIO(content), allow_pickle=False)


def read_upload(name: str, content: bytes, min_shape: Sequence[int]) -> np.ndarray:
    """An uploaded vertebra patch (``.nii``, ``.nii.gz``, ``.npy``) -> float32 HU (I, P, L),
    centre-cropped or padded with air to 96^3 (the patch store's size).

    NIfTI volumes are reoriented to (I, P, L) with their affine; ``.npy`` arrays are taken to
    be in (I, P, L) already. Raises :class:`~vfcore.errors.InputError` for another format,
    an unreadable file, a volume that is not 3D, smaller than the network input
    (``min_shape``), or with NaN/inf values.
    """
    suffix = _suffix(name)
    if suffix not in UPLOAD_SUFFIXES:
        raise InputError(name, f"not a NIfTI or NumPy file (expected {', '.join(UPLOAD_SUFFIXES)})")
    content = bytes(content)
    try:
        if suffix == ".npy":
            data = _read_npy(name, content)
        else:  # bounded: the header's claimed size is checked before anything is allocated
            volume = read_nifti_bytes(name, content, UPLOAD_MAX_BYTES)
            data = volume.data
            if data.ndim == 3:
                data = _reorient_to_ipl(data, volume.affine)
    except VfcoreError as exc:
        raise InputError(name, f"cannot be read as {suffix}: {exc.problem}") from None
    except InputError:
        raise
    except Exception as exc:  # truncated gzip, bad header, pickled npy, ...
        raise InputError(name, f"cannot be read as {suffix} ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iuf" or data.dtype.names:
        raise InputError(name, f"holds {getattr(data, 'dtype', type(data))}, not a numeric volume")
    if data.ndim != 3:
        raise InputError(name, f"is {data.ndim}D with shape {tuple(data.shape)}; a 3D vertebra patch is needed")
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(name, f"contains {bad} NaN or infinite values")
    if any(s < m for s, m in zip(data.shape, min_shape)):
        raise InputError(
            name, f"shape {tuple(data.shape)} is smaller than the network input {tuple(min_shape)}")
    return fit_to_patch(data)


def fit_to_patch(volume: np.ndarray, shape: Sequence[int] = PATCH_SHAPE, fill: float = AIR_HU) -> np.ndarray:
    """Centre-crop and/or pad (with ``fill``) a volume to ``shape``."""
    out = np.full(shape, fill, dtype=np.float32)
    src, dst = [], []
    for n, m in zip(volume.shape, shape):
        if n >= m:
            start = (n - m) // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:
            start = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


