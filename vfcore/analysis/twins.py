"""Healed twins (issue 22): how P(fracture) and each unit change when one fracture is healed.

For a fractured vertebra of a run's phantom data, :mod:`vfcore.phantom.twins` draws the same
scan with that fracture healed (grade 0; the noise identical wherever the anatomy did not
change).  Both scans are straightened with the straightening the run's patch store recorded
for the original (``case.json``: the frame c, e_S, e_A, e_L, and the store's size, spacing and
CT interpolation order), so the two patches are voxel-aligned, and the original patch equals
the stored one (checked: a data root drawn by other code would give a twin whose noise does not
line up).  Then the network sees both:

* :func:`twin_pairs`: the fractured vertebrae of a split (default: the dissected one);
* :func:`iter_twin_patches`: their :class:`TwinPair` (original and healed patches), one scan
  rendered once for all its fractures;
* :func:`twin_effects`: P(fracture) of both and, per unit k of the dissected layer, two
  summaries of its activation map A_k [8, 8, 8] for both: the maximum over the cell grid (what
  Eq. 1's E_x compares with T_k: k in E_x iff max A_k > T_k) and the mean;
* :func:`twin_ranking`: units ranked by the mean drop of their summary from original to healed
  twin over the true positives, with n, a sign test, and Eq. 1's c_k of the originals and of
  their twins when T_k is given.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy.ndimage import spline_filter
from scipy.stats import binomtest

from vfcore.data import read_patch
from vfcore.dissect.artifacts import load_artifacts, load_dissection_set
from vfcore.errors import DataValueError, InvalidParameterError
from vfcore.forward import forward
from vfcore.patches.geometry import (CT_FILL, Frame, outside_field, patch_affine, sample,
                                     voxel_coordinates)
from vfcore.patches.store import RECORD_NAME
from vfcore.phantom import PHANTOM_VERSION, case_paths, render_scan, sample_scan
from vfcore.phantom.anatomy import ScanSpec
from vfcore.phantom.twins import render_twin
from vfcore.run import RunFolder
from vfcore.verse import Volume

__all__ = ["SUMMARIES", "TwinEffects", "TwinPair", "iter_twin_patches", "scan_spec",
           "twin_effects", "twin_pairs", "twin_ranking"]

#: Per-unit summaries of an activation map over the cell grid.
SUMMARIES = ("max", "mean")


# --------------------------------------------------------------------------------------------
# Pairs of patches
# --------------------------------------------------------------------------------------------


@dataclass
class TwinPair:
    """One fractured vertebra and its healed twin, straightened alike: ``original`` and
    ``healed`` int16 HU [S, S, S] and ``mask_original`` / ``mask_healed`` (vertebra labels)
    on the same patch grid ``affine`` (patch index -> world mm); ``twin``: the heal record
    (``vfcore.phantom.twins.heal``); ``seconds``: drawing the twin and cutting both."""

    case: str
    label: int
    grade: int
    shape: int
    affine: np.ndarray
    original: np.ndarray
    healed: np.ndarray
    mask_original: np.ndarray
    mask_healed: np.ndarray
    twin: dict
    seconds: float


def twin_pairs(run_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """The fractured vertebrae of ``split`` (None: the dissected split, ``meta["split"]`` of
    the run's dissection): ``sample`` (row of the split's dissection set), ``case``, ``label``,
    ``level``, ``grade``, ``shape``, ``split``."""
    if split is None:
        split = load_artifacts(run_dir).meta["split"]
    _, labels, rows = load_dissection_set(run_dir, split)
    rows = rows.assign(sample=np.arange(len(rows)))[labels == 1]
    out = rows[["sample", "case", "label", "level", "grade", "shape", "split"]]
    return out.astype({"label": int, "grade": int, "shape": int}).reset_index(drop=True)


def scan_spec(root: str | Path, case: str) -> ScanSpec:
    """The :class:`ScanSpec` a phantom scan of ``root`` was drawn from (its truth's ``params``)."""
    path = case_paths(root, case)["truth"]
    try:
        params = json.loads(Path(path).read_text())["params"]
    except (OSError, ValueError, KeyError) as err:
        raise DataValueError(path, f"not a phantom truth file with params ({err})") from None
    if params.get("version") != PHANTOM_VERSION:
        raise DataValueError(path, f"drawn by phantom version {params.get('version')}, this "
                             f"vfcore draws version {PHANTOM_VERSION}: its twins would differ")
    return sample_scan(params["seed"], params["index"], prevalence=params["prevalence"],
                       confounders=params["confounders"])


def _cut(data: np.ndarray, volume_affine: np.ndarray, affine: np.ndarray, size: int,
         order: int, fill: float, dtype) -> np.ndarray:
    """One patch as the store cuts it (``vfcore.patches.geometry.straighten``'s sampling)."""
    if order > 1:   # the store prefilters the whole scan once for cubic interpolation
        data = spline_filter(data, order=order, mode="nearest", output=np.float32)
    volume = Volume(data, volume_affine)
    coords = voxel_coordinates(volume_affine, affine, size)
    out = sample(volume, coords, outside_field(coords, volume.shape), order=order, fill=fill,
                 prefiltered=order > 1)
    if order == 0:
        return out.astype(dtype)
    info = np.iinfo(np.int16)
    return np.clip(np.rint(out), info.min, info.max).astype(np.int16)


def iter_twin_patches(run_dir: str | Path, pairs: pd.DataFrame,
                      root: str | Path | None = None) -> Iterator[TwinPair]:
    """:class:`TwinPair` of each row (``case``, ``label``) of ``pairs``, in memory.

    ``root``: the phantom data root (default: the one the run's patch store was made from).
    Each case's original scan is drawn once; its patch must equal the stored one
    (:class:`DataValueError` otherwise: the data were drawn by other code).
    """
    run = RunFolder(run_dir)
    if root is None:
        root = json.loads(run.require("patch_report").read_text())["root"]
    cache: dict[str, tuple] = {}
    for row in pairs.itertuples():
        case, label = str(row.case), int(row.label)
        if case not in cache:
            record_path = run.patches / case / RECORD_NAME
            record = json.loads(record_path.read_text())
            spec = scan_spec(root, case)
            disk_affine = nib.load(case_paths(root, case)["ct"]).affine  # the store's affine
            cache.clear()
            cache[case] = (record, spec, render_scan(spec), disk_affine)
        record, spec, scan, disk_affine = cache[case]
        start = time.perf_counter()
        entry = next((v for v in record["vertebrae"] if int(v["label"]) == label), None)
        if entry is None:
            raise DataValueError(run.patches / case / RECORD_NAME, f"no patch of label {label}")
        p = record["params"]
        frame = Frame(*(np.asarray(entry[k], dtype=np.float64) for k in ("c", "e_S", "e_A", "e_L")))
        affine = patch_affine(frame, p["size"], p["spacing"])
        twin = render_twin(spec, label)
        cut = lambda data, order, fill: _cut(data, disk_affine, affine, p["size"], order,  # noqa: E731
                                             fill, data.dtype)
        original = cut(scan.ct, p["ct_order"], CT_FILL)
        stored = run.patch(entry["ct_path"])
        if stored.is_file() and not np.array_equal(read_patch(stored), original):
            raise DataValueError(stored, "the stored patch differs from the one cut from the "
                                 "re-drawn scan: the data root was drawn by other code")
        yield TwinPair(case, label, int(row.grade), int(row.shape), affine, original,
                       cut(twin.ct, p["ct_order"], CT_FILL), cut(scan.vert, 0, 0),
                       cut(twin.vert, 0, 0), twin.truth["twin"],
                       time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# The network on both
# --------------------------------------------------------------------------------------------


@dataclass
class TwinEffects:
    """What :func:`twin_effects` measures for N pairs and K units.

    ``table``: one row per pair (``case``, ``label``, ``grade``, ``shape``, ``restored``,
    ``grade0``, ``changed_voxels`` (of the CT patch), ``p_original``, ``p_healed``,
    ``delta_p`` = p_healed - p_original, ``seconds`` (drawing and cutting the twin));
    ``original[s]`` / ``healed[s]``: [N, K] summary ``s`` (:data:`SUMMARIES`) of each unit's
    activation map; ``threshold``: P(fracture) at or above which a vertebra counts as fractured.
    """

    table: pd.DataFrame
    original: dict[str, np.ndarray]
    healed: dict[str, np.ndarray]
    threshold: float

    @property
    def true_positive(self) -> np.ndarray:
        """[N] bool: the original is predicted fractured (every pair is a fracture)."""
        return self.table["p_original"].to_numpy() >= self.threshold

    def delta_p_summary(self, subset: np.ndarray | None = None) -> dict:
        """n, mean, quartiles of delta_p over ``subset`` (default: the true positives whose
        twin reached grade 0), and how many twins fall below the threshold."""
        subset = self.select(subset)
        d = self.table["delta_p"].to_numpy()[subset]
        if d.size == 0:
            return {"n": 0}
        q = np.percentile(d, [0, 25, 50, 75, 100])
        healed = self.table["p_healed"].to_numpy()[subset]
        return {"n": int(d.size), "mean": float(d.mean()), "min": q[0], "q25": q[1],
                "median": q[2], "q75": q[3], "max": q[4],
                "healed_below_threshold": int((healed < self.threshold).sum())}

    def select(self, subset: np.ndarray | None = None) -> np.ndarray:
        """[N] bool: ``subset``, or by default the true positives whose twin reached grade 0."""
        if subset is None:
            return self.true_positive & self.table["grade0"].to_numpy(dtype=bool)
        subset = np.asarray(subset, dtype=bool)
        if subset.shape != (len(self.table),):
            raise InvalidParameterError("subset", f"a bool array of {len(self.table)} pairs",
                                        subset.shape)
        return subset


def twin_effects(model: torch.nn.Module, layer: str, pairs: Iterable[TwinPair], *,
                 transform: Callable | None = None, batch_size: int = 8,
                 threshold: float = 0.5, device: str | None = None) -> TwinEffects:
    """P(fracture) and per-unit summaries (max and mean over the cell grid) of the activation
    map at ``layer``, for the original and the healed patch of each pair.

    The forward pass is :func:`vfcore.forward.forward` in fp32 (``amp=False``), as the
    dissection's, so ``p_original`` is the dissection's P(fracture).  ``transform``: HU batch
    -> network input (``D.load_network(run).transform``).  ``pairs`` is read ``batch_size``
    at a time (a lazy iterator keeps memory small).
    """
    rows, orig, heal = [], {s: [] for s in SUMMARIES}, {s: [] for s in SUMMARIES}

    def run(batch: list[TwinPair]) -> None:
        data = np.stack([p.original for p in batch] + [p.healed for p in batch])
        prob, acts = forward(model, data, [layer], batch_size=len(data), transform=transform,
                             amp=False, device=device)
        A = acts[layer].reshape(len(data), acts[layer].shape[1], -1)
        n = len(batch)
        for name, value in (("max", A.max(axis=2)), ("mean", A.mean(axis=2))):
            orig[name].append(value[:n])
            heal[name].append(value[n:])
        for i, p in enumerate(batch):
            rows.append({"case": p.case, "label": p.label, "grade": p.grade, "shape": p.shape,
                         "restored": p.twin["restored"], "grade0": p.twin["grade0"],
                         "changed_voxels": int((p.original != p.healed).sum()),
                         "p_original": float(prob[i]), "p_healed": float(prob[n + i]),
                         "delta_p": float(prob[n + i] - prob[i]), "seconds": p.seconds})

    batch: list[TwinPair] = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if not rows:
        raise DataValueError(None, "no twin pairs: the split has no fractured vertebra")
    cat = lambda d: {s: np.concatenate(v) for s, v in d.items()}  # noqa: E731
    return TwinEffects(pd.DataFrame(rows), cat(orig), cat(heal), float(threshold))


def twin_ranking(effects: TwinEffects, subset: np.ndarray | None = None, *,
                 summary: str = "max", T: np.ndarray | None = None) -> pd.DataFrame:
    """Units ranked by their mean drop (original - healed) of ``summary`` over ``subset``.

    ``subset``: default the true positives whose twin reached Genant grade 0
    (:meth:`TwinEffects.select`). Columns: ``rank``, ``unit``, ``n``, ``mean_drop``,
    ``median_drop``, ``n_drop`` / ``n_rise`` (pairs where the unit fell / rose),
    ``p_sign`` (two-sided sign test of n_drop against n_drop + n_rise, ties left out;
    ``scipy.stats.binomtest``; one test per unit, not corrected for K units); with ``T``
    ([K] thresholds T_k): ``c_original`` and ``c_healed``, Eq. 1's share of the pairs whose
    max A_k exceeds T_k, for the originals and for their twins. Ties by unit index.
    """
    if summary not in SUMMARIES:
        raise InvalidParameterError("summary", f"one of {SUMMARIES}", summary)
    subset = effects.select(subset)
    n = int(subset.sum())
    if n == 0:
        raise DataValueError(None, "twin_ranking: no pair in the subset (no true positive "
                             "whose twin reached grade 0?)")
    drop = (effects.original[summary] - effects.healed[summary])[subset]   # [n, K]
    K = drop.shape[1]
    n_drop, n_rise = (drop > 0).sum(axis=0), (drop < 0).sum(axis=0)
    p = [binomtest(int(a), int(a + b)).pvalue if a + b else 1.0 for a, b in zip(n_drop, n_rise)]
    table = pd.DataFrame({"unit": np.arange(K), "n": n, "mean_drop": drop.mean(axis=0),
                          "median_drop": np.median(drop, axis=0), "n_drop": n_drop,
                          "n_rise": n_rise, "p_sign": p})
    if T is not None:
        T = np.asarray(T, dtype=np.float64).reshape(-1)
        if T.shape != (K,):
            raise InvalidParameterError("T", f"{K} thresholds T_k", T.shape)
        table["c_original"] = (effects.original["max"][subset] > T).mean(axis=0)
        table["c_healed"] = (effects.healed["max"][subset] > T).mean(axis=0)
    order = np.lexsort((table["unit"].to_numpy(), -table["mean_drop"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, K + 1))
    return table
