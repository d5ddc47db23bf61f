"""The concept explorer of notebook 05: one vertebra, the units that carried its prediction.

The paper's single-inference system (Engstler, Keicher et al. 2022, Sec. 2.3 and 4.3,
Table 3): for an input x, rank the units k of the dissected layer by their relevance
r_k(x) = sum(M_k(x) * A_k(x)) (Eq. 2, with M_k(x) = A_k(x) > T_k), and show for each of the
most relevant units (i) its response on x and (ii) its general concept: its top-activating
samples from the data set (exemplars). We add what a student needs to *read* it: a slice
slider over the 96^3 patch in three views, the unit's rank by c_k (Eq. 1, true positives),
and a concept dictionary (unit -> label, note) saved to ``<run>/concepts.json``.

Three layers, each usable alone:

* pure drawing functions (:func:`take_slice`, :func:`render_slice`, :func:`png_bytes`):
  numpy in, numpy/PNG out; the geometry (``upsample_to_patch``, ``patch_mask``,
  ``best_slice``) and r_k (``relevance``, ``top_units``) come from :mod:`vfcore.dissect`, so
  the explorer shows the masks notebook 04 shows;
* :class:`RunData` (what the explorer needs from a run: thresholds T_k, c_k ranks, the test
  split with predictions, exemplars, and a function patch -> activations) and
  :class:`Analysis` (one sample: its patch, probability, r_k, top units and their
  activation maps upsampled to the patch *once*, so a slider step only slices arrays);
* :class:`Explorer`, the ipywidgets application, opened with :func:`explore`.

The slice on screen is a PNG in a ``widgets.Image`` (a slider step re-encodes one 288 x 288
PNG in a few ms; ``bench/bench_explorer.py`` measures it); exemplars are drawn with
matplotlib into an ``Output`` (``clear_output(wait=True)``). Every widget carries a CSS
class (``vf-...``, see :data:`CSS_CLASSES`) so tests can find it. Errors (bad upload, missing
or stale artifacts) go to the status line (``vf-status``); the kernel never sees them.
"""
from __future__ import annotations

import functools
import gzip
import html
import io
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from vfcore.dissect import (VIEWS, best_slice, concept_overlap, patch_mask, relevance, top_units,
                            upsample_to_patch, vertebra_overlap)
from vfcore.errors import InputError, VfcoreError
from vfcore.io import write_json
from vfcore.train import outcome_names

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

#: Display window in HU (a bone window: level 500, width 1500).
DISPLAY_WINDOW_HU: tuple[float, float] = (-250.0, 1250.0)
#: On-screen pixels per patch voxel (nearest neighbour): 96 voxels -> 288 px.
SCALE = 3
#: Overlay modes: the mask M_k filled (alpha-blended, coloured by the activation), its
#: outline, or none.
MODES = ("overlay", "contour", "off")
#: Inside M_k the colour runs from red (the smallest upsampled activation inside the mask on
#: this sample) to yellow (the largest): (255, 255 t, 0), t = (A_k - low) / (high - low).
OVERLAY_ALPHA = 0.5
CONTOUR_RGB = np.array([0.0, 255.0, 255.0])
#: How many units by r_k the explorer lists (paper, Table 3: ten).
TOP_UNITS = 10
#: Exemplars shown per unit (the paper's collages use 25; one row of five fits the widget).
N_EXEMPLARS = 5
#: Air, written where an uploaded patch is padded to 96^3 (as ``vfcore.patches``).
PAD_HU = -1024
PATCH_SHAPE = (96, 96, 96)
CONCEPTS_FILE = "concepts.json"
OUTCOMES = ("TP", "FP", "TN", "FN")
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".npy")

#: CSS classes of the explorer's widgets (stable names for tests and custom styling).
CSS_CLASSES = {
    "root": "vf-explorer",
    "status": "vf-status",
    "filter": "vf-filter",
    "sample": "vf-sample-select",
    "upload": "vf-upload",
    "prediction": "vf-prediction",
    "units": "vf-unit-select",
    "view": "vf-view-axis",
    "mode": "vf-mode",
    "slider": "vf-slice-slider",
    "image": "vf-image",
    "readout": "vf-readout",
    "unit_info": "vf-unit-info",
    "exemplars": "vf-exemplars",
    "exemplar_header": "vf-exemplar-header",
    "concept_label": "vf-concept-label",
    "concept_note": "vf-concept-note",
    "concept_save": "vf-concept-save",
    "concepts": "vf-concept-table",
}


# --------------------------------------------------------------------------------------------
# Drawing: pure functions (numpy in, numpy/PNG out)
# --------------------------------------------------------------------------------------------

def take_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """The 2D slice ``index`` of a (I, P, L) volume in a view (``vfcore.dissect.VIEWS``).

    ``np.take`` without transposing gives, as radiology viewers show them: sagittal = rows I
    (head up), columns P (anterior left); coronal = rows I, columns L (patient right on the
    left); axial = rows P (anterior up), columns L.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {list(VIEWS)}")
    return np.take(volume, int(index), axis=VIEWS[view])


def window_hu(hu: np.ndarray, window: tuple[float, float] = DISPLAY_WINDOW_HU) -> np.ndarray:
    """HU -> grey levels 0..255 (float), linear inside ``window``, clipped outside."""
    lo, hi = window
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with at least one 4-neighbour outside it (the image border counts
    as outside)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~interior


def render_slice(
    ct: np.ndarray,
    mask: np.ndarray | None = None,
    activation: np.ndarray | None = None,
    low: float = 0.0,
    high: float | None = None,
    mode: str = "overlay",
    scale: int = SCALE,
) -> np.ndarray:
    """One 2D slice as an RGB uint8 image: the CT in :data:`DISPLAY_WINDOW_HU`; inside ``mask``
    (M_k on this slice) a colour blended half and half over the CT (``overlay``: red where the
    upsampled ``activation`` is ``low``, yellow where it is ``high``; yellow without an
    activation) or the mask's outline in cyan (``contour``). Each voxel becomes
    ``scale x scale`` pixels."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    grey = window_hu(ct)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if mask is not None and mode != "off":
        mask = np.asarray(mask, dtype=bool)
        if mode == "overlay":
            t = np.ones(int(mask.sum()), dtype=np.float32)
            if activation is not None and high is not None and high > low:
                t = np.clip((np.asarray(activation)[mask] - low) / (high - low), 0.0, 1.0)
            colour = np.stack([np.full_like(t, 255.0), 255.0 * t, np.zeros_like(t)], axis=-1)
            rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colour
        else:
            rgb[mask_outline(mask)] = CONTOUR_RGB
    out = np.rint(rgb).astype(np.uint8)
    if scale != 1:
        out = np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)
    return out


def png_bytes(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode an RGB uint8 image as PNG (lossless, so a test can decode the exact pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> RGB uint8 array (the inverse of :func:`png_bytes`)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------------------------
# Inputs: uploaded patches and the concept dictionary
# --------------------------------------------------------------------------------------------

def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii", ".npy"):
        if lower.endswith(suffix):
            return suffix
    return Path(lower).suffix


def _reorient_to_ipl(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder/flip a NIfTI volume so its array axes point (I, P, L), like the patch store."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("I", "P", "L")))
    return apply_orientation(data, transform)


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
            data = np.load(io.BytesIO(content), allow_pickle=False)
        else:
            import nibabel as nib

            raw = gzip.decompress(content) if suffix == ".nii.gz" else content
            try:
                img = nib.Nifti1Image.from_bytes(raw)
            except Exception:
                img = nib.Nifti2Image.from_bytes(raw)
            data = np.asanyarray(img.dataobj)
            if data.ndim == 3:
                data = _reorient_to_ipl(data, img.affine)
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


def fit_to_patch(volume: np.ndarray, shape: Sequence[int] = PATCH_SHAPE, fill: float = PAD_HU) -> np.ndarray:
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


@dataclass
class ConceptBook:
    """The student's concept dictionary: unit -> {"label", "note"} for one checkpoint.

    Stored as ``<run>/concepts.json``: ``{"checkpoint_sha256": ..., "layer": ...,
    "units": {"17": {"label": "endplate", "note": "..."}, ...}}``. Edits live in memory
    until :meth:`save` (atomic); an unreadable file is never overwritten silently: it is
    kept as ``concepts.json.unreadable`` before the first save.
    """

    path: Path
    units: dict[int, dict[str, str]] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    layer: str | None = None
    problem: str | None = None  # why the file on disk could not be used (shown in the status)
    dirty: bool = False

    @classmethod
    def load(cls, path: str | Path, checkpoint_sha256: str | None = None, layer: str | None = None) -> "ConceptBook":
        path = Path(path)
        book = cls(path=path, checkpoint_sha256=checkpoint_sha256, layer=layer)
        if not path.exists():
            return book
        try:
            doc = json.loads(path.read_text())
            units = {int(k): {"label": str(v.get("label", "")), "note": str(v.get("note", ""))}
                     for k, v in doc.get("units", {}).items()}
        except (ValueError, AttributeError, TypeError) as exc:
            book.problem = f"{path}: unreadable concept dictionary ({exc}); it is kept and not overwritten"
            return book
        book.units = units
        saved_for = doc.get("checkpoint_sha256")
        if checkpoint_sha256 and saved_for and saved_for != checkpoint_sha256:
            book.problem = (f"{path}: these labels were written for another checkpoint "
                            f"({saved_for[:12]}...); unit numbers may mean other concepts now")
        return book

    def get(self, unit: int) -> dict[str, str]:
        return self.units.get(int(unit), {"label": "", "note": ""})

    def set(self, unit: int, label: str | None = None, note: str | None = None) -> None:
        entry = dict(self.get(unit))
        if label is not None:
            entry["label"] = label
        if note is not None:
            entry["note"] = note
        if entry != self.get(unit):
            if entry["label"] or entry["note"]:
                self.units[int(unit)] = entry
            else:
                self.units.pop(int(unit), None)
            self.dirty = True

    def save(self) -> Path:
        """Write atomically; an unreadable previous file is moved aside first."""
        if self.problem and "unreadable" in self.problem and self.path.exists():
            aside = self.path.with_name(self.path.name + ".unreadable")
            self.path.replace(aside)
            self.problem = None
        doc = {
            "checkpoint_sha256": self.checkpoint_sha256,
            "layer": self.layer,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "units": {str(k): v for k, v in sorted(self.units.items())},
        }
        write_json(self.path, doc)
        self.dirty = False
        return self.path


def load_concepts(run_dir: str | Path) -> dict[int, dict[str, str]]:
    """The concept labels saved with the explorer (``<run>/concepts.json``): unit -> {label, note}."""
    return ConceptBook.load(Path(run_dir) / CONCEPTS_FILE).units


# --------------------------------------------------------------------------------------------
# What the explorer needs from a run, and one analysed sample
# --------------------------------------------------------------------------------------------

ActivationFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class Pool:
    """A list of patches: ``table`` (one row per sample, index 0..N-1 = position in the split)
    and ``load(i)`` giving sample i's int16 HU patch (I, P, L); optionally its vertebra label
    patch (``load_vertebrae``) and ground-truth concept patch (``load_concepts``, phantom only),
    each returning None where a sample has none."""

    table: pd.DataFrame
    load: Callable[[int], np.ndarray]
    load_vertebrae: Callable[[int], np.ndarray | None] | None = None
    load_concepts: Callable[[int], np.ndarray | None] | None = None


@dataclass
class UnitMap:
    """One unit on one patch, ready to slice: ``activation`` = A_k(x) upsampled to the patch
    (trilinear, float32), ``mask`` = M_k(x) = A_k(x) > T_k on the network's grid, each feature
    voxel drawn as the block of the patch it summarises (``vfcore.dissect.patch_mask``, the
    masks notebook 04 shows), ``T`` = T_k, ``low`` / ``high`` = the smallest / largest upsampled
    activation inside the mask (the ends of the colour scale)."""

    activation: np.ndarray
    mask: np.ndarray
    T: float
    low: float
    high: float

    @classmethod
    def from_grid(cls, A: np.ndarray, T: np.ndarray, field_slices, patch_shape) -> list["UnitMap"]:
        """UnitMaps for activations [U, d, h, w] with thresholds T [U] (one per unit)."""
        A = np.asarray(A, dtype=np.float32)
        T = np.asarray(T, dtype=np.float64).reshape(-1)
        up = upsample_to_patch(A, field_slices, patch_shape)
        masks = patch_mask(A > T[:, None, None, None], field_slices, patch_shape)
        return [cls(u, m, float(t), float(u[m].min()) if m.any() else float(t),
                    float(u[m].max()) if m.any() else float(t))
                for u, m, t in zip(up, masks, T)]

    def render(self, patch: np.ndarray, view: str, index: int, mode: str = "overlay",
               scale: int = SCALE) -> np.ndarray:
        """The RGB picture of slice ``index`` of ``view`` (see :func:`render_slice`)."""
        return render_slice(take_slice(patch, view, index), take_slice(self.mask, view, index),
                            take_slice(self.activation, view, index), self.low, self.high, mode, scale)

    def best_slice(self, view: str) -> int:
        """The slice with the largest thresholded activation (``vfcore.dissect.best_slice``)."""
        return best_slice(self.activation, self.T, view, mask=self.mask)


@dataclass
class Analysis:
    """One sample seen by the network: everything a slider step needs, precomputed.

    ``maps[k]`` (a :class:`UnitMap`) for the ``top`` units by r_k only (all the explorer shows).
    """

    name: str
    patch: np.ndarray
    probability: float
    relevance: np.ndarray  # r_k(x) for every unit (Eq. 2)
    top: list[int]
    maps: dict[int, UnitMap]
    truth: dict | None = None  # the sample's table row (None for an upload)
    vertebrae: np.ndarray | None = None  # vertebra labels of the patch (None: unknown)
    concept_patch: np.ndarray | None = None  # ground-truth concept labels (phantom only)

    @property
    def prediction(self) -> int:
        return int(self.probability >= 0.5)

    @property
    def label(self) -> int | None:
        """The target vertebra's label (e.g. 20 = L1); None for an upload."""
        return None if self.truth is None else int(self.truth["label"])


@dataclass
class RunData:
    """What the explorer reads from a run folder (see :meth:`from_run`), or builds in a test.

    ``activations(patches [B, 96, 96, 96] HU) -> (A [B, K, h, w, d], probability [B])`` runs the
    network once; ``field`` is the part of the patch its input covers (activations are
    upsampled onto it).
    """

    thresholds: np.ndarray  # T_k
    c_k: np.ndarray  # correlation with true-positive predictions (Eq. 1), NaN where undefined
    samples: Pool  # the split shown in the sample list (columns below)
    exemplar_pool: Pool  # the split the exemplars index into
    exemplars: dict[int, list[int]]  # unit -> sample indices in exemplar_pool, best first
    activations: ActivationFn
    field: tuple[slice, slice, slice]
    min_input: tuple[int, int, int]  # smallest upload the network can take
    concepts: ConceptBook
    meta: dict = field(default_factory=dict)
    concept_names: dict[int, str] = field(default_factory=dict)  # phantom concept labels
    c_rank: np.ndarray | None = None  # rank by c_k as the dissection wrote it (its tie-breaks)
    _exemplar_cache: "OrderedDict[int, list]" = field(default_factory=OrderedDict, repr=False)

    #: columns of ``samples.table``: case, level, label, grade, fracture (0/1),
    #: probability, prediction (0/1), outcome (TP/FP/TN/FN)

    @property
    def n_units(self) -> int:
        return int(len(self.thresholds))

    @functools.cached_property
    def rank(self) -> np.ndarray:
        """c_k rank of every unit, 1 = most correlated with true positives: ``c_rank`` (the
        dissection's ranking table) if given, else by c_k, ties by unit (NaN c_k last)."""
        if self.c_rank is not None:
            return np.asarray(self.c_rank, dtype=int)
        c = np.where(np.isfinite(self.c_k), self.c_k, -np.inf)
        order = np.argsort(-c, kind="stable")
        rank = np.empty(len(c), dtype=int)
        rank[order] = np.arange(1, len(c) + 1)
        return rank

    def relevance(self, A: np.ndarray) -> np.ndarray:
        """r_k(x) (Eq. 2) from one sample's activations [K, h, w, d]."""
        return relevance(A, self.thresholds)

    def analyse(self, patch: np.ndarray, name: str, truth: dict | None = None, top: int = TOP_UNITS) -> Analysis:
        """Run the network on one patch; keep r_k and the top units' upsampled maps."""
        A, prob = self.activations(np.asarray(patch)[None])
        A = np.asarray(A)[0]
        r = self.relevance(A)
        order = [int(k) for k in top_units(r, top)]
        maps = UnitMap.from_grid(A[order], self.thresholds[order], self.field, patch.shape)
        return Analysis(name=name, patch=np.asarray(patch), probability=float(np.asarray(prob)[0]),
                        relevance=r, top=order, maps=dict(zip(order, maps)), truth=truth)

    def analyse_sample(self, index: int, top: int = TOP_UNITS) -> Analysis:
        index = int(index)
        row = self.samples.table.loc[index]
        name = f"{row['case']} {row['level']}"
        a = self.analyse(self.samples.load(index), name, truth=row.to_dict(), top=top)
        if self.samples.load_vertebrae is not None:
            a.vertebrae = self.samples.load_vertebrae(index)
        if self.samples.load_concepts is not None:
            a.concept_patch = self.samples.load_concepts(index)
        return a

    def unit_table(self, a: Analysis) -> pd.DataFrame:
        """The sample's top units: r_k (Eq. 2), c_k (Eq. 1) and its rank, the size of the mask
        M_k on this sample, where it lies (target vertebra / adjacent vertebrae / outside bone,
        if the patch has a vertebra mask), the ground-truth concept it covers most (phantom)
        and the student's concept label."""
        rows = []
        for pos, k in enumerate(a.top, start=1):
            mask = a.maps[k].mask
            row = {"relevance rank": pos, "unit": k, "r_k": float(a.relevance[k]),
                   "c_k": float(self.c_k[k]), "c_k rank": int(self.rank[k]),
                   "mask voxels": int(mask.sum())}
            if a.vertebrae is not None and a.label is not None:
                row.update(vertebra_overlap(mask, a.vertebrae, a.label))
            if a.concept_patch is not None and self.concept_names:
                ov = concept_overlap(mask, a.concept_patch, self.concept_names, field=self.field)
                ov = ov[ov["concept"] != "background"]
                row["phantom concept"] = (f"{ov['concept'].iloc[0]} ({ov['fraction'].iloc[0]:.0%})"
                                          if len(ov) else "")
            row["concept label"] = self.concepts.get(k)["label"]
            rows.append(row)
        return pd.DataFrame(rows).set_index("relevance rank")

    def exemplar_maps(self, unit: int, n: int = N_EXEMPLARS) -> list[tuple[int, np.ndarray, UnitMap]]:
        """(sample index, patch, :class:`UnitMap` of the unit) for its top exemplars (cached)."""
        unit = int(unit)
        if unit in self._exemplar_cache:
            self._exemplar_cache.move_to_end(unit)
            return self._exemplar_cache[unit]
        idx = [int(i) for i in self.exemplars.get(unit, [])[:n]]
        out = []
        if idx:
            patches = np.stack([self.exemplar_pool.load(i) for i in idx])
            A, _ = self.activations(patches)
            maps = UnitMap.from_grid(np.asarray(A)[:, unit], np.full(len(idx), self.thresholds[unit]),
                                     self.field, patches.shape[1:])
            out = list(zip(idx, patches, maps))
        self._exemplar_cache[unit] = out
        while len(self._exemplar_cache) > 3:
            self._exemplar_cache.popitem(last=False)
        return out

    def pick(self, outcome: str = "TP") -> int | None:
        """The most confident sample of an outcome (TP/FP: highest probability; TN/FN:
        lowest); None when the split has none."""
        t = self.samples.table
        sub = t[t["outcome"] == outcome]
        if sub.empty:
            return None
        positive = outcome in ("TP", "FP")
        return int(sub["probability"].idxmax() if positive else sub["probability"].idxmin())

    def find(self, key: int | str) -> int:
        """A sample by table index or by ``"<case> <level>"`` (``InputError`` if unknown)."""
        t = self.samples.table
        if isinstance(key, (int, np.integer)):
            if int(key) not in t.index:
                raise InputError("SAMPLE", f"no sample {key}; the list has 0..{len(t) - 1}")
            return int(key)
        names = t["case"].astype(str) + " " + t["level"].astype(str)
        hit = np.flatnonzero(names.to_numpy() == str(key))
        if not len(hit):
            raise InputError("SAMPLE", f"no sample named {key!r} (write '<case> <level>', e.g. {names.iloc[0]!r})")
        return int(t.index[hit[0]])

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, split: str = "test", device: str | None = None) -> "RunData":
        """Read a run folder: the checkpoint (``model/best.pt``), the dissection artifacts
        (notebooks 03/04) and the patch store (notebook 01).

        Raises :class:`~vfcore.errors.MissingArtifactError` (naming the notebook to run) or
        :class:`~vfcore.errors.StaleArtifactError` (dissection of another checkpoint).
        """
        return _load_run_data(Path(run_dir), split=split, device=device)


def outcome(label: int, prediction: int) -> str:
    """TP/FP/TN/FN of one prediction (0/1) against its label."""
    return str(outcome_names([label], [prediction])[0])


def _load_run_data(run_dir: Path, split: str = "test", device: str | None = None) -> RunData:
    """:meth:`RunData.from_run`: the run's network and dissection, checked against each other."""
    from vfcore import dissect as dx
    from vfcore.errors import MissingArtifactError
    from vfcore.io import sha256_file

    run_dir = Path(run_dir)
    needs = [(run_dir / "patches" / "manifest.csv", "notebooks/01_preprocessing.ipynb", "the patch store"),
             (run_dir / "model" / "best.pt", "notebooks/02_training.ipynb", "the trained model")]
    for path, notebook, what in needs:
        if not path.is_file():
            raise MissingArtifactError(path, f"{what} not found: run {notebook} first "
                                             "(the explorer needs notebooks 01-04 on this RUN_DIR)")
    net = dx.load_network(run_dir)
    checkpoint_sha = sha256_file(run_dir / "model" / "best.pt")
    art = dx.load_artifacts(run_dir, expect={
        "checkpoint_sha256": checkpoint_sha, "split": split, "layer": net.layer,
        "manifest_sha256": sha256_file(run_dir / "patches" / "manifest.csv")})
    d = art.dissection
    c_k, c_rank = np.full(d.n_units, np.nan), None
    if art.ranking_tp is not None:  # rank 1 = largest c_k; ties as notebook 04 shows them
        units = art.ranking_tp["unit"].to_numpy(dtype=int)
        c_k[units] = art.ranking_tp["c_k"].to_numpy(dtype=float)
        c_rank = np.full(d.n_units, d.n_units, dtype=int)
        c_rank[units] = art.ranking_tp["rank"].to_numpy(dtype=int)
    table = art.samples.copy()
    table.index = pd.RangeIndex(len(table))
    root = run_dir / "patches"

    def loader(column: str, required: bool):
        paths = table[column] if column in table else pd.Series([""] * len(table))

        def load(i: int):
            rel = paths.iloc[int(i)]
            if not isinstance(rel, str) or not rel:
                if required:
                    raise MissingArtifactError(root, f"sample {i} has no {column}: run "
                                                     "notebooks/01_preprocessing.ipynb again")
                return None
            return np.load(root / rel, allow_pickle=False)
        return load

    pool = Pool(table=table, load=loader("ct_path", True), load_vertebrae=loader("mask_path", False),
                load_concepts=loader("concept_path", False))

    def activations(patches: np.ndarray):
        return dx.activations(net.model, patches, net.layer, transform=net.transform,
                              device=device, batch_size=8)

    field_slices = art.field if art.meta.get("field") else dx.network_field(net.preset)
    meta = {k: art.meta.get(k) for k in ("split", "layer", "q_tail", "preset", "n_samples", "dissection_id")}
    meta["checkpoint_sha256"] = checkpoint_sha
    if art.ranking_tp is None:
        meta["c_k_problem"] = art.meta["rankings"]["tp"]["reason"]
    return RunData(
        thresholds=np.asarray(d.T, dtype=np.float64), c_k=c_k, samples=pool, exemplar_pool=pool,
        exemplars=dx.exemplars(d, None, k=N_EXEMPLARS, by="r"), activations=activations,
        field=tuple(field_slices), min_input=tuple(s.stop - s.start for s in field_slices),
        concepts=ConceptBook.load(run_dir / CONCEPTS_FILE, checkpoint_sha, net.layer),
        meta=meta, concept_names=dx.concept_names(run_dir) or {}, c_rank=c_rank,
    )


# --------------------------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------------------------

def _guarded(method):
    """Run a widget callback; any error becomes a status message (the kernel never sees it,
    and the view stays as it was)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except VfcoreError as exc:
            self._set_status(str(exc), "error")
        except Exception as exc:  # noqa: BLE001 - a widget must survive anything
            self._set_status(f"unexpected {type(exc).__name__}: {exc} (the explorer keeps its last view)",
                             "error")
        return None

    return wrapper


def _pct(p: float) -> str:
    return f"{100 * p:.1f} %"


class Explorer:
    """The concept explorer (ipywidgets 8). Build it with :func:`explore`; display it as the
    last expression of a cell. The methods below do what the controls do (tests and notebooks
    use them); they never raise: problems are shown in the status line (``status_text``)."""

    def __init__(self, data: RunData | None, problem: str | None = None, top: int = TOP_UNITS):
        import ipywidgets as w

        self.data = data
        self.top_n = top
        self.analysis: Analysis | None = None
        self.sample_index: int | None = None
        self.unit: int | None = None
        self.view = "sagittal"
        self.index = PATCH_SHAPE[VIEWS[self.view]] // 2
        self.mode = "overlay"
        self._hold = False  # set while the code (not the student) changes widget values
        self.last_redraw_ms = float("nan")
        self.exemplar_captions: list[str] = []  # what the exemplar row shows (for tests)
        self._side_cache: dict[int, Analysis] = {}  # a sample drawn by static_figure(sample=...)

        c = CSS_CLASSES
        self.status = w.HTML().add_class(c["status"])
        self.filter = w.ToggleButtons(options=[("all", "all")], value="all",
                                      style={"button_width": "auto"}).add_class(c["filter"])
        self.sample_select = w.Dropdown(options=[], value=None, description="sample",
                                        layout=w.Layout(width="520px")).add_class(c["sample"])
        self.upload = w.FileUpload(accept=",".join(UPLOAD_SUFFIXES), multiple=False,
                                   description="upload patch").add_class(c["upload"])
        self.prediction = w.HTML().add_class(c["prediction"])
        self.unit_select = w.Select(options=[], rows=top, description="units",
                                    layout=w.Layout(width="460px")).add_class(c["units"])
        self.keep_slice = w.Checkbox(value=False, description="keep slice when changing unit",
                                     indent=False).add_class("vf-keep-slice")
        self.view_select = w.ToggleButtons(options=list(VIEWS), value=self.view,
                                           style={"button_width": "80px"}).add_class(c["view"])
        self.mode_select = w.ToggleButtons(options=list(MODES), value=self.mode,
                                           style={"button_width": "80px"}).add_class(c["mode"])
        self.slider = w.IntSlider(value=self.index, min=0, max=PATCH_SHAPE[VIEWS[self.view]] - 1,
                                  description="slice", continuous_update=True,
                                  layout=w.Layout(width="320px")).add_class(c["slider"])
        side = PATCH_SHAPE[0] * SCALE
        self.image = w.Image(format="png", width=side, height=side).add_class(c["image"])
        self.readout = w.HTML(layout=w.Layout(width=f"{side}px")).add_class(c["readout"])
        self.unit_info = w.HTML().add_class(c["unit_info"])
        self.exemplars = w.Output().add_class(c["exemplars"])
        self.exemplar_header = w.HTML().add_class(c["exemplar_header"])
        self.concept_label = w.Text(description="concept", placeholder="e.g. anterior wedge",
                                    continuous_update=True).add_class(c["concept_label"])
        self.concept_note = w.Textarea(description="note", placeholder="what the unit looks at",
                                       layout=w.Layout(height="60px")).add_class(c["concept_note"])
        self.concept_save = w.Button(description="save concepts", icon="save").add_class(c["concept_save"])
        self.concept_table = w.HTML().add_class(c["concepts"])

        legend = w.HTML("<small>Overlay: the mask M_k = A_k &gt; T_k of the selected unit, coloured by its "
                        "upsampled activation from red (lowest) to yellow (highest); contour: its "
                        "outline in cyan. Grey: CT, bone window "
                        f"[{DISPLAY_WINDOW_HU[0]:.0f}, {DISPLAY_WINDOW_HU[1]:.0f}] HU.</small>",
                        layout=w.Layout(width=f"{side}px"))
        left = w.VBox([self.view_select, self.mode_select, self.slider, self.image, self.readout, legend])
        right = w.VBox([self.unit_select, self.keep_slice, self.unit_info,
                        w.HTML("<b>Concept of the selected unit</b>"),
                        self.concept_label, self.concept_note, self.concept_save, self.concept_table])
        self.ui = w.VBox([
            w.HTML("<h3 style='margin:0'>Concept explorer</h3>"),
            self.status,
            w.HBox([self.filter]),
            w.HBox([self.sample_select, self.upload]),
            self.prediction,
            w.HBox([left, right]),
            w.HTML("<b>Exemplars of the selected unit</b> (its top-activating samples: its general concept)"),
            self.exemplar_header,
            self.exemplars,
        ]).add_class(c["root"])

        self.filter.observe(self._on_filter, "value")
        self.sample_select.observe(self._on_sample, "value")
        self.upload.observe(self._on_upload, "value")
        self.unit_select.observe(self._on_unit, "value")
        self.view_select.observe(self._on_view, "value")
        self.mode_select.observe(self._on_mode, "value")
        self.slider.observe(self._on_slider, "value")
        self.concept_label.observe(self._on_concept_edit, "value")
        self.concept_note.observe(self._on_concept_edit, "value")
        self.concept_save.on_click(lambda _b: self.save_concepts())

        if data is None:
            self._set_enabled(False)
            self._set_status(problem or "no run data", "error")
            return
        self._fill_filter()
        self._fill_samples()
        self._show_concept_table()
        if data.concepts.problem:
            self._set_status(data.concepts.problem, "warning")
        elif data.meta.get("c_k_problem"):
            self._set_status(f"c_k ranks are undefined ({data.meta['c_k_problem']}); "
                             "units are listed by r_k only", "warning")

    # ---- display --------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.ui)

    # ---- state read by tests ----------------------------------------------------------------
    @property
    def status_text(self) -> str:
        return html.unescape(_strip_tags(self.status.value))

    @property
    def readout_text(self) -> str:
        return html.unescape(_strip_tags(self.readout.value))

    def expected_rgb(self, unit: int | None = None, view: str | None = None, index: int | None = None,
                     mode: str | None = None) -> np.ndarray:
        """What the image shows for (unit, view, slice, mode): the current ones by default."""
        a = self.analysis
        unit = self.unit if unit is None else unit
        view = view or self.view
        index = self.index if index is None else index
        return a.maps[unit].render(a.patch, view, index, mode or self.mode)

    # ---- actions (what the controls do) ------------------------------------------------------
    @_guarded
    def select_sample(self, key: int | str) -> None:
        """Show a sample of the list (table index or ``"<case> <level>"``)."""
        self._require_data()
        index = self.data.find(key)
        analysis = self.data.analyse_sample(index, top=self.top_n)
        self.sample_index = index
        self._hold_set(self.sample_select, "value", index if index in self._sample_values() else None)
        self._show_analysis(analysis)

    @_guarded
    def load_upload(self, name: str, content: bytes) -> None:
        """Show an uploaded patch (``.nii``, ``.nii.gz``, ``.npy``; see :func:`read_upload`)."""
        self._require_data()
        patch = read_upload(name, content, self.data.min_input)
        analysis = self.data.analyse(patch, f"upload {name}", top=self.top_n)
        self.sample_index = None
        self._hold_set(self.sample_select, "value", None)
        self._show_analysis(analysis)

    @_guarded
    def select_unit(self, unit: int) -> None:
        """Show one of the listed units (by unit number)."""
        self._require_analysis()
        unit = int(unit)
        if unit not in self.analysis.maps:
            raise InputError("unit", f"unit {unit} is not among this sample's top {self.top_n} units "
                                     f"{self.analysis.top}")
        self.unit = unit
        self._hold_set(self.unit_select, "value", unit)
        if not self.keep_slice.value:
            self._set_index(self.analysis.maps[unit].best_slice(self.view))
        self._show_concept_editor()
        self._show_unit_info()
        self._redraw()
        self._draw_exemplars()

    @_guarded
    def set_view(self, view: str | None = None, index: int | None = None, mode: str | None = None) -> None:
        """Change the view axis, the slice and/or the overlay mode."""
        self._require_analysis()
        if view is not None and view != self.view:
            if view not in VIEWS:
                raise InputError("view", f"unknown view {view!r}; choose one of {list(VIEWS)}")
            self.view = view
            self._hold_set(self.view_select, "value", view)
            n = self.analysis.patch.shape[VIEWS[view]]
            self._hold_set(self.slider, "max", n - 1)
            if index is None:
                index = self.analysis.maps[self.unit].best_slice(view)
            self._draw_exemplars()
        if mode is not None:
            if mode not in MODES:
                raise InputError("mode", f"unknown mode {mode!r}; choose one of {list(MODES)}")
            self.mode = mode
            self._hold_set(self.mode_select, "value", mode)
        if index is not None:
            self._set_index(index)
        self._redraw()

    @_guarded
    def save_concepts(self) -> Path | None:
        """Write the concept dictionary to ``<run>/concepts.json`` (atomically)."""
        self._require_data()
        book = self.data.concepts
        try:
            path = book.save()
        except OSError as exc:
            raise InputError(book.path, f"could not be written ({exc.strerror or exc}); your "
                                        f"{len(book.units)} label(s) are kept here, save again later") from None
        self._refresh_unit_options()
        self._show_concept_table()
        if self.unit is not None:
            self._show_exemplar_header()
        self._set_status(f"Saved {len(book.units)} concept label(s) to {path}.", "ok")
        return path

    def static_figure(self, sample: int | str | None = None, n_units: int = 5, view: str | None = None,
                      unit: int | None = None):
        """A matplotlib figure (so an executed notebook shows the result): top row, the sample
        and its ``n_units`` most relevant units, each at its best slice; bottom row, the
        exemplars of ``unit`` (default: the selected unit, or the sample's most relevant one).

        ``sample=None`` draws what the explorer shows; a sample (row number or
        ``"<case> <level>"``) is drawn without changing the live view. Returns the figure, or
        None (with the reason printed) when there is nothing to draw.
        """
        import matplotlib.pyplot as plt

        try:
            a = self._analysis_for(sample)
        except VfcoreError as exc:
            print(exc)
            return None
        if a is None:
            print(self.status_text)
            return None
        view = view or self.view
        if unit is None:
            unit = self.unit if (a is self.analysis and self.unit is not None) else a.top[0]
        units = a.top[:n_units]
        ex = self.data.exemplar_maps(unit)
        ncols = max(len(units) + 1, len(ex), 1)
        fig, axes = plt.subplots(2, ncols, figsize=(2.3 * ncols, 5.8), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        mid = a.patch.shape[VIEWS[view]] // 2
        axes[0, 0].imshow(render_slice(take_slice(a.patch, view, mid), scale=1))
        axes[0, 0].set_title(f"{a.name}\np(fracture) = {a.probability:.2f}", fontsize=8)
        mode = self.mode if self.mode != "off" else "overlay"
        for j, k in enumerate(units, start=1):
            s = a.maps[k].best_slice(view)
            axes[0, j].imshow(a.maps[k].render(a.patch, view, s, mode, scale=1))
            label = self.data.concepts.get(k)["label"]
            axes[0, j].set_title(f"#{j} unit {k} (c_k rank {self.data.rank[k]})\n{view} {s}"
                                 + (f"\n{label}" if label else ""), fontsize=8)
        for j, (i, patch, umap) in enumerate(ex):
            s = umap.best_slice(view)
            axes[1, j].imshow(umap.render(patch, view, s, "overlay", scale=1))
            axes[1, j].set_title(self._exemplar_caption(i, view, s), fontsize=8)
        if not ex:
            axes[1, 0].text(0, 0.5, f"unit {unit}: no exemplars", fontsize=9)
        fig.suptitle(f"{a.name}, {view} view. Top: the units with the largest r_k (Eq. 2), "
                     f"M_k = A_k > T_k, coloured by A_k from red (lowest) to yellow (highest). "
                     f"Bottom: exemplars of unit {unit}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.96), h_pad=1.5)
        return fig

    def unit_table(self, sample: int | str | None = None) -> pd.DataFrame:
        """The top units of the shown sample (or of ``sample``, without changing the view) as a
        table (see :meth:`RunData.unit_table`)."""
        a = self._analysis_for(sample)
        return pd.DataFrame() if a is None else self.data.unit_table(a)

    def pick(self, outcome: str = "TP") -> int | None:
        """The most confident sample of an outcome (TP, FP, TN, FN), or None (none in the
        split, or no run data: the status line says why)."""
        return None if self.data is None else self.data.pick(outcome)

    @property
    def prediction_text(self) -> str:
        """The prediction line as plain text."""
        return html.unescape(_strip_tags(self.prediction.value))

    def _analysis_for(self, sample: int | str | None) -> Analysis | None:
        """The shown analysis, or another sample's (cached; the live view is not changed)."""
        if sample is None:
            return self.analysis
        self._require_data()
        index = self.data.find(sample)
        if self.analysis is not None and self.analysis.truth is not None and index == self.sample_index:
            return self.analysis
        if index not in self._side_cache:
            self._side_cache.clear()  # one side sample at a time (memory: ~40 MB each)
            self._side_cache[index] = self.data.analyse_sample(index, top=self.top_n)
        return self._side_cache[index]

    # ---- callbacks ------------------------------------------------------------------------
    @_guarded
    def _on_filter(self, change) -> None:
        if not self._hold:
            self._fill_samples()

    def _on_sample(self, change) -> None:
        if not self._hold and change["new"] is not None and change["new"] != self.sample_index:
            self.select_sample(int(change["new"]))

    @_guarded
    def _on_upload(self, change) -> None:
        if self._hold or not change["new"]:
            return
        item = change["new"][0]
        try:
            self.load_upload(item["name"], item["content"])
        finally:
            self._hold_set(self.upload, "value", ())  # the same file can be uploaded again

    def _on_unit(self, change) -> None:
        if not self._hold and change["new"] is not None and change["new"] != self.unit:
            self.select_unit(int(change["new"]))

    def _on_view(self, change) -> None:
        if not self._hold:
            self.set_view(view=change["new"])

    def _on_mode(self, change) -> None:
        if not self._hold:
            self.set_view(mode=change["new"])

    def _on_slider(self, change) -> None:
        if not self._hold:
            self.set_view(index=int(change["new"]))

    @_guarded
    def _on_concept_edit(self, change) -> None:
        if self._hold or self.unit is None:
            return
        self.data.concepts.set(self.unit, label=self.concept_label.value, note=self.concept_note.value)
        if self.data.concepts.dirty:
            self._set_status(f"Concept of unit {self.unit} edited (not saved yet: press 'save concepts').",
                             "warning")

    # ---- internals ------------------------------------------------------------------------
    def _require_data(self) -> None:
        if self.data is None:
            raise InputError(None, "the explorer has no run data (see the message above)")

    def _require_analysis(self) -> None:
        self._require_data()
        if self.analysis is None:
            raise InputError(None, "choose a sample first")

    def _hold_set(self, widget, name: str, value) -> None:
        self._hold = True
        try:
            setattr(widget, name, value)
        finally:
            self._hold = False

    def _set_index(self, index: int) -> None:
        n = self.analysis.patch.shape[VIEWS[self.view]]
        if not 0 <= int(index) < n:
            raise InputError("slice", f"slice {index} outside 0..{n - 1} of the {self.view} view")
        self.index = int(index)
        self._hold_set(self.slider, "value", self.index)

    def _set_status(self, text: str, level: str = "ok") -> None:
        colour = {"ok": "#1b5e20", "warning": "#8a5a00", "error": "#b71c1c"}[level]
        self.status.value = f"<span style='color:{colour}' data-level='{level}'>{html.escape(text)}</span>"

    def _set_enabled(self, enabled: bool) -> None:
        for wdg in (self.filter, self.sample_select, self.upload, self.unit_select, self.view_select,
                    self.mode_select, self.slider, self.concept_label, self.concept_note,
                    self.concept_save, self.keep_slice):
            wdg.disabled = not enabled

    def _sample_values(self) -> set:
        return {v for _, v in self.sample_select.options}

    def _fill_filter(self) -> None:
        t = self.data.samples.table
        counts = t["outcome"].value_counts()
        options = [(f"all ({len(t)})", "all")] + [(f"{o} ({int(counts.get(o, 0))})", o) for o in OUTCOMES]
        self._hold_set(self.filter, "options", options)
        self._hold_set(self.filter, "value", "all")

    def _fill_samples(self) -> None:
        t = self.data.samples.table
        if self.filter.value != "all":
            t = t[t["outcome"] == self.filter.value]
        options = [(self._sample_label(row), int(i)) for i, row in t.iterrows()]
        keep = self.sample_index if self.sample_index in {v for _, v in options} else None
        self._hold = True
        try:
            self.sample_select.options = options
            self.sample_select.value = keep
        finally:
            self._hold = False

    @staticmethod
    def _sample_label(row) -> str:
        grade = row.get("grade")
        grade = "" if grade is None or pd.isna(grade) else f", grade {int(grade)}"
        truth = "fracture" if int(row["fracture"]) else "healthy"
        return (f"{row['case']} {row['level']} · {truth}{grade} · p = {row['probability']:.2f} "
                f"· {row['outcome']}")

    def _show_analysis(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self._show_prediction()
        self._refresh_unit_options(select=analysis.top[0])
        n = analysis.patch.shape[VIEWS[self.view]]
        self._hold_set(self.slider, "max", n - 1)
        self.unit = None
        self.select_unit(analysis.top[0])

    def _show_prediction(self) -> None:
        a = self.analysis
        verdict = "fracture" if a.prediction else "no fracture"
        text = f"<b>Prediction: {verdict}</b> (probability of fracture {_pct(a.probability)})"
        if a.truth is not None:
            grade = a.truth.get("grade")
            grade = "" if grade is None or pd.isna(grade) else f", grade {int(grade)}"
            truth = "fracture" if int(a.truth["fracture"]) else "no fracture"
            o = outcome(int(a.truth["fracture"]), a.prediction)
            names = {"TP": "true positive", "FP": "false positive", "TN": "true negative",
                     "FN": "false negative"}
            text += f" · label: {truth}{grade} → <b>{names[o]}</b>"
        else:
            text += " · uploaded patch, no label"
        self.prediction.value = f"{html.escape(a.name)}: {text}"

    def _unit_label(self, position: int, unit: int) -> str:
        r = self.analysis.relevance[unit]
        label = self.data.concepts.get(unit)["label"]
        return (f"{position}. unit {unit} · r_k {r:.3g} · c_k rank {self.data.rank[unit]}"
                + (f" · {label}" if label else ""))

    def _refresh_unit_options(self, select: int | None = None) -> None:
        if self.analysis is None:
            return
        options = [(self._unit_label(i, k), k) for i, k in enumerate(self.analysis.top, start=1)]
        self._hold = True
        try:
            self.unit_select.options = options
            self.unit_select.value = select if select is not None else self.unit
        finally:
            self._hold = False

    def _show_unit_info(self) -> None:
        a, k = self.analysis, self.unit
        mask = a.maps[k].mask
        parts = [f"<b>unit {k}</b> on this sample: r_k = {a.relevance[k]:.4g}, "
                 f"M_k = {int(mask.sum())} voxels; c_k = {self.data.c_k[k]:.3f} "
                 f"(rank {self.data.rank[k]} of {self.data.n_units} for true positives)"]
        if a.vertebrae is not None and a.label is not None and mask.any():
            ov = vertebra_overlap(mask, a.vertebrae, a.label)
            parts.append(f"mask on the target vertebra {ov['target']:.0%}, on adjacent vertebrae "
                         f"{ov['adjacent']:.0%}, outside bone {ov['outside']:.0%}")
        if a.concept_patch is not None and self.data.concept_names and mask.any():
            ov = concept_overlap(mask, a.concept_patch, self.data.concept_names, field=self.data.field)
            ov = ov[ov["concept"] != "background"].head(3)
            if len(ov):
                parts.append("phantom ground truth: " + ", ".join(
                    f"{html.escape(c)} {f:.0%}" for c, f in zip(ov["concept"], ov["fraction"])))
        self.unit_info.value = "<br>".join(parts)

    def _show_concept_editor(self) -> None:
        entry = self.data.concepts.get(self.unit)
        self._hold_set(self.concept_label, "value", entry["label"])
        self._hold_set(self.concept_note, "value", entry["note"])
        self.concept_label.description = f"unit {self.unit}"

    def _show_concept_table(self) -> None:
        units = self.data.concepts.units
        if not units:
            self.concept_table.value = "<i>No concept labels yet.</i>"
            return
        rows = "".join(f"<tr><td>{k}</td><td>{html.escape(v['label'])}</td><td>{html.escape(v['note'])}</td></tr>"
                       for k, v in sorted(units.items()))
        self.concept_table.value = ("<table><tr><th>unit</th><th>label</th><th>note</th></tr>"
                                    f"{rows}</table>")

    def _redraw(self) -> None:
        start = time.perf_counter()
        a, k, view, s = self.analysis, self.unit, self.view, self.index
        T = a.maps[k].T
        self.image.value = png_bytes(self.expected_rgb())
        n_on = int(np.count_nonzero(take_slice(a.maps[k].mask, view, s)))
        rank = a.top.index(k) + 1
        n = a.patch.shape[VIEWS[view]]
        self.readout.value = (f"<b>unit {k}</b> (r_k #{rank}, c_k rank {self.data.rank[k]}) · "
                              f"{view} slice {s} of 0-{n - 1} · M_k: {n_on} voxels on this slice "
                              f"(T_k = {T:.4g})")
        self._set_status(f"Showing {a.name}: unit {k}, {view} slice {s}.", "ok")
        self.last_redraw_ms = 1000 * (time.perf_counter() - start)

    def _exemplar_caption(self, i: int, view: str, s: int) -> str:
        row = self.data.exemplar_pool.table.loc[i]
        truth = "fracture" if int(row.get("fracture", 0) or 0) else "healthy"
        return f"{row['case']} {row['level']}\n{truth}, {view} {s}"

    def _draw_exemplars(self) -> None:
        unit, view = self.unit, self.view
        ex = self.data.exemplar_maps(unit)
        slices = [umap.best_slice(view) for _, _, umap in ex]
        self.exemplar_captions = [self._exemplar_caption(i, view, s) for (i, _, _), s in zip(ex, slices)]
        with self.exemplars:
            if ex:
                self.exemplars.clear_output(wait=True)
                self._exemplar_figure(ex, slices, view)
            else:
                self.exemplars.clear_output()
        # set after the figure went out, so "unit k" here means the row shows unit k
        self._show_exemplar_header(len(ex))

    def _show_exemplar_header(self, n: int | None = None) -> None:
        unit, split = self.unit, self.data.meta.get("split", "?")
        n = len(self.exemplar_captions) if n is None else n
        label = self.data.concepts.get(unit)["label"]
        if n:
            text = (f"unit {unit}: {n} exemplar(s), the samples of the {split} split with the "
                    f"largest r_k of this unit; concept label: {label or '(none yet)'}")
        else:
            text = f"unit {unit}: no exemplars (it fires on no sample of the {split} split)"
        self.exemplar_header.value = html.escape(text)

    def _exemplar_figure(self, ex, slices, view) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(ex), figsize=(2.2 * len(ex), 2.6), squeeze=False)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.82, wspace=0.06)
        for ax, (i, patch, umap), s in zip(axes[0], ex, slices):
            ax.axis("off")
            ax.imshow(umap.render(patch, view, s, "overlay", scale=1))
            ax.set_title(self._exemplar_caption(i, view, s), fontsize=8)
        plt.show()
        plt.close(fig)


def _strip_tags(text: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", text)


def explore(run_dir: str | Path, sample: int | str | None = None, top: int = TOP_UNITS,
            split: str = "test", device: str | None = None) -> Explorer:
    """Open the concept explorer on a run folder (notebook 05).

    ``sample``: a row of the sample list (index, or ``"<case> <level>"``); None shows the most
    confident true positive. A run folder without (or with stale) dissection artifacts gives
    an explorer whose status line says which notebook to run; it never raises for that.
    """
    try:
        data = RunData.from_run(run_dir, split=split, device=device)
    except VfcoreError as exc:
        return Explorer(None, problem=str(exc), top=top)
    app = Explorer(data, top=top)
    if sample is None:
        sample = data.pick("TP")
        if sample is None:
            sample = int(data.samples.table["probability"].idxmax())
    app.select_sample(sample)
    return app
