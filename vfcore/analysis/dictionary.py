"""Other bases of a layer's cell space, each direction dissected exactly like a unit (NMF, PCA, random).

The units are one basis of the K-dimensional space of a cell's activations; Network Dissection
counts detectors in that basis only. Here other bases are found *without* the concept masks, on
the training split's cell vectors X [N * cells, K], and every direction j is then dissected like
unit k on the held-out set (:func:`dissect_directions`): its score S_j(x) on every cell, a
threshold T_j with P(S_j > T_j) = q_tail over the set (the dissection's exact
:class:`~vfcore.dissect.quantile.TopQuantile`), block masks S_j > T_j, set IoU with every
concept, the same-class shuffle and the detector rule (:func:`vfcore.analysis.alignment.block_alignment`,
:func:`~vfcore.analysis.alignment.unit_table`).

* NMF (as CRAFT, Fel et al. CVPR 2023): after the ReLU the cell vectors are non-negative, so
  X ~ U W with U [n, J] >= 0 (codes) and W [J, K] >= 0 (atoms), fitted by Lee & Seung's (2001)
  multiplicative updates for ||X - U W||_F^2 (:func:`nmf`); a direction's score on a cell is its
  code, the same updates with W fixed (:func:`nmf_codes`, CRAFT's ``transform``);
* PCA: the top eigenvectors of X's covariance (:func:`pca_directions`), each with both signs
  (a top-quantile threshold looks at one end only); score = projection a . v;
* random directions (Korznikov et al. 2026's baseline): Gaussian, unit length;
* the units: the identity (:func:`dissect_directions` of it reproduces the dissection).

:func:`basis_scores` makes the four from a training and a held-out set; :func:`basis_table`
compares them (detectors, mean best IoU, best IoU per fracture sign).
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from vfcore.analysis.alignment import (ALPHA, FRACTURE_CONCEPTS, IOU_THRESHOLD, N_PERM, Alignment, ConceptCounts,
                                       block_alignment, layer_summary)
from vfcore.analysis.directions import cell_vectors, check_activations
from vfcore.dissect.quantile import Q_TAIL_PAPER, TopQuantile
from vfcore.errors import DataValueError, InvalidParameterError

#: Default sizes: as many directions as the small preset's 128 units in every basis.
N_ATOMS = 128
N_PCA = 64          # x 2 signs
N_RANDOM = 128
#: Rows (cells) of the training split the NMF is fitted on (a seeded sample; all if fewer).
NMF_ROWS = 20_000


def _check_matrix(X, name: str = "X", nonnegative: bool = False) -> torch.Tensor:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataValueError(name, f"expected a matrix [rows, K], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise DataValueError(name, "NaN or inf in the matrix")
    if nonnegative and X.min() < 0:
        raise DataValueError(name, f"NMF needs non-negative data (after a ReLU); minimum {X.min():.3g}")
    return torch.from_numpy(np.ascontiguousarray(X))


def _check_count(name: str, n, most: int | None = None) -> int:
    if not isinstance(n, (int, np.integer)) or n < 1 or (most is not None and n > most):
        raise InvalidParameterError(name, f"an integer in [1, {most}]" if most else "a positive integer", n)
    return int(n)


# --------------------------------------------------------------------------------------------
# NMF (multiplicative updates), PCA, random
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _flush_denormals():
    """Flush float32 denormals to zero inside the block (``torch.set_flush_denormal``): the
    updates drive many entries towards 0, and denormal arithmetic made 200 iterations 10x
    slower than 100 on a CPU (measured: 7.4 s vs 0.8 s for 20,000 x 128 cells, J = 32)."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def nmf(X, n_atoms: int = N_ATOMS, n_iter: int = 200, seed: int = 0, eps: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """(U [n, J], W [J, K]) >= 0 with X ~ U W, by Lee & Seung's multiplicative updates

        U <- U * (X W^T) / (U W W^T),   W <- W * (U^T X) / (U^T U W),

    which never increase ||X - U W||_F^2 (Lee & Seung 2001, Theorem 1). Random non-negative start
    scaled to X's mean (as scikit-learn's ``init="random"``), seeded; atoms scaled to unit length
    at the end (the codes take the scale). ``X`` [n, K] >= 0, float32 torch; 200 iterations on
    20,000 x 128 cells take about 1 s for J = 32 and 6 s for J = 128 (one CPU thread)."""
    X = _check_matrix(X, nonnegative=True)
    n, K = X.shape
    J = _check_count("n_atoms", n_atoms)
    g = torch.Generator().manual_seed(int(seed))
    scale = float(np.sqrt(max(float(X.mean()), eps) / J))
    U = torch.rand(n, J, generator=g) * scale
    W = torch.rand(J, K, generator=g) * scale
    with _flush_denormals():
        for _ in range(int(n_iter)):
            U *= (X @ W.T) / (U @ (W @ W.T) + eps)
            W *= (U.T @ X) / ((U.T @ U) @ W + eps)
    norm = W.norm(dim=1).clamp_min(eps)
    return (U * norm).numpy(), (W / norm[:, None]).numpy()


def nmf_codes(X, atoms, n_iter: int = 200, seed: int = 0, eps: float = 1e-9) -> np.ndarray:
    """U [n, J] >= 0 with X ~ U W for fixed atoms W [J, K] (the U update of :func:`nmf` alone):
    the atoms' scores on new cells (CRAFT's ``transform``)."""
    X = _check_matrix(X, nonnegative=True)
    W = _check_matrix(atoms, "atoms", nonnegative=True)
    if W.shape[1] != X.shape[1]:
        raise DataValueError("atoms", f"atoms of {W.shape[1]} dimensions for cell vectors of {X.shape[1]}")
    g = torch.Generator().manual_seed(int(seed))
    U = torch.rand(X.shape[0], W.shape[0], generator=g) * float(np.sqrt(max(float(X.mean()), eps) / W.shape[0]))
    XW, WW = X @ W.T, W @ W.T
    with _flush_denormals():
        for _ in range(int(n_iter)):
            U *= XW / (U @ WW + eps)
    return U.numpy()


def pca_directions(X, n: int = N_PCA, both_signs: bool = True) -> np.ndarray:
    """[n, K] (or [2n, K]: v_1, -v_1, v_2, ...) the top-n principal directions of X [rows, K]:
    eigenvectors of the covariance (``numpy.linalg.eigh``), by decreasing variance, each signed so
    that its largest-magnitude entry is positive."""
    X = _check_matrix(X).double().numpy()
    n = _check_count("n", n, X.shape[1])
    vals, vecs = np.linalg.eigh(np.cov(X, rowvar=False))
    V = vecs[:, np.argsort(vals)[::-1][:n]].T
    V *= np.sign(V[np.arange(n), np.argmax(np.abs(V), axis=1)])[:, None]
    return np.stack([V, -V], axis=1).reshape(2 * n, -1) if both_signs else V


def random_directions(n_units: int, n: int = N_RANDOM, seed: int = 0) -> np.ndarray:
    """[n, K] directions uniform on the unit sphere (normalised Gaussians), seeded."""
    K, n = _check_count("n_units", n_units), _check_count("n", n)
    V = np.random.default_rng(seed).standard_normal((n, K))
    return V / np.linalg.norm(V, axis=1, keepdims=True)


def direction_scores(A, directions) -> np.ndarray:
    """S [N, J, cells] = directions [J, K] applied to every cell of A [N, K, cells] (a 1x1x1 conv)."""
    A = check_activations(A)
    D = np.asarray(directions, dtype=np.float32)
    if D.ndim != 2 or D.shape[1] != A.shape[1]:
        raise DataValueError("directions", f"expected [J, K={A.shape[1]}], got shape {D.shape}")
    return np.einsum("jk,nkc->njc", D, A, optimize=True)


def nmf_scores(A, atoms, n_iter: int = 200, seed: int = 0) -> np.ndarray:
    """S [N, J, cells]: the NMF codes (:func:`nmf_codes`) of every cell of A [N, K, cells]. Cost
    grows with J^2: for 316 vertebrae x 8^3 cells and 200 iterations about 40 s at J = 128,
    a few seconds at J = 32 (one thread, measured on the phantom run)."""
    A = check_activations(A)
    U = nmf_codes(cell_vectors(check_activations(A)), atoms, n_iter, seed)
    return np.ascontiguousarray(U.reshape(A.shape[0], A.shape[2], -1).transpose(0, 2, 1))


# --------------------------------------------------------------------------------------------
# Dissect directions like units
# --------------------------------------------------------------------------------------------

def dissect_directions(S, counts: ConceptCounts, labels=None, q_tail: float = Q_TAIL_PAPER,
                       n_perm: int = N_PERM, seed: int = 0, layer: str = "") -> tuple[np.ndarray, Alignment]:
    """(T [J], Alignment): every direction of S [N, J, cells] dissected as the units are: T_j with
    P(S_j > T_j) = q_tail over the N x cells values (exact, as T_k), the masks S_j > T_j
    (``TopQuantile.tail``, as the dissection's tail), their block IoU with every concept and the
    same-class shuffle (``labels`` [N]; None: no shuffle)."""
    S = np.asarray(S, dtype=np.float32)
    if S.ndim != 3 or S.shape[0] != counts.counts.shape[0] or S.shape[2] != counts.counts.shape[1]:
        raise DataValueError("S", f"expected scores [N={counts.counts.shape[0]}, J, cells={counts.counts.shape[1]}], "
                             f"got shape {S.shape}")
    tq = TopQuantile(q_tail, S.shape[0])
    tq.update(torch.from_numpy(np.ascontiguousarray(S)))
    return tq.thresholds(), block_alignment(tq.tail(), counts, S.shape[1], labels, n_perm, seed, layer=layer)


def basis_scores(A_train, A_test, n_atoms: int = N_ATOMS, n_pca: int = N_PCA, n_random: int = N_RANDOM,
                 seed: int = 0, nmf_iter: int = 200, nmf_rows: int = NMF_ROWS) -> dict[str, np.ndarray]:
    """{basis: S [N_test, J, cells]} for the units, NMF, PCA and random directions, each fitted on
    A_train [N, K, cells] (NMF on ``nmf_rows`` cells drawn with ``seed``) and scored on A_test."""
    A_train, A_test = check_activations(A_train, name="A_train"), check_activations(A_test, name="A_test")
    if A_train.shape[1] != A_test.shape[1]:
        raise DataValueError("A_test", f"{A_test.shape[1]} units, the training activations have {A_train.shape[1]}")
    X = cell_vectors(A_train)
    rows = np.random.default_rng(seed).choice(len(X), size=min(int(nmf_rows), len(X)), replace=False)
    _, atoms = nmf(X[np.sort(rows)], n_atoms, nmf_iter, seed)
    K = A_train.shape[1]
    return {"units": A_test.copy(),
            f"NMF ({n_atoms} atoms)": nmf_scores(A_test, atoms, nmf_iter, seed),
            f"PCA ({n_pca} x 2 signs)": direction_scores(A_test, pca_directions(X, min(n_pca, K))),
            f"random ({n_random})": direction_scores(A_test, random_directions(K, n_random, seed))}


def basis_table(alignments: Mapping[str, Alignment], concepts=FRACTURE_CONCEPTS,
                iou_threshold: float = IOU_THRESHOLD, alpha: float = ALPHA) -> pd.DataFrame:
    """Per basis: ``n_directions``, ``detectors`` (best IoU > ``iou_threshold`` and shuffle p <
    ``alpha``), ``fracture_detectors`` (of ``concepts``), ``mean_best_iou`` and the best IoU of
    any direction per concept (:func:`vfcore.analysis.alignment.layer_summary`, one row a basis)."""
    if not alignments:
        raise DataValueError("alignments", "no basis to compare")
    table = layer_summary(alignments, concepts, iou_threshold=iou_threshold, alpha=alpha)
    return table.rename(columns={"layer": "basis", "n_units": "n_directions"})
