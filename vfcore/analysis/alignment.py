"""Do the units detect what we think? NetDissect's IoU between unit masks and concept masks, with controls.

The paper (Sec. 4.1) asks two radiologists what the top units show. The phantom knows, voxel
by voxel, where every concept is, so here the question is *measured* (Bau et al. 2017):

    IoU_{k,c} = sum_x |M_k(x) & C(x)| / sum_x |M_k(x) | C(x)|

over the dissected set, with M_k(x) = A_k(x) > T_k on the patch in one of two ways:

* ``"block"`` masks: each grid cell of M_k covers its block of the network's field (what the
  explorer and the collages show; :func:`~vfcore.dissect.geometry.patch_mask`). Exact and fast:
  with ``count[i, cell, c]`` = voxels of concept c in that cell of sample i (computed once,
  :func:`concept_counts`), |M & C| = sum over the mask's cells of count, and
  |M | C| = |M| * cell_volume + |C| - |M & C|. Only the masks' cells are visited: the kept
  tail of the dissection (:attr:`Dissection.tail`) lists them, so no activation is stored;
* ``"interpolated"`` masks (NetDissect): upsample A_k to the field, then threshold at T_k
  (:func:`interpolated_alignment`, streamed one sample at a time).

Per unit the best concept, its IoU, and whether it is a **detector**: IoU > 0.04 (NetDissect's
threshold) *and* significant under the same-class shuffle (:func:`block_alignment`): pair every
sample's masks with the concept masks of another sample of the same class; a unit that marks
"wherever fractured vertebrae have something" scores as well shuffled as not. With block masks
a permutation is a gather of the counts and one sparse product (the masks' cells per unit
times the counts), so hundreds are cheap.

The concept masks come from the phantom (:class:`RunConcepts`); real data has none, and
:class:`NoConceptMasksError` says which parts of the analysis need them.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.sparse import csr_matrix

from vfcore.dissect.artifacts import concept_names
from vfcore.dissect.dissection import dissect
from vfcore.dissect.geometry import upsample_to_patch
from vfcore.dissect.quantile import Q_TAIL_PAPER, M_k
from vfcore.dissect.ranking import UndefinedCorrelationError
from vfcore.errors import DataValueError
from vfcore.forward import forward_batches
from vfcore.model import ENCODER_LAYERS
from vfcore.phantom import read_truth
from vfcore.phantom.concepts import target_concepts
from vfcore.run import RunFolder
from vfcore.verse import craniocaudal

#: NetDissect's detector threshold on the IoU (Bau et al. 2017).
IOU_THRESHOLD = 0.04
#: Significance level of the shuffle control (a detector must beat it).
ALPHA = 0.01
#: Default number of same-class permutations (p-values down to 1/201).
N_PERM = 200
#: The concepts that are fracture signs (item 5's saliency IoU, the findings' "evidence").
FRACTURE_CONCEPTS = ("fracture-deformity zone", "sclerotic condensation band", "superior endplate",
                     "inferior endplate", "anterior cortex")
#: What a false positive may be fooled by (the phantom's confounders; those it draws are used).
CONFOUNDERS = ("Schmorl node", "osteophyte", "degenerated disc", "degenerative endplate sclerosis",
               "physiological wedge", "low density", "outside the scan")
#: Vertebra-level confounders of the phantom's truth -> the concept they make of the target body.
VERTEBRA_FLAGS = {"physiological wedging": "physiological wedge", "low density": "low density"}
#: What needs the phantom's concept masks, and what works without them (the bad-input message).
NEEDS_PHANTOM = ("concept alignment (IoU), its shuffle / untrained / random-unit controls, "
                 "the false-positive concepts, the saliency IoU and the automatic concept labels")
WORKS_WITHOUT = "ablation, Grad-CAM maps and draft findings from the student's labels (concepts.json)"


class NoConceptMasksError(DataValueError):
    """The patch store has no concept masks (real data): alignment needs the phantom."""


def no_concept_masks(path) -> NoConceptMasksError:
    """The error for a run without concept masks, saying what needs them and what does not."""
    return NoConceptMasksError(path, f"no concept masks (real data?): {NEEDS_PHANTOM} need the "
                               f"phantom; {WORKS_WITHOUT} work without them")


# --------------------------------------------------------------------------------------------
# Concept masks of one patch
# --------------------------------------------------------------------------------------------

def _neighbours(vert: np.ndarray, label: int, concept: np.ndarray) -> tuple[int | None, int | None]:
    """The vertebrae above and below ``label`` in the patch (cranio-caudal order of the labels
    present); 26 (sacrum) below when none is and the patch shows the sacrum."""
    present = craniocaudal(int(v) for v in np.unique(vert) if v > 0 and v != 26)
    if label not in present:
        return None, None
    i = present.index(label)
    above = present[i - 1] if i > 0 else None
    below = present[i + 1] if i + 1 < len(present) else (26 if np.any(concept == 26) else None)
    return above, below


def patch_concepts(concept: np.ndarray, vert: np.ndarray, label: int,
                   names: Mapping[int, str] | None = None, flags: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Boolean masks [96^3] of every concept relative to the target vertebra ``label`` of a patch.

    ``concept``/``vert``: the patch's concept and vertebra labels (the patch store). The target
    concepts of :func:`vfcore.phantom.concepts.target_concepts` (neighbours read from the labels
    in the patch), plus ``"outside the scan"`` when the label table ``names`` has such a
    concept, plus the vertebra-level confounders in ``flags`` (the truth's ``confounders``,
    :data:`VERTEBRA_FLAGS`) as the target's vertebral body (empty when the flag is absent).
    """
    concept, vert = np.asarray(concept), np.asarray(vert)
    above, below = _neighbours(vert, int(label), concept)
    out = target_concepts(concept, vert, int(label), above, below)
    for value, name in (names or {}).items():
        if "outside" in name.lower():
            out["outside the scan"] = concept == value
    flags = set(flags)
    for flag, name in VERTEBRA_FLAGS.items():
        out[name] = out["vertebral body"] if flag in flags else np.zeros(concept.shape, dtype=bool)
    return out


class RunConcepts:
    """The concept masks of a dissected set, one sample at a time: ``masks[i]`` -> {name: bool [96^3]}.

    ``rows``: the samples table (``concept_path``, ``mask_path``, ``label``, ``case``; as the
    dissection's ``samples.csv``), ``store``: the patch store folder (``RunFolder(run).patches``),
    ``names``: the concept label table, ``truth``: the phantom's truth table
    (``vfcore.phantom.read_truth``) for the vertebra-level confounders. Raises
    :class:`NoConceptMasksError` when the rows have no concept masks (real data).
    """

    def __init__(self, rows: pd.DataFrame, store: str | Path, names: Mapping[int, str] | None = None,
                 truth: pd.DataFrame | None = None):
        self.rows = rows.reset_index(drop=True)
        self.store = Path(store)
        if "concept_path" not in self.rows or len(self.rows) == 0 or \
                (self.rows["concept_path"].fillna("").astype(str) == "").any():
            raise no_concept_masks(self.store)
        self.label_names = dict(names or {})
        self.flags: dict[tuple[str, int], list[str]] = {}
        if truth is not None and len(truth):
            for r in truth.itertuples():
                self.flags[(str(r.case), int(r.label))] = [f.split(" (")[0] for f in str(r.confounders).split("; ") if f]
        self.names = list(self[0].keys())

    @classmethod
    def from_run(cls, run_dir, rows: pd.DataFrame) -> "RunConcepts":
        """From a run folder: the patch store, the label table and (phantom) truth of its data root."""
        run = RunFolder(run_dir)
        truth = None
        try:
            root = json.loads(run.path("patch_report").read_text())["root"]
            truth = read_truth(root)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls(rows, run.patches, concept_names(run.root), truth)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        row = self.rows.iloc[int(i)]
        concept = np.load(self.store / row["concept_path"])
        vert = np.load(self.store / row["mask_path"])
        flags = self.flags.get((str(row.get("case", "")), int(row["label"])), [])
        return patch_concepts(concept, vert, int(row["label"]), self.label_names, flags)


# --------------------------------------------------------------------------------------------
# Per-cell concept counts (block masks)
# --------------------------------------------------------------------------------------------

@dataclass
class ConceptCounts:
    """Voxels of each concept in each grid cell of the network's field, per sample.

    ``counts`` [N, cells, C] (unsigned, cells = prod(grid) in C order, as M_k's positions),
    ``totals`` [N, C] |C| inside the field, ``cell_volume`` voxels per cell, ``names`` [C]."""

    names: list[str]
    counts: np.ndarray
    totals: np.ndarray
    grid: tuple[int, int, int]
    cell_volume: int


def _field_crop(mask: np.ndarray, field: Sequence[slice]) -> np.ndarray:
    return np.asarray(mask)[tuple(field)]


def concept_counts(masks, grid: Sequence[int], field: Sequence[slice],
                   names: Sequence[str] | None = None) -> ConceptCounts:
    """:class:`ConceptCounts` for a grid (e.g. the dissected layer's 8^3) from concept masks.

    ``masks``: a sequence of {name: bool [patch]} (one per sample, e.g. :class:`RunConcepts`),
    ``field``: the patch region the network sees (``network_field(preset)``); the field's edge
    must be a multiple of the grid's. ``names``: which concepts (default: all of the first).
    """
    return concept_counts_grids(masks, [grid], field, names)[0]


def concept_counts_grids(masks, grids: Sequence[Sequence[int]], field: Sequence[slice],
                         names: Sequence[str] | None = None) -> list[ConceptCounts]:
    """:func:`concept_counts` for several grids in one pass over the masks (layers, item 7)."""
    size = [int(s.stop - s.start) for s in field]
    grids = [tuple(int(g) for g in grid) for grid in grids]
    for grid in grids:
        if len(grid) != 3 or any(s % g for s, g in zip(size, grid)):
            raise DataValueError(None, f"grid {grid} does not divide the field {size}")
    n = len(masks)
    if n == 0:
        raise no_concept_masks("masks")
    first = masks[0]
    names = list(first.keys() if names is None else names)
    out = []
    for grid in grids:
        block = [s // g for s, g in zip(size, grid)]
        vol = int(np.prod(block))
        dtype = np.uint8 if vol <= 255 else np.uint16 if vol <= 65535 else np.uint32
        out.append(ConceptCounts(names, np.zeros((n, int(np.prod(grid)), len(names)), dtype),
                                 np.zeros((n, len(names)), np.int64), grid, vol))
    for i in range(n):
        m = first if i == 0 else masks[i]
        for j, name in enumerate(names):
            c = _field_crop(m[name], field).astype(np.int32)
            for cc in out:
                (g0, g1, g2), (b0, b1, b2) = cc.grid, [s // g for s, g in zip(size, cc.grid)]
                per_cell = c.reshape(g0, b0, g1, b1, g2, b2).sum(axis=(1, 3, 5))
                cc.counts[i, :, j] = per_cell.ravel()
                cc.totals[i, j] = int(per_cell.sum())
    return out


def mask_entries(M: np.ndarray) -> dict[str, np.ndarray]:
    """Dense masks M [N, K, *grid] (bool) -> the sparse form of :attr:`Dissection.tail`:
    ``unit``, ``sample``, ``position`` (flat index into the grid) of every True cell."""
    M = np.asarray(M, dtype=bool)
    n, k = M.shape[:2]
    s, u, p = np.nonzero(M.reshape(n, k, -1))
    return {"unit": u.astype(np.int32), "sample": s.astype(np.int32), "position": p.astype(np.int32)}


# --------------------------------------------------------------------------------------------
# IoU and the same-class shuffle
# --------------------------------------------------------------------------------------------

@dataclass
class Alignment:
    """IoU_{k,c} of K units with C concepts over a set of samples.

    ``inter``/``union`` [K, C] voxel counts summed over the samples; ``kind`` ``"block"`` or
    ``"interpolated"``; ``p`` [K, C] shuffle p-values and ``null_iou`` [K, C] mean shuffled IoU
    (None when not computed); ``n_perm``; ``n_samples``; ``layer``."""

    names: list[str]
    inter: np.ndarray
    union: np.ndarray
    kind: str
    p: np.ndarray | None = None
    null_iou: np.ndarray | None = None
    n_perm: int = 0
    n_samples: int = 0
    layer: str = ""

    @property
    def iou(self) -> np.ndarray:
        """[K, C] IoU (0 where the union is empty)."""
        return np.divide(self.inter, self.union, out=np.zeros(self.inter.shape), where=self.union > 0)

    @property
    def n_units(self) -> int:
        return int(self.inter.shape[0])


def _entries(entries: Mapping[str, np.ndarray], keep: np.ndarray | None):
    u, s, p = (np.asarray(entries[k], dtype=np.int64) for k in ("unit", "sample", "position"))
    if keep is not None:
        ok = keep[s]
        u, s, p = u[ok], s[ok], p[ok]
    order = np.argsort(u, kind="stable")
    return u[order], s[order], p[order]


def _unit_cells(u, s, p, n_units: int, counts: np.ndarray):
    """W [K, N * cells] sparse: how many mask entries unit k has at (sample, cell)."""
    n, cells = counts.shape[:2]
    return csr_matrix((np.ones(len(u)), (u, s * cells + p)), shape=(n_units, n * cells))


def _intersections(W, counts: np.ndarray, pairing: np.ndarray | None = None) -> np.ndarray:
    """[K, C] |M_k & C| summed over samples: W @ count (sample i's masks with the concepts of
    ``pairing[i]``); exact integers (float64 holds them up to 2^53)."""
    c = counts if pairing is None else counts[pairing]
    return np.rint(W @ c.reshape(-1, c.shape[2]).astype(np.float64)).astype(np.int64)


def same_class_pairings(labels, n_perm: int = N_PERM, seed: int = 0,
                        samples: np.ndarray | None = None) -> np.ndarray:
    """[n_perm, N] int: row j pairs sample i with sample ``P[j, i]`` of the same class, a
    uniform random permutation within each class (most samples get another one; a class of n
    leaves about one in place). Uniform, so the observed pairing is exchangeable with the
    shuffled ones and (1 + #)/(1 + n_perm) is a valid p-value even for a class of 3 (whose
    pairings without fixed points are only 2). Samples outside ``samples`` keep themselves."""
    labels = np.asarray(labels)
    n = len(labels)
    keep = np.ones(n, bool) if samples is None else np.asarray(samples, bool)
    rng = np.random.default_rng(seed)
    P = np.tile(np.arange(n), (int(n_perm), 1))
    for value in np.unique(labels[keep]):
        members = np.flatnonzero(keep & (labels == value))
        for j in range(int(n_perm)):
            P[j, members] = rng.permutation(members)
    return P


def block_alignment(entries: Mapping[str, np.ndarray], counts: ConceptCounts, n_units: int,
                    labels=None, n_perm: int = N_PERM, seed: int = 0,
                    samples: np.ndarray | None = None, layer: str = "") -> Alignment:
    """IoU of block masks with concepts, and the same-class shuffle control.

    ``entries``: the masks as sparse (``unit``, ``sample``, ``position``) arrays, e.g. a
    :attr:`Dissection.tail` or :func:`mask_entries`; ``counts`` from :func:`concept_counts` for
    the same grid and samples; ``labels`` [N] the classes to shuffle within (None: no control);
    ``samples`` bool [N]: which samples count (default all).

    The shuffle changes only the intersections: within a class the permutation is a bijection,
    so sum_i |M_i| and sum_i |C_pi(i)| (hence the rest of the union) stay the same. p_{k,c} =
    (1 + #{perm: inter >= observed}) / (1 + n_perm) (integer counts: no float ties).
    """
    N = counts.counts.shape[0]
    keep = None if samples is None else np.asarray(samples, bool)
    if keep is not None and keep.shape != (N,):
        raise DataValueError(None, f"samples: expected {N} booleans, got shape {keep.shape}")
    u, s, p = _entries(entries, keep)
    if len(s) and (s.max() >= N or p.max() >= counts.counts.shape[1]):
        raise DataValueError(None, f"entries: mask entries beyond the counts' {N} samples x "
                             f"{counts.counts.shape[1]} cells: another grid or set?")
    W = _unit_cells(u, s, p, n_units, counts.counts)
    inter = _intersections(W, counts.counts)
    size = np.bincount(u, minlength=n_units).astype(np.int64) * counts.cell_volume
    totals = counts.totals if keep is None else counts.totals[keep]
    rest = size[:, None] + totals.sum(axis=0)[None, :]
    al = Alignment(list(counts.names), inter, rest - inter, "block", n_samples=int(N if keep is None else keep.sum()),
                   layer=layer)
    if labels is not None and n_perm > 0:
        P = same_class_pairings(labels, n_perm, seed, keep)
        exceed = np.zeros(inter.shape, np.int64)
        null = np.zeros(inter.shape)
        for row in P:
            i_perm = _intersections(W, counts.counts, row)
            exceed += i_perm >= inter
            union = rest - i_perm
            null += np.divide(i_perm, union, out=np.zeros(union.shape), where=union > 0)
        al.p, al.null_iou, al.n_perm = (1 + exceed) / (1 + len(P)), null / len(P), len(P)
    return al


def layer_batches(model: torch.nn.Module, data, layer: str, transform: Callable | None = None,
                  batch_size: int = 8, device: str | None = None) -> Iterable[np.ndarray]:
    """A layer's activations A [B, K, *grid] (float32 numpy), batch after batch (the forward
    engine: eval mode, the device's precision policy)."""
    for out in forward_batches(model, data, [layer], batch_size=batch_size, transform=transform,
                               device=device):
        yield out.activations[layer].float().cpu().numpy()


def interpolated_alignment(batches, T: np.ndarray, masks, field: Sequence[slice],
                           names: Sequence[str] | None = None, unit_chunk: int = 32,
                           layer: str = "") -> Alignment:
    """NetDissect's masks: A_k upsampled (trilinear) to the field, then > T_k; IoU with concepts.

    ``batches``: activations [N, K, *grid] or an iterable of [B, K, *grid] batches (e.g.
    :func:`layer_batches`), in the order of ``masks`` (one {name: bool [patch]} per sample).
    Streams: one sample and ``unit_chunk`` units upsampled at a time. Only the units that fire
    on a sample are upsampled: a trilinear value is a weighted mean of its grid neighbours, so
    it exceeds T_k only where some cell does. No shuffle here (see :func:`block_alignment`).
    """
    T = np.asarray(T)
    if isinstance(batches, np.ndarray):
        batches = [batches]
    size = tuple(int(s.stop - s.start) for s in field)
    local = tuple(slice(0, n) for n in size)
    inter = union_m = totals = None
    i = 0
    for A in batches:
        A = np.asarray(A, dtype=np.float32)
        for a in A:
            m = masks[i]
            names = list(m.keys()) if names is None else list(names)
            C = np.stack([_field_crop(m[c], field).reshape(-1) for c in names], axis=1).astype(np.float32)
            if inter is None:
                inter = np.zeros((len(a), len(names)), np.int64)
                union_m = np.zeros(len(a), np.int64)
                totals = np.zeros(len(names), np.int64)
            totals += C.sum(axis=0).astype(np.int64)
            firing = np.flatnonzero(M_k(a, T).reshape(len(a), -1).any(axis=1))
            for start in range(0, len(firing), unit_chunk):
                units = firing[start:start + unit_chunk]
                up = upsample_to_patch(a[units], local, size)
                Mup = M_k(up, T[units], axis=0).reshape(len(units), -1)
                inter[units] += np.rint(Mup.astype(np.float32) @ C).astype(np.int64)
                union_m[units] += Mup.sum(axis=1)
            i += 1
    if inter is None:
        raise DataValueError(None, "batches: no samples")
    if i != len(masks):
        raise DataValueError(None, f"batches: {i} samples of activations for {len(masks)} concept masks")
    union = union_m[:, None] + totals[None, :] - inter
    return Alignment(list(names), inter, union, "interpolated", n_samples=i, layer=layer)


# --------------------------------------------------------------------------------------------
# Tables: per unit, controls
# --------------------------------------------------------------------------------------------

def unit_table(al: Alignment, concepts: Sequence[str] | None = None, units: Sequence[int] | None = None,
               significance: Alignment | None = None, iou_threshold: float = IOU_THRESHOLD,
               alpha: float = ALPHA) -> pd.DataFrame:
    """Per unit its best concept (among ``concepts``; default all; "" when every IoU is 0): ``unit``, ``concept``,
    ``iou``, ``p`` (shuffle p-value of that pair), ``shuffled_iou`` (mean shuffled IoU),
    ``detector`` (iou > ``iou_threshold`` and p < ``alpha``; False where p is unknown).

    ``significance``: take p from another alignment of the same units and concepts (e.g. the
    block masks' shuffle for the interpolated masks). Rows in ``units`` order (default all).
    """
    names = list(al.names)
    cols = [names.index(c) for c in (names if concepts is None else concepts) if c in names]
    if not cols:
        raise DataValueError(None, f"concepts: none of {list(concepts or [])} in the alignment's concepts {names}")
    units = np.arange(al.n_units) if units is None else np.asarray(units, dtype=int)
    iou = al.iou[np.ix_(units, cols)]
    best = np.argmax(iou, axis=1)
    ref = significance if significance is not None else al
    if ref.p is not None and 1.0 / (1 + ref.n_perm) >= alpha:
        warnings.warn(f"{ref.n_perm} permutations cannot give p < {alpha} (the smallest p is "
                      f"1/{ref.n_perm + 1}): no unit can be a detector; use >= {int(np.ceil(1 / alpha))} permutations")
    p = np.full(len(units), np.nan) if ref.p is None else ref.p[units, np.asarray(cols)[best]]
    null = np.full(len(units), np.nan) if ref.null_iou is None else ref.null_iou[units, np.asarray(cols)[best]]
    best_iou = iou[np.arange(len(units)), best]
    return pd.DataFrame({"unit": units, "concept": [names[cols[b]] if v > 0 else "" for b, v in zip(best, best_iou)],
                         "iou": best_iou,
                         "p": p, "shuffled_iou": null,
                         "detector": (best_iou > iou_threshold) & (np.nan_to_num(p, nan=1.0) < alpha)})


def random_unit_draws(n_units: int, k: int, n_draws: int = 100, seed: int = 0) -> np.ndarray:
    """[n_draws, k] units drawn without replacement (the random-unit control)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n_units, size=min(k, n_units), replace=False) for _ in range(n_draws)])


def _group(name: str, table: pd.DataFrame, n_draws: int = 1) -> dict:
    return {"group": name, "n_units": len(table) // n_draws, "draws": n_draws,
            "detectors": table["detector"].sum() / n_draws,
            "detector_fraction": float(table["detector"].mean()) if len(table) else np.nan,
            "mean_best_iou": float(table["iou"].mean()) if len(table) else np.nan,
            "mean_shuffled_iou": float(table["shuffled_iou"].mean()) if len(table) else np.nan}


def control_table(table: pd.DataFrame, top: Sequence[int], untrained: pd.DataFrame | None = None,
                  untrained_top: Sequence[int] | None = None, n_draws: int = 100, seed: int = 0) -> pd.DataFrame:
    """The controls in one table: detectors and mean best IoU per group of units.

    ``table``: :func:`unit_table` of the trained network (all units); ``top``: its top-k units
    by c_k (k = len(top)); ``untrained``: the same table for an untrained network of the same
    preset with its own thresholds (:func:`align_network`), ``untrained_top`` its top-k by c_k.
    Groups: top-k (trained), k random units (mean over ``n_draws``), all units, and the
    untrained network's all / top-k. ``detectors`` of the random group is a mean over draws.
    """
    by_unit = table.set_index("unit")
    k = len(top)
    rows = [_group(f"top-{k} c_k units", by_unit.loc[list(top)].reset_index())]
    draws = random_unit_draws(len(table), k, n_draws, seed)
    rows.append(_group(f"{k} random units", by_unit.loc[draws.ravel()].reset_index(), len(draws)))
    rows.append(_group("all units", table))
    if untrained is not None:
        rows.append(_group("untrained: all units", untrained))
        if untrained_top is not None:
            rows.append(_group(f"untrained: top-{len(untrained_top)} c_k units",
                               untrained.set_index("unit").loc[list(untrained_top)].reset_index()))
    return pd.DataFrame(rows)


def fp_concept_table(al: Alignment, ranking_fp: pd.DataFrame | None, top: int = 10,
                     concepts: Sequence[str] = CONFOUNDERS, **kwargs) -> pd.DataFrame:
    """Item 4: the ``top`` units of the differential (false-positive) ranking against the
    confounder masks the alignment has (best confounder, its IoU, p, detector), with their
    ``delta`` and ``c_fp``. Raises :class:`~vfcore.dissect.UndefinedCorrelationError` when there
    are no false positives (``ranking_fp`` None or empty)."""
    if ranking_fp is None or len(ranking_fp) == 0:
        raise UndefinedCorrelationError(None, "no false positives in the dissected set: the "
                                        "false-positive ranking and its concepts are undefined")
    have = [c for c in concepts if c in al.names]
    if not have:
        raise DataValueError(None, f"concepts: the alignment has none of the confounders {list(concepts)}")
    head = ranking_fp.head(top)
    t = unit_table(al, have, head["unit"].to_numpy(), **kwargs)
    for col in ("rank", "delta", "c_fp", "c_tp"):
        if col in head:
            t.insert(len(t.columns), col, head[col].to_numpy())
    return t


# --------------------------------------------------------------------------------------------
# A network end to end: dissect, count, align (also the untrained control and other layers)
# --------------------------------------------------------------------------------------------

def align_network(model: torch.nn.Module, data, labels, masks, layer: str, field: Sequence[slice], *,
                  transform: Callable | None = None, q_tail: float | None = None, n_perm: int = N_PERM,
                  seed: int = 0, batch_size: int = 16, device: str | None = None,
                  counts: Mapping[tuple, ConceptCounts] | None = None, progress: bool = False):
    """Dissect ``model`` at ``layer`` on ``data`` (its own T_k) and align its block masks with
    the concepts -> (Dissection, Alignment). Any model: the trained one, an untrained one of the
    same preset (control b), another layer (item 7). ``counts``: {grid: ConceptCounts} computed
    earlier (reused when the grid matches), else computed from ``masks``."""
    d = dissect(model, data, layer, q_tail=Q_TAIL_PAPER if q_tail is None else q_tail,
                batch_size=batch_size, transform=transform, device=device, progress=progress)
    grid = tuple(d.spatial_shape)
    cc = (counts or {}).get(grid)
    if cc is None:
        cc = concept_counts(masks, grid, field)
    return d, block_alignment(d.tail, cc, d.n_units, labels, n_perm, seed, layer=layer)


def layers_below(layer: str, n: int = 2, order: Sequence[str] | None = None) -> list[str]:
    """The ``n`` encoder layers below ``layer`` (deepest first), from ``vfcore.model.ENCODER_LAYERS``."""
    order = list(ENCODER_LAYERS if order is None else order)
    if layer not in order:
        raise DataValueError(layer, f"not an encoder layer; encoder layers: {order}")
    i = order.index(layer)
    return order[max(0, i - n):i][::-1]


def layer_summary(alignments: Mapping[str, Alignment], concepts: Sequence[str] = FRACTURE_CONCEPTS,
                  **kwargs) -> pd.DataFrame:
    """Item 7: per layer, units, grid-independent figures: detectors (any concept), detectors
    of ``concepts`` (fracture signs by default), mean best IoU, and the best unit per concept."""
    rows = []
    for name, al in alignments.items():
        t = unit_table(al, **kwargs)
        have = [c for c in concepts if c in al.names]
        row = {"layer": name, "n_units": al.n_units, "detectors": int(t["detector"].sum()),
               "fracture_detectors": int((t["detector"] & t["concept"].isin(have)).sum()),
               "mean_best_iou": float(t["iou"].mean())}
        for c in have:
            row[f"best_iou: {c}"] = float(al.iou[:, al.names.index(c)].max())
        rows.append(row)
    return pd.DataFrame(rows)
