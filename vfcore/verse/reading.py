"""Read the files of one scan: CT in HU, label masks, centroid JSON; open a whole case.

The paper (Engstler, Keicher et al. 2022, Sec. 3) cuts one patch per vertebra "centered on the
vertebral body"; this module gives :mod:`vfcore.patches` the CT in Hounsfield units, the
vertebra labels and the body centroids c (voxel indices; world mm through the affine), and
refuses any file it cannot read correctly with a typed :mod:`vfcore.errors` exception that
names the file.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import apply_read_scaling

from vfcore.errors import CorruptFileError, DataValueError, FormatError, GeometryError, LabelError
from vfcore.checks import regular_file
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


#: Largest voxel array a file reader allocates, checked against the header BEFORE reading the
#: voxels (the stored payload, and the array returned: float32 for a CT): 4 GiB, above the
#: largest VerSe scans (512 x 512 x ~1,000 int16 voxels: 0.5 GiB stored, 1 GiB as float32).
NIFTI_MAX_BYTES = 4 << 30
#: Largest upload :func:`read_nifti_bytes` accepts (the file itself, the voxel payload its
#: header claims, the array returned): 64 MiB, room for a 256^3 float32 crop; a vertebra
#: patch is 96^3 voxels (3.4 MiB as float32).
UPLOAD_MAX_BYTES = 64 << 20
#: Decompressed bytes a .nii.gz may hold past the end its header claims before it is refused.
GZIP_SLACK_BYTES = 1 << 20
#: Largest NIfTI extension block (bytes between the header and ``vox_offset``).
_MAX_EXTENSIONS = 16 << 20
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, gzip.BadGzipFile)


def _read_up_to(stream: BinaryIO, out: memoryview) -> int:
    """Fill ``out`` from ``stream`` in 1 MiB chunks; returns the bytes read (short at the end)."""
    got = 0
    while got < len(out):
        n = stream.readinto(out[got:got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _decode_nifti(name: str | Path, stream: BinaryIO, present: int | None, gzipped: bool,
                  max_bytes: int, out_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Header first, sizes checked, then the voxels: (values, scl_slope/inter applied; affine).

    ``present``: bytes in an uncompressed file (None for a gzip stream, where the voxels are
    counted as they are decompressed and reading stops :data:`GZIP_SLACK_BYTES` past the end the
    header claims). The payload the header claims (shape x dtype) and the array the caller
    makes of it (``out_dtype``: float32 for a CT, int16 for a mask) must fit ``max_bytes``;
    nothing larger is allocated.
    """
    head = bytearray(540)
    got = _read_up_to(stream, memoryview(head)[:4])
    sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} if got == 4 else set()
    if 348 in sizes:
        header_class, n_head = nib.Nifti1Header, 348
    elif 540 in sizes:
        header_class, n_head = nib.Nifti2Header, 540
    else:
        raise CorruptFileError(name, "not a NIfTI-1/2 file (its first 4 bytes are not the header "
                                     "size 348 or 540)")
    got += _read_up_to(stream, memoryview(head)[4:n_head])
    if got < n_head:
        raise CorruptFileError(name, f"holds {got} bytes, less than the {n_head}-byte NIfTI header")
    try:
        raw_header = header_class.from_fileobj(io.BytesIO(bytes(head[:n_head])), check=False)
        for field in ("scl_slope", "scl_inter"):   # NaN means "unset" (nibabel writes it); inf not
            if math.isinf(float(raw_header[field])):
                raise DataValueError(name, f"{field} is {float(raw_header[field])}: the scaled "
                                           "values would not be finite")
        header = header_class.from_fileobj(io.BytesIO(bytes(head[:n_head])), check=True)
        shape = tuple(int(d) for d in header.get_data_shape())
        dtype = header.get_data_dtype()
        slope, inter = header.get_slope_inter()
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except (HeaderDataError, ValueError, TypeError, KeyError) as err:
        raise CorruptFileError(name, f"bad NIfTI header: {type(err).__name__}: {err}") from err
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        raise FormatError(name, f"header magic {magic!r}: a .hdr/.img pair, "
                                "not a single-file NIfTI (.nii or .nii.gz)")
    if len(shape) != 3:
        raise FormatError(name, f"expected a 3D image, got shape {shape}")
    _check_header(name, raw_header, shape, dtype)
    voxels = math.prod(shape)
    payload = voxels * dtype.itemsize
    out_dtype = np.dtype(out_dtype)
    returned = voxels * out_dtype.itemsize
    if max(payload, returned) > max_bytes:
        raise FormatError(name, f"header claims shape {list(shape)} of {dtype} = {payload:,} bytes "
                                f"({returned:,} bytes as {out_dtype}), more than the limit of "
                                f"{max_bytes:,} bytes: refused before allocating")
    offset = int(header.get_data_offset())
    if not n_head <= offset <= n_head + _MAX_EXTENSIONS:
        raise CorruptFileError(name, f"vox_offset {offset} is not between {n_head} and "
                                     f"{n_head + _MAX_EXTENSIONS}")
    claimed = offset + payload
    if present is not None and present < claimed:
        raise CorruptFileError(name, f"holds {present:,} bytes but its header claims {claimed:,} "
                                     f"(shape {list(shape)} of {dtype}): truncated, or a false header")
    skipped = _read_up_to(stream, memoryview(bytearray(offset - n_head)))
    try:  # the OS commits the pages only as they are filled: a false header costs nothing
        buffer = np.empty(payload, dtype=np.uint8)
    except MemoryError:
        raise FormatError(name, f"header claims {payload:,} bytes of voxels, more than this "
                                "machine can allocate") from None
    got += skipped + _read_up_to(stream, memoryview(buffer))
    if got < claimed:
        raise CorruptFileError(name, f"decompresses to {got:,} bytes but its header claims "
                                     f"{claimed:,} (shape {list(shape)} of {dtype}): truncated, "
                                     "or a false header")
    if gzipped:
        extra = len(stream.read(GZIP_SLACK_BYTES + 1))
        if extra > GZIP_SLACK_BYTES:
            raise FormatError(name, f"decompresses to more than {claimed + GZIP_SLACK_BYTES:,} "
                                    f"bytes but its header claims {claimed:,}: refused (a gzip bomb?)")
    data = buffer.view(dtype).reshape(shape, order="F")
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return apply_read_scaling(data, slope, inter), affine


def _check_header(name, header, shape, dtype: np.dtype) -> None:
    """Refuse, from the header alone, what no reader should turn into a volume: a voxel type
    that is not one real number (RGB, complex), an empty volume, a zero, negative or
    non-finite voxel size (the scaling is checked as the header is read)."""
    if dtype.names is not None or dtype.kind not in "biuf":
        kind = "RGB/structured" if dtype.names is not None else {
            "c": "complex"}.get(dtype.kind, dtype.kind)
        raise FormatError(name, f"voxel type {dtype} ({kind}) is not one real number per voxel: "
                          f"a CT or mask must be stored as integers or floats")
    if min(shape) < 1:
        raise FormatError(name, f"empty volume: shape {list(shape)}")
    zooms = [float(z) for z in header["pixdim"][1:4]]   # as stored (nibabel's check sets 0 to 1)
    if not all(math.isfinite(z) and z != 0 for z in zooms):
        raise GeometryError(name, f"voxel size (pixdim) {zooms} mm: every voxel size must be a "
                            f"finite number other than 0")


def _check_affine(name, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise GeometryError(name, f"the affine is singular or not finite:\n{affine}")


def _load_nifti(path: Path, dtype=None, max_bytes: int = NIFTI_MAX_BYTES
                ) -> tuple[np.ndarray, np.ndarray]:
    """Voxel values (scl_slope/scl_inter applied) and the affine of a .nii or .nii.gz file.

    ``dtype=None`` keeps the stored integer type when the file has no scaling (a uint8 mask
    stays uint8: VerSe scans reach 512 x 512 x 1000 voxels, so float64 copies matter). The
    header's claimed size is checked against the file and ``max_bytes`` before any voxel is
    read (:func:`_decode_nifti`).
    """
    path = Path(path)
    _require_file(path, "NIfTI")
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=raw) as stream:
                    data, affine = _decode_nifti(path, stream, None, True, max_bytes, dtype or np.int16)
            else:
                present = os.fstat(raw.fileno()).st_size
                data, affine = _decode_nifti(path, raw, present, False, max_bytes, dtype or np.int16)
    except _READ_ERRORS as err:
        raise CorruptFileError(path, f"cannot read NIfTI (truncated or corrupt?): "
                                     f"{type(err).__name__}: {err}") from err
    _check_affine(path, affine)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, affine


def _require_file(path: Path, what: str) -> None:
    """:class:`CorruptFileError` for a missing file or a folder where a file is expected."""
    if path.is_dir():
        raise CorruptFileError(path, f"is a folder, not a {what} file")
    if path.exists() and not path.is_file():   # a FIFO or a device would block or never end
        regular_file(path, None, None, f"{what} file")
    if not path.is_file():
        raise CorruptFileError(path, f"no such {what} file")


def read_nifti_bytes(name: str, content: bytes, max_bytes: int = UPLOAD_MAX_BYTES) -> Volume:
    """An in-memory NIfTI (``.nii`` or ``.nii.gz`` bytes, e.g. an upload) -> :class:`Volume`.

    ``data`` holds the stored values with scl_slope/scl_inter applied, ``path`` is ``name``.
    The same checks as the file readers, against :data:`UPLOAD_MAX_BYTES` by default: the
    upload itself, the payload its header claims, that payload as float32 (what a patch
    becomes) and the decompressed stream must fit ``max_bytes`` (:class:`FormatError`), and a header claiming more voxels than the bytes
    present is :class:`CorruptFileError`; both messages name ``name`` and both sizes.
    """
    content = bytes(content)
    if len(content) > max_bytes:
        raise FormatError(name, f"is {len(content):,} bytes, more than the upload limit of "
                                f"{max_bytes:,} bytes")
    gzipped = content[:2] == _GZIP_MAGIC
    try:
        with io.BytesIO(content) as raw:
            if gzipped:
                with gzip.GzipFile(fileobj=raw) as stream:
                    data, affine = _decode_nifti(name, stream, None, True, max_bytes, np.float32)
            else:
                data, affine = _decode_nifti(name, raw, len(content), False, max_bytes, np.float32)
    except _READ_ERRORS as err:
        raise CorruptFileError(name, f"cannot read NIfTI (truncated or corrupt?): "
                                     f"{type(err).__name__}: {err}") from err
    _check_affine(name, affine)
    return Volume(data, affine, Path(name))


def _check_finite(path: Path, data: np.ndarray) -> None:
    if data.dtype.kind != "f":
        return
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataValueError(path, f"{int(bad.sum())} voxels are NaN or inf (first at index "
                                   f"{first})")


def read_ct(path: str | os.PathLike, *, max_bytes: int = NIFTI_MAX_BYTES) -> Volume:
    """CT in Hounsfield units as float32 (scl_slope/scl_inter honoured, e.g. uint8 storage).

    Raises :class:`CorruptFileError` (missing, unreadable or truncated file, a header that
    claims more voxels than the file holds), :class:`FormatError` (not 3D, larger than
    ``max_bytes``) and :class:`DataValueError` (NaN/inf).
    """
    path = Path(path)
    data, affine = _load_nifti(path, dtype=np.float32, max_bytes=max_bytes)
    _check_finite(path, data)
    return Volume(data, affine, path)


def read_mask(path: str | os.PathLike,
              valid: Iterable[int] | None = VERTEBRA_LABELS, *,
              max_bytes: int = NIFTI_MAX_BYTES) -> Volume:
    """Label mask as int16 after rounding (VerSe masks are sometimes stored as float64).

    ``valid`` is the set of allowed labels (default: 0 and the VerSe vertebra labels; pass
    :data:`SUBREG_LABELS` for subregion masks, ``None`` for no check). Values that are not
    within 0.01 of an integer (a mask resampled with linear interpolation) raise
    :class:`DataValueError`; labels outside ``valid`` raise :class:`LabelError`. Sizes are
    checked as in :func:`read_ct`.
    """
    path = Path(path)
    data, affine = _load_nifti(path, max_bytes=max_bytes)
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


def read_subreg(path: str | os.PathLike, *, max_bytes: int = NIFTI_MAX_BYTES) -> Volume:
    """Subregion mask (labels 41-49 posterior parts, 50 vertebral body), see :func:`read_mask`."""
    return read_mask(path, valid=SUBREG_LABELS, max_bytes=max_bytes)


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


#: Largest JSON file read (centroids, download records): real centroid files are ~1 kB.
JSON_MAX_BYTES = 16 << 20


def read_small_json(path: str | os.PathLike, what: str = "JSON", max_bytes: int = JSON_MAX_BYTES):
    """Parse a small JSON file; :class:`CorruptFileError` for a missing, oversized, undecodable
    or too deeply nested file (``json`` recurses: 100,000 nested lists exhaust the stack)."""
    path = Path(path)
    _require_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise FormatError(path, f"{what} of {size:,} bytes is larger than the limit of "
                                f"{max_bytes:,} bytes")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(path, f"not valid JSON: {err}") from err
    except RecursionError:
        raise CorruptFileError(path, "not readable JSON: nested too deeply") from None


def read_centroids(path: str | os.PathLike, reference: Volume | None = None) -> Centroids:
    """Read a VerSe centroid JSON: ``[{"direction": [..]}, {"label": L, "X":, "Y":, "Z":}, ..]``.

    X, Y, Z are continuous voxel indices; NaN entries are skipped. With a ``reference`` image,
    ``direction`` must equal ``nib.aff2axcodes(reference.affine)`` and every point must lie
    inside ``reference.shape`` (:class:`GeometryError` otherwise).
    """
    path = Path(path)
    entries = read_small_json(path, "centroid JSON")
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
        if (isinstance(label, bool) or not isinstance(label, (int, float))
                or not math.isfinite(label) or float(label) != int(label)):
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
    if mask is not None and centroids is not None:
        check_mask_labels(mask, centroids)
    return CaseData(case, ct, mask, centroids, subreg, concepts)


def check_mask_labels(mask: Volume, centroids: Centroids) -> None:
    """Each centroid must not lie inside another vertebra's label (:class:`GeometryError`
    naming both labels: the patch would be straightened around the wrong vertebra)."""
    upper = np.array(mask.shape) - 1
    wrong = []
    for label, xyz in sorted(centroids.voxel.items()):
        i, j, k = np.clip(np.rint(xyz).astype(int), 0, upper)
        found = int(mask.data[i, j, k])
        if found not in (0, label):
            wrong.append(f"{level_name(label)} (label {label}) lies in {level_name(found)} "
                         f"(label {found})")
    if wrong:
        raise GeometryError(centroids.path, f"centroids do not match the mask {mask.path}: "
                            f"{'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
