"""Concept directions: is a concept a *linear read-out* of many units, where no single unit is? (Net2Vec)

Fong & Vedaldi (Net2Vec, CVPR 2018) learn per concept c a weight vector over all K units of a
layer, a 1x1 convolution plus a sigmoid, and compare its segmentation IoU with the best single
unit's. Here, per grid cell x of the dissected layer (8^3 cells of 8 mm on the phantom):

    p_c(x) = sigmoid(w . z(x) + b),   z(x) = the cell's K activations, standardised on the training split

fitted on the **training** split by the cross-entropy with soft targets t(x), the fraction of
the cell inside the concept (:func:`cell_targets`; Net2Vec's per-pixel loss of a prediction
that is constant on a block is exactly this soft target),

    L = - mean_x [ alpha t(x) log p(x) + (1 - alpha) (1 - t(x)) log(1 - p(x)) ] / Z + l2 |w|^2,

alpha = 1/2 by default (plain BCE: p estimates the cell's expected concept fraction, the order
in which block cells best raise the set IoU); Net2Vec's class weighting alpha = 1 - mean t
(``src/linearprobe_pytorch.py``) is ``weighting="net2vec"``; Z = the mean class weight. The
default was chosen on the training split alone: patient-grouped 2-fold cross-validation
(:func:`cross_val_iou`) preferred it to Net2Vec's weighting for each of 10 phantom concepts.
The probe's mask on a vertebra is the cells where p_c(x) > theta, theta chosen on the training
split too (:func:`best_cut`: the set IoU is maximal there), never on the held-out set.

Scored like a unit: the block mask's IoU with the concept summed over the held-out dissected
set, with the same-class shuffle (:func:`probe_alignment` hands the masks to
:func:`vfcore.analysis.alignment.block_alignment`). Against: the best single unit for the
concept chosen on the training split (:func:`best_unit`), the same probe on an untrained
network, the shuffle, and the held-out IoU as a function of how many units the probe keeps
(:func:`iou_vs_units`: the k largest |w| of the full probe, refitted on those k units).

:func:`oracle_iou` is the ceiling of any block mask on that grid: the best set of cells chosen
*knowing* the concept. Activations come as A [N, K, cells] (cells in C order, as the dissection's
positions; :func:`cell_activations`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from vfcore.analysis.alignment import (FRACTURE_CONCEPTS, N_PERM, Alignment, ConceptCounts, block_alignment,
                                       mask_entries, no_concept_masks)
from vfcore.dissect.capture import activations
from vfcore.dissect.quantile import Q_TAIL_PAPER, M_k, TopQuantile
from vfcore.errors import DataValueError, InvalidParameterError

#: The concepts probed by default: the fracture signs and a few anatomy ones (all target-relative).
PROBE_CONCEPTS = FRACTURE_CONCEPTS + ("vertebral body", "trabecular core", "disc above", "posterior elements",
                                      "spinal canal")
#: What a probe reads from a cell: its activations, the activations minus the vertebra's mean
#: (per unit, over the cells of the sample), or A_k > T_k (Net2Vec's binarised input).
FEATURES = ("raw", "relative", "binary")
#: The cell's target: the fraction of the cell inside the concept, or 1 if any voxel is.
TARGETS = ("fraction", "any")
#: The class weighting: Net2Vec's alpha = 1 - mean target, or none (alpha = 1/2, plain BCE; the default).
WEIGHTINGS = ("net2vec", "none")
#: The k of the IoU-vs-units curve (0 stands for all units).
KS = (1, 2, 3, 5, 10, 20, 30, 64, 0)


# --------------------------------------------------------------------------------------------
# Inputs: activations per cell, targets per cell
# --------------------------------------------------------------------------------------------

def cell_activations(model: torch.nn.Module, patches, layer: str, transform: Callable | None = None,
                     batch_size: int = 16, device: str | None = None) -> np.ndarray:
    """A [N, K, cells] float32: ``layer``'s activations of every patch, cells flattened in C order
    (fp32, eval mode: :func:`vfcore.dissect.activations`, as the dissection computes them)."""
    A, _ = activations(model, patches, layer, batch_size=batch_size, transform=transform, device=device)
    return A.reshape(A.shape[0], A.shape[1], -1)


def cell_vectors(A) -> np.ndarray:
    """A [N, K, *grid] or [N, K, cells] -> X [N * cells, K]: row i * cells + c is cell c (C order) of
    sample i, as the rows of ``ConceptCounts.counts.reshape(-1, C)``."""
    a = np.asarray(A)
    a = a.reshape(len(a), a.shape[1], -1)
    return np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(-1, a.shape[1])


def check_activations(A, counts: ConceptCounts | None = None, name: str = "A") -> np.ndarray:
    """``A`` as float32 [N, K, cells]; :class:`DataValueError` when it is not 3-D, not finite,
    or does not match ``counts`` (same samples and cells)."""
    A = np.asarray(A, dtype=np.float32)
    if A.ndim != 3 or A.shape[0] == 0 or A.shape[1] == 0:
        raise DataValueError(name, f"expected activations [N, K, cells] with N, K > 0, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise DataValueError(name, "NaN or inf in the activations")
    if counts is not None:
        n, cells = counts.counts.shape[:2]
        if A.shape[0] != n or A.shape[2] != cells:
            raise DataValueError(name, f"{A.shape[0]} samples x {A.shape[2]} cells, but the concept counts have "
                                 f"{n} x {cells}: another set or grid?")
    return A


def concept_index(counts: ConceptCounts | None, concept: str) -> int:
    """The column of ``concept`` in ``counts``; :class:`NoConceptMasksError` without counts,
    :class:`InvalidParameterError` for an unknown name."""
    if counts is None:
        raise no_concept_masks("counts")
    if concept not in counts.names:
        raise InvalidParameterError("concept", f"one of {list(counts.names)}", concept)
    return list(counts.names).index(concept)


def cell_targets(counts: ConceptCounts, concept: str, kind: str = "fraction") -> np.ndarray:
    """t [N, cells] float32: the fraction of each cell inside ``concept`` (``"fraction"``), or
    1 where any voxel of the cell is (``"any"``)."""
    if kind not in TARGETS:
        raise InvalidParameterError("kind", f"one of {TARGETS}", kind)
    j = concept_index(counts, concept)
    c = counts.counts[:, :, j].astype(np.float32)
    return c / counts.cell_volume if kind == "fraction" else (c > 0).astype(np.float32)


def unit_thresholds(A: np.ndarray, q_tail: float = Q_TAIL_PAPER) -> np.ndarray:
    """T_k [K] of A [N, K, cells] as the dissection computes them (exact, ``TopQuantile``)."""
    tq = TopQuantile(q_tail, A.shape[0])
    tq.update(torch.from_numpy(np.ascontiguousarray(A)))
    return tq.thresholds()


def cell_features(A: np.ndarray, kind: str = "raw", T: np.ndarray | None = None) -> np.ndarray:
    """[N, K, cells] what the probe reads: ``"raw"`` A, ``"relative"`` A minus the sample's mean
    over its cells (per unit), ``"binary"`` A_k > T_k (``T`` [K], Net2Vec's input)."""
    if kind == "raw":
        return A
    if kind == "relative":
        return A - A.mean(axis=2, keepdims=True)
    if kind == "binary":
        if T is None:
            raise DataValueError("T", "binary features need the thresholds T_k")
        return M_k(A, T, axis=1).astype(np.float32)
    raise InvalidParameterError("features", f"one of {FEATURES}", kind)


def _design(A: np.ndarray, units: np.ndarray, kind: str, T: np.ndarray | None) -> torch.Tensor:
    """X [N * cells, k] float32 (row = sample * cells + cell): the features of ``units``."""
    f = cell_features(A, kind, T)[:, units]
    return torch.from_numpy(np.ascontiguousarray(f.transpose(0, 2, 1), dtype=np.float32)).reshape(-1, len(units))


# --------------------------------------------------------------------------------------------
# The threshold of a mask: the best set IoU of block masks
# --------------------------------------------------------------------------------------------

def _iou_curve(scores: np.ndarray, count: np.ndarray, total: int, cell_volume: int):
    """Cells sorted by score (descending) and the set IoU of the mask made of the first m
    cells, m = 1..n: |M & C| = cumulative count, |M | C| = m * cell_volume + |C| - |M & C|."""
    order = np.argsort(-scores, kind="stable")
    inter = np.cumsum(count[order].astype(np.float64))
    union = cell_volume * np.arange(1, len(order) + 1) + float(total) - inter
    return order, np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_cut(scores, count, cell_volume: int, total: int | None = None) -> tuple[float, float]:
    """(theta, IoU): the threshold on ``scores`` [N, cells] whose block mask scores > theta has
    the largest set IoU with the concept (``count`` [N, cells] its voxels per cell; ``total``
    |C| in the field, default the sum of ``count``). Exact: only the m highest cells can form the
    best mask of m cells, so every m is tried; theta lies halfway between the m-th and the next
    score (cells tied with the m-th are all in or all out)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    c = np.asarray(count).ravel()
    total = int(c.sum()) if total is None else int(total)
    if total == 0:
        raise DataValueError("count", "the concept has no voxel in this set: no threshold to choose")
    order, iou = _iou_curve(s, c, total, cell_volume)
    sorted_s = s[order]
    distinct = np.append(sorted_s[1:] < sorted_s[:-1], True)   # a cut only where the score drops
    m = int(np.argmax(np.where(distinct, iou, -1.0)))
    below = sorted_s[m + 1] if m + 1 < len(s) else sorted_s[m] - 1.0
    return float((sorted_s[m] + below) / 2), float(iou[m])


def oracle_mask(counts: ConceptCounts, concept: str) -> np.ndarray:
    """[N, cells] bool: the block mask with the largest set IoU any mask on this grid can reach,
    the cells chosen *knowing* the concept (most concept voxels first; :func:`best_cut` of the
    counts themselves): the ceiling of every unit, probe and direction."""
    j = concept_index(counts, concept)
    c = counts.counts[:, :, j]
    theta, _ = best_cut(c, c, counts.cell_volume, int(counts.totals[:, j].sum()))
    return c > theta


def oracle_iou(counts: ConceptCounts, concept: str) -> float:
    """The set IoU of :func:`oracle_mask`."""
    j = concept_index(counts, concept)
    return _set_iou(oracle_mask(counts, concept), counts.counts[:, :, j], int(counts.totals[:, j].sum()),
                    counts.cell_volume)


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------

@dataclass
class Probe:
    """A fitted read-out of one concept: p(x) = sigmoid(w . (f(x)[units] - mean) / std + b) on
    a layer of ``n_units`` units; ``threshold`` theta on p; ``train_iou`` the set IoU on the
    training split at theta; ``features``/``target``/``weighting`` as fitted (``unit_T`` [K]:
    the training split's T_k for binary features); ``n_train`` training samples."""

    concept: str
    n_units: int
    units: np.ndarray
    weight: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    threshold: float = 0.5
    train_iou: float = 0.0
    features: str = "raw"
    target: str = "fraction"
    weighting: str = "none"
    unit_T: np.ndarray | None = field(default=None, repr=False)
    n_train: int = 0

    def probability(self, A) -> np.ndarray:
        """p [N, cells] for activations A [N, K, cells] of the layer the probe was fitted on."""
        A = check_activations(A)
        if A.shape[1] != self.n_units:
            raise DataValueError("A", f"{A.shape[1]} units, the probe was fitted on a layer of {self.n_units}")
        x = _design(A, self.units, self.features, self.unit_T)
        z = (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)
        return torch.sigmoid(z @ torch.from_numpy(self.weight) + self.bias).numpy().reshape(A.shape[0], -1)

    def mask(self, A) -> np.ndarray:
        """The probe's block mask [N, cells] bool: p > theta."""
        return self.probability(A) > self.threshold

    def unit_weights(self) -> np.ndarray:
        """w [K] over all units of the layer (0 for the units the probe does not read)."""
        w = np.zeros(self.n_units)
        w[self.units] = self.weight
        return w


def fit_probe(A, counts: ConceptCounts, concept: str, *, units: Sequence[int] | None = None,
              features: str = "raw", target: str = "fraction", weighting: str = "none",
              threshold: float | str = "train", l2: float = 1e-4, max_iter: int = 100,
              q_tail: float = Q_TAIL_PAPER) -> Probe:
    """Fit the read-out of ``concept`` on A [N, K, cells] (training split) and its concept counts.

    ``units``: read only these (default all); ``features`` in :data:`FEATURES`, ``target`` in
    :data:`TARGETS`, ``weighting`` in :data:`WEIGHTINGS`; ``threshold``: ``"train"`` (the best
    set IoU on this split, :func:`best_cut`) or a number (e.g. Net2Vec's 0.5). Full-batch
    L-BFGS (strong Wolfe) from w = 0, deterministic; ``l2`` on the standardised weights.
    """
    A = check_activations(A, counts)
    for name, value, allowed in (("features", features, FEATURES), ("target", target, TARGETS),
                                 ("weighting", weighting, WEIGHTINGS)):
        if value not in allowed:
            raise InvalidParameterError(name, f"one of {allowed}", value)
    if not (threshold == "train" or isinstance(threshold, (int, float))):
        raise InvalidParameterError("threshold", "'train' or a number in (0, 1)", threshold)
    j = concept_index(counts, concept)
    t = torch.from_numpy(cell_targets(counts, concept, target))
    if float(t.sum()) == 0:
        raise DataValueError(concept, "no voxel of this concept in the training set: nothing to fit")
    units = np.arange(A.shape[1]) if units is None else np.asarray(units, dtype=np.int64)
    if len(units) == 0 or units.min() < 0 or units.max() >= A.shape[1]:
        raise DataValueError("units", f"need unit indices in [0, {A.shape[1]}), got {units.tolist()}")
    T = unit_thresholds(A, q_tail) if features == "binary" else None
    x = _design(A, units, features, T)                              # [N * cells, k]
    mean, std = x.numpy().mean(axis=0), x.numpy().std(axis=0)      # numpy's: 10x faster than torch's here
    mean, std = torch.from_numpy(mean), torch.from_numpy(np.where(std > 0, std, 1).astype(np.float32))
    x = (x - mean) / std
    y = t.reshape(-1)
    ybar = float(y.mean())
    alpha = 1.0 - ybar if weighting == "net2vec" else 0.5
    scale = alpha * ybar + (1 - alpha) * (1 - ybar)     # the mean class weight is 1: l2 means the same for both
    w = torch.zeros(len(units), requires_grad=True)
    b = torch.tensor(float(np.log(ybar / (1 - ybar))), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-7, history_size=20)

    def closure():
        opt.zero_grad()
        logit = x @ w + b
        # log p = logsigmoid(logit), log(1 - p) = logsigmoid(-logit): stable for large |logit|
        loss = -(alpha * y * torch.nn.functional.logsigmoid(logit)
                 + (1 - alpha) * (1 - y) * torch.nn.functional.logsigmoid(-logit)).mean() / scale + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    probe = Probe(concept, int(A.shape[1]), units, w.detach().numpy(), float(b.detach()), mean.numpy(), std.numpy(),
                  features=features, target=target, weighting=weighting, unit_T=T, n_train=int(A.shape[0]))
    with torch.no_grad():
        p = torch.sigmoid(x @ w + b).numpy().reshape(A.shape[0], -1)
    count = counts.counts[:, :, j]
    if threshold == "train":
        probe.threshold, probe.train_iou = best_cut(p, count, counts.cell_volume, int(counts.totals[:, j].sum()))
    else:
        probe.threshold = float(threshold)
        probe.train_iou = _set_iou(p > probe.threshold, count, int(counts.totals[:, j].sum()), counts.cell_volume)
    return probe


def _set_iou(mask: np.ndarray, count: np.ndarray, total: int, cell_volume: int) -> float:
    inter = float(count[mask].sum())
    union = mask.sum() * cell_volume + total - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Scoring: block masks -> alignment.block_alignment (the units' IoU and shuffle, unchanged)
# --------------------------------------------------------------------------------------------

def mask_alignment(M, counts: ConceptCounts, labels=None, n_perm: int = N_PERM, seed: int = 0,
                   layer: str = "") -> Alignment:
    """Set IoU of J block masks M [N, J, cells] (bool) with every concept, and the same-class
    shuffle when ``labels`` [N] are given: :func:`~vfcore.analysis.alignment.block_alignment`
    of :func:`~vfcore.analysis.alignment.mask_entries`, exactly as for the units."""
    M = np.asarray(M, dtype=bool)
    if M.ndim != 3 or M.shape[0] != counts.counts.shape[0] or M.shape[2] != counts.counts.shape[1]:
        raise DataValueError("M", f"expected masks [N={counts.counts.shape[0]}, J, cells="
                             f"{counts.counts.shape[1]}], got shape {M.shape}")
    return block_alignment(mask_entries(M), counts, M.shape[1], labels, n_perm, seed, layer=layer)


def probe_alignment(probes: Probe | Sequence[Probe], A, counts: ConceptCounts, labels=None,
                    n_perm: int = N_PERM, seed: int = 0, layer: str = "") -> Alignment:
    """:func:`mask_alignment` of the probes' masks on A [N, K, cells] (e.g. the held-out set):
    row j is ``probes[j]``; its own concept's column is its set IoU."""
    probes = [probes] if isinstance(probes, Probe) else list(probes)
    A = check_activations(A, counts)
    M = np.stack([p.mask(A) for p in probes], axis=1)
    return mask_alignment(M, counts, labels, n_perm, seed, layer)


def unit_alignment(A, counts: ConceptCounts, q_tail: float = Q_TAIL_PAPER, labels=None,
                   n_perm: int = 0, seed: int = 0, units: Sequence[int] | None = None) -> Alignment:
    """The units dissected on A [N, K, cells]: T_k of this set (as the dissection), masks A_k > T_k,
    block IoU with every concept (rows: ``units``, default all)."""
    A = check_activations(A, counts)
    units = np.arange(A.shape[1]) if units is None else np.asarray(units, dtype=np.int64)
    T = unit_thresholds(A, q_tail)
    return mask_alignment(M_k(A[:, units], T[units], axis=1), counts, labels, n_perm, seed)


def best_unit(A, counts: ConceptCounts, concept: str, q_tail: float = Q_TAIL_PAPER) -> tuple[int, float]:
    """(unit, IoU): the single unit whose mask A_k > T_k has the largest set IoU with ``concept``
    on this set (choose it on the training split; T_k of the same split)."""
    j = concept_index(counts, concept)
    iou = unit_alignment(A, counts, q_tail).iou[:, j]
    k = int(np.argmax(iou))
    return k, float(iou[k])


def iou_vs_units(A_train, counts_train: ConceptCounts, A_test, counts_test: ConceptCounts, concept: str,
                 ks: Sequence[int] = KS, full: Probe | None = None, labels=None, n_perm: int = 0,
                 seed: int = 0, **fit) -> pd.DataFrame:
    """How many units does a concept need? For each k in ``ks`` (0: all), the probe refitted on
    the k units with the largest |w| of the full probe (``full``, fitted here if None; weights
    of standardised units, so comparable) and its threshold chosen again on the training split.
    Columns: ``k``, ``units`` (the k units), ``train_iou``, ``threshold``, ``iou`` (held-out set
    IoU), ``p`` and ``shuffled_iou`` (the held-out shuffle, when ``labels`` and ``n_perm``)."""
    full = fit_probe(A_train, counts_train, concept, **fit) if full is None else full
    order = full.units[np.argsort(-np.abs(full.weight), kind="stable")]
    j = concept_index(counts_test, concept)
    probes, rows = [], []
    for k in ks:
        k = len(order) if k == 0 or k >= len(order) else int(k)
        probe = full if k == len(order) else fit_probe(A_train, counts_train, concept, units=np.sort(order[:k]), **fit)
        probes.append(probe)
        rows.append({"k": k, "units": order[:k].tolist(), "train_iou": probe.train_iou,
                     "threshold": probe.threshold})
    al = probe_alignment(probes, A_test, counts_test, labels, n_perm, seed)
    table = pd.DataFrame(rows)
    table["iou"] = al.iou[:, j]
    table["p"] = np.nan if al.p is None else al.p[:, j]
    table["shuffled_iou"] = np.nan if al.null_iou is None else al.null_iou[:, j]
    return table


def probe_table(A_train, counts_train: ConceptCounts, A_test, counts_test: ConceptCounts, labels_test,
                concepts: Sequence[str] = PROBE_CONCEPTS, A_train_untrained=None, A_test_untrained=None,
                n_perm: int = N_PERM, seed: int = 0, q_tail: float = Q_TAIL_PAPER, **fit) -> pd.DataFrame:
    """Per concept the figures of the comparison, all on the held-out set (n_test samples):

    ``iou``/``p``/``shuffled_iou``: the probe (fitted on the training split, threshold too);
    ``unit``, ``unit_train_iou``, ``unit_iou``, ``unit_p``: the best single unit chosen on the
    training split, its mask on the held-out set at the held-out T_k (as dissected);
    ``untrained_iou``/``untrained_p``: the same probe on the untrained network's activations (if
    given); ``oracle_iou``: the ceiling of block masks (:func:`oracle_mask`) and
    ``oracle_shuffled_iou`` its same-class shuffle: even the perfect mask beats its shuffle only
    by oracle_iou / oracle_shuffled_iou where a concept sits in the same place in every
    vertebra of a class; ``train_iou``/``threshold`` of the probe; ``n_train``, ``n_test``.
    """
    A_train, A_test = check_activations(A_train, counts_train, "A_train"), check_activations(A_test, counts_test, "A_test")
    for c in concepts:          # unknown names raise before any fit
        concept_index(counts_train, c), concept_index(counts_test, c)
    probes = [fit_probe(A_train, counts_train, c, q_tail=q_tail, **fit) for c in concepts]
    al = probe_alignment(probes, A_test, counts_test, labels_test, n_perm, seed)
    train_units = unit_alignment(A_train, counts_train, q_tail)
    picks = [int(np.argmax(train_units.iou[:, counts_train.names.index(c)])) for c in concepts]
    al_units = unit_alignment(A_test, counts_test, q_tail, labels_test, n_perm, seed, units=picks)
    al_oracle = mask_alignment(np.stack([oracle_mask(counts_test, c) for c in concepts], axis=1), counts_test,
                               labels_test, n_perm, seed)
    rows = []
    for i, c in enumerate(concepts):
        j = counts_test.names.index(c)
        rows.append({"concept": c, "iou": al.iou[i, j], "p": al.p[i, j] if al.p is not None else np.nan,
                     "shuffled_iou": al.null_iou[i, j] if al.null_iou is not None else np.nan,
                     "unit": picks[i], "unit_train_iou": train_units.iou[picks[i], counts_train.names.index(c)],
                     "unit_iou": al_units.iou[i, j],
                     "unit_p": al_units.p[i, j] if al_units.p is not None else np.nan,
                     "oracle_iou": al_oracle.iou[i, j],
                     "oracle_shuffled_iou": al_oracle.null_iou[i, j] if al_oracle.null_iou is not None else np.nan,
                     "train_iou": probes[i].train_iou,
                     "threshold": probes[i].threshold})
    table = pd.DataFrame(rows)
    if A_train_untrained is not None and A_test_untrained is not None:
        probes_u = [fit_probe(A_train_untrained, counts_train, c, q_tail=q_tail, **fit) for c in concepts]
        al_u = probe_alignment(probes_u, check_activations(A_test_untrained, counts_test, "A_test_untrained"),
                               counts_test, labels_test, n_perm, seed)
        cols = [counts_test.names.index(c) for c in concepts]
        table["untrained_iou"] = al_u.iou[np.arange(len(concepts)), cols]
        table["untrained_p"] = al_u.p[np.arange(len(concepts)), cols] if al_u.p is not None else np.nan
    table["n_train"], table["n_test"] = A_train.shape[0], A_test.shape[0]
    return table


def cross_val_iou(A, counts: ConceptCounts, concept: str, groups, n_folds: int = 2, seed: int = 0,
                  **fit) -> float:
    """Choose a probe's settings on the training split alone: the set IoU of probes fitted (and
    thresholded) on all but one fold and masked on that fold, pooled over the folds (sum of
    intersections / sum of unions). ``groups`` [N] (e.g. the patient): a group's samples stay in
    one fold, so neighbouring vertebrae of a patient never sit on both sides."""
    A = check_activations(A, counts)
    groups = np.asarray(groups)
    if groups.shape != (A.shape[0],):
        raise DataValueError("groups", f"expected {A.shape[0]} group labels, got shape {groups.shape}")
    unique = np.unique(groups)
    if not 2 <= n_folds <= len(unique):
        raise InvalidParameterError("n_folds", f"an integer in [2, {len(unique)}] (the groups)", n_folds)
    fold_of = dict(zip(np.random.default_rng(seed).permutation(unique), np.arange(len(unique)) % n_folds))
    fold = np.array([fold_of[g] for g in groups])
    j = concept_index(counts, concept)
    inter = union = 0.0
    for f in range(n_folds):
        train, test = fold != f, fold == f
        part = lambda keep: ConceptCounts(counts.names, counts.counts[keep], counts.totals[keep], counts.grid,
                                          counts.cell_volume)
        probe = fit_probe(A[train], part(train), concept, **fit)
        mask, count = probe.mask(A[test]), counts.counts[test, :, j]
        i = float(count[mask].sum())
        inter += i
        union += mask.sum() * counts.cell_volume + float(counts.totals[test, j].sum()) - i
    return inter / union if union > 0 else 0.0


def on_finer_grid(A, grid, factor: int = 2) -> np.ndarray:
    """A [N, K, prod(grid)] -> [N, K, prod(grid * factor)]: each cell's activations copied into
    its factor^3 sub-cells (C order), so a coarse layer can be read beside a finer one
    (``numpy.concatenate`` along K) on the finer layer's grid."""
    A = check_activations(A)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or int(np.prod(grid)) != A.shape[2]:
        raise DataValueError("grid", f"{grid} does not have the activations' {A.shape[2]} cells")
    a = A.reshape(A.shape[:2] + grid)
    for axis in (2, 3, 4):
        a = np.repeat(a, int(factor), axis=axis)
    return a.reshape(A.shape[0], A.shape[1], -1)
