"""Concept directions (Net2Vec probes) and dictionaries (NMF, PCA, random), issue 22, each against
an independent reference: constructed activations whose concept is a known mix of units, planted
NMF atoms, numpy's SVD, numpy quantiles and set IoU written out, brute force over thresholds and
over every set of cells."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from vfcore.analysis import dictionary as Y
from vfcore.analysis import directions as V
from vfcore.analysis.alignment import ConceptCounts, NoConceptMasksError
from vfcore.errors import DataValueError, InvalidParameterError

torch.set_num_threads(1)

GRID = (3, 3, 3)
CELLS = 27
VOLUME = 8          # voxels per cell


def _counts(count: np.ndarray, names=("mix", "other")) -> ConceptCounts:
    """ConceptCounts from count [N, cells, C] (totals = what lies in the cells)."""
    count = np.asarray(count, dtype=np.uint8)
    return ConceptCounts(list(names), count, count.sum(axis=1).astype(np.int64), GRID, VOLUME)


def _mix_data(n: int, seed: int):
    """A [n, 6, cells] >= 0; the concept fills a cell exactly where a0 + a1 + a2 > 2.4
    (a mix of three units); units 3-5 are noise. 'other' is a random concept."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(0, 1, size=(n, 6, CELLS)).astype(np.float32)
    mix = (A[:, 0] + A[:, 1] + A[:, 2] > 2.4)
    other = rng.uniform(size=(n, CELLS)) < 0.05
    count = np.stack([mix * VOLUME, other * VOLUME], axis=2)
    return A, _counts(count), rng.integers(0, 2, n)


def _set_iou(mask: np.ndarray, count: np.ndarray) -> float:
    """IoU of a block mask with a concept written out voxel by voxel (cells -> VOLUME voxels each,
    the first count[cell] of them in the concept)."""
    vox_c = np.arange(VOLUME)[None, None, :] < count[..., None]
    vox_m = np.broadcast_to(mask[..., None], vox_c.shape)
    return np.logical_and(vox_m, vox_c).sum() / np.logical_or(vox_m, vox_c).sum()


# --------------------------------------------------------------------------------------------
# the probe
# --------------------------------------------------------------------------------------------

def test_probe_recovers_a_mix_of_three_units_that_no_single_unit_is():
    A, cc, _ = _mix_data(300, 0)
    A_test, cc_test, y_test = _mix_data(200, 1)
    probe = V.fit_probe(A, cc, "mix", l2=1e-6, max_iter=200)
    truth = cc_test.counts[:, :, 0] > 0
    iou = _set_iou(probe.mask(A_test), cc_test.counts[:, :, 0])
    assert iou > 0.9
    # the weights: the three mixed units carry it, about equally; the noise units do not
    w = probe.unit_weights()
    assert np.all(w[:3] > 5 * np.abs(w[3:]).max())
    # the same IoU from the alignment (block_alignment), column 'mix'
    al = V.probe_alignment(probe, A_test, cc_test, y_test, n_perm=50)
    assert al.iou[0, 0] == pytest.approx(iou)
    assert al.p[0, 0] == pytest.approx(1 / 51)
    # no single unit does: neither its dissection mask nor its best threshold on the test set
    for k in range(6):
        u_mask = A_test[:, k] > np.quantile(A_test[:, k], 0.8)
        assert _set_iou(u_mask, cc_test.counts[:, :, 0]) < 0.5
        assert max(_set_iou(A_test[:, k] > t, cc_test.counts[:, :, 0]) for t in np.linspace(0, 1, 41)) < 0.5
    assert truth.any()


def test_iou_vs_units_needs_the_three_mixed_units():
    A, cc, _ = _mix_data(300, 0)
    A_test, cc_test, _ = _mix_data(200, 1)
    t = V.iou_vs_units(A, cc, A_test, cc_test, "mix", ks=(1, 2, 3, 0), l2=1e-6, max_iter=200)
    assert list(t["k"]) == [1, 2, 3, 6]
    assert set(t.loc[t["k"] == 3, "units"].iloc[0]) == {0, 1, 2}
    assert t["iou"].iloc[2] > 0.9 and t["iou"].iloc[0] < 0.5
    assert t["iou"].iloc[0] < t["iou"].iloc[1] < t["iou"].iloc[2]


def test_best_cut_is_the_best_threshold_by_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        scores = rng.integers(0, 12, size=(4, CELLS)).astype(float)   # ties on purpose
        count = rng.integers(0, VOLUME + 1, size=(4, CELLS)) * (rng.uniform(size=(4, CELLS)) < 0.4)
        theta, iou = V.best_cut(scores, count, VOLUME)
        brute = max(_set_iou(scores > t, count) for t in np.unique(scores) - 0.5)
        assert iou == pytest.approx(brute)
        assert _set_iou(scores > theta, count) == pytest.approx(iou)


def test_oracle_is_the_best_set_of_cells():
    rng = np.random.default_rng(4)
    count = rng.integers(0, VOLUME + 1, size=(1, 9)) * (rng.uniform(size=(1, 9)) < 0.6)
    count[0, 0] = 3
    cc = ConceptCounts(["c"], count[:, :, None].astype(np.uint8), count.sum(axis=1)[:, None], (1, 3, 3), VOLUME)
    best = max(_set_iou(np.array([[i in s for i in range(9)]]), count)
               for r in range(1, 10) for s in itertools.combinations(range(9), r))
    assert V.oracle_iou(cc, "c") == pytest.approx(best)


def test_best_unit_is_chosen_on_the_given_set():
    A, cc, _ = _mix_data(200, 0)
    A[:, 4] = cc.counts[:, :, 0] + 0.01 * A[:, 4]         # unit 4 copies the concept
    unit, iou = V.best_unit(A, cc, "mix", q_tail=0.05)
    assert unit == 4
    T = np.quantile(A[:, 4], 0.95)
    assert iou == pytest.approx(_set_iou(A[:, 4] > T, cc.counts[:, :, 0]))


def test_relative_and_binary_features():
    A = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    rel = V.cell_features(A, "relative")
    assert np.allclose(rel, A - A.mean(axis=2, keepdims=True))
    assert np.array_equal(V.cell_features(A, "binary", np.array([4.0, 8.0])), (A > np.array([4.0, 8.0])[None, :, None]))
    assert np.allclose(V.cell_targets(_counts(np.full((1, CELLS, 2), 2)), "mix"), 2 / VOLUME)
    assert np.array_equal(V.cell_targets(_counts(np.full((1, CELLS, 2), 2)), "mix", "any"), np.ones((1, CELLS)))


def test_coarse_cells_on_a_finer_grid_are_kronecker_blocks():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((2, 3, 8)).astype(np.float32)          # a 2^3 grid
    fine = V.on_finer_grid(A, (2, 2, 2), 2)
    for i in range(2):
        for k in range(3):
            ref = np.kron(A[i, k].reshape(2, 2, 2), np.ones((2, 2, 2)))
            assert np.array_equal(fine[i, k], ref.ravel())


def test_cross_validation_of_a_recoverable_concept():
    A, cc, _ = _mix_data(120, 0)
    groups = np.repeat(np.arange(30), 4)                 # 4 vertebrae a patient
    assert V.cross_val_iou(A, cc, "mix", groups, n_folds=3, l2=1e-6, max_iter=200) > 0.85
    with pytest.raises(InvalidParameterError, match="n_folds"):
        V.cross_val_iou(A, cc, "mix", groups, n_folds=31)


# --------------------------------------------------------------------------------------------
# dictionaries
# --------------------------------------------------------------------------------------------

def test_nmf_recovers_planted_atoms():
    rng = np.random.default_rng(0)
    W = np.zeros((4, 10))
    for j, support in enumerate(([0, 1, 2], [2, 3, 4], [5, 6, 7], [7, 8, 9, 0])):
        W[j, support] = rng.uniform(0.5, 1.5, len(support))
    U = rng.uniform(0, 1, (600, 4)) * (rng.uniform(size=(600, 4)) < 0.4)
    X = U @ W
    codes, atoms = Y.nmf(X, 4, n_iter=2000, seed=0)
    assert np.all(codes >= 0) and np.all(atoms >= 0)
    cos = (atoms / np.linalg.norm(atoms, axis=1, keepdims=True)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.99
    assert np.linalg.norm(X - codes @ atoms) / np.linalg.norm(X) < 0.02
    # the codes of new data with the atoms fixed: the planted codes (up to the atoms' scale)
    U_new = rng.uniform(0, 1, (50, 4)) * (rng.uniform(size=(50, 4)) < 0.4)
    got = Y.nmf_codes(U_new @ W, atoms, n_iter=2000)
    scale = np.linalg.norm(W, axis=1)[cols]
    assert np.allclose(got[:, rows], U_new[:, cols] * scale, atol=0.05)


def test_pca_directions_match_numpy_svd():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 3.0
    _, _, Vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    V3 = Y.pca_directions(X, 3, both_signs=False)
    for v, ref in zip(V3, Vt[:3]):
        assert np.allclose(v, ref * np.sign(v @ ref), atol=1e-6)
    signed = Y.pca_directions(X, 3)
    assert np.allclose(signed[0::2], V3) and np.allclose(signed[1::2], -V3)


def test_random_directions_are_unit_length_and_seeded():
    D = Y.random_directions(8, 5, seed=2)
    assert D.shape == (5, 8) and np.allclose(np.linalg.norm(D, axis=1), 1)
    assert np.array_equal(D, Y.random_directions(8, 5, seed=2))


def test_a_one_hot_direction_is_dissected_exactly_as_its_unit():
    A, cc, labels = _mix_data(80, 5)
    k, q = 2, 0.05
    S = Y.direction_scores(A, np.eye(6)[[k]])
    T, al = Y.dissect_directions(S, cc, labels, q_tail=q, n_perm=20)
    # the unit by hand: numpy's quantile over every cell of every sample, the mask, the IoU
    T_ref = np.quantile(A[:, k], 1 - q)
    assert T[0] == pytest.approx(T_ref)
    for j, name in enumerate(cc.names):
        assert al.iou[0, j] == pytest.approx(_set_iou(A[:, k] > T_ref, cc.counts[:, :, j]))
    # and the package's own path for units gives the same alignment, shuffle included
    al_units = V.unit_alignment(A, cc, q, labels, n_perm=20, units=[k])
    assert np.array_equal(al.inter, al_units.inter) and np.array_equal(al.p, al_units.p)


def test_basis_scores_and_table():
    A, cc, labels = _mix_data(60, 6)
    S = Y.basis_scores(A[:40], A[40:], n_atoms=4, n_pca=2, n_random=3, nmf_iter=20)
    assert [s.shape[1] for s in S.values()] == [6, 4, 4, 3]
    sub = ConceptCounts(cc.names, cc.counts[40:], cc.totals[40:], GRID, VOLUME)
    als = {name: Y.dissect_directions(s, sub, labels[40:], q_tail=0.05, n_perm=20)[1] for name, s in S.items()}
    t = Y.basis_table(als, concepts=["mix"], alpha=0.1)
    assert list(t["basis"]) == list(S) and list(t["n_directions"]) == [6, 4, 4, 3]
    for name, al in als.items():
        assert t.set_index("basis").loc[name, "best_iou: mix"] == pytest.approx(al.iou[:, 0].max())


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_input_raises_typed_errors():
    A, cc, labels = _mix_data(20, 0)
    with pytest.raises(InvalidParameterError, match="concept"):
        V.fit_probe(A, cc, "no such concept")
    with pytest.raises(NoConceptMasksError, match="concept masks"):
        V.cell_targets(None, "mix")
    with pytest.raises(DataValueError, match="cells"):
        V.fit_probe(A[:, :, :10], cc, "mix")
    with pytest.raises(DataValueError, match=r"\[N, K, cells\]"):
        V.fit_probe(A[0], cc, "mix")
    with pytest.raises(InvalidParameterError, match="features"):
        V.fit_probe(A, cc, "mix", features="log")
    probe = V.fit_probe(A, cc, "mix", max_iter=5)
    with pytest.raises(DataValueError, match="6"):
        probe.mask(A[:, :4])
    with pytest.raises(DataValueError, match="no voxel"):
        V.fit_probe(A, _counts(np.zeros((20, CELLS, 2))), "mix")
    with pytest.raises(DataValueError, match="non-negative"):
        Y.nmf(-np.ones((5, 3)), 2)
    with pytest.raises(DataValueError, match="directions"):
        Y.direction_scores(A, np.eye(5))
    with pytest.raises(DataValueError, match="scores"):
        Y.dissect_directions(A[:10], cc)
    with pytest.raises(InvalidParameterError, match="n_atoms"):
        Y.nmf(np.ones((5, 3)), 0)
    with pytest.raises(DataValueError, match="groups"):
        V.cross_val_iou(A, cc, "mix", np.arange(5))


def test_probe_table_columns_on_constructed_data():
    A, cc, _ = _mix_data(150, 0)
    A_test, cc_test, y_test = _mix_data(100, 1)
    noise, noise_test = np.repeat(A[:, 3:4], 6, axis=1), np.repeat(A_test[:, 3:4], 6, axis=1)   # "untrained"
    t = V.probe_table(A, cc, A_test, cc_test, y_test, ["mix"], noise, noise_test, n_perm=20, q_tail=0.05,
                      l2=1e-6, max_iter=200)
    row = t.iloc[0]
    assert row["iou"] > 0.9 and row["unit_iou"] < 0.5 and row["untrained_iou"] < 0.5
    assert row["oracle_iou"] == pytest.approx(1.0) and row["oracle_iou"] >= row["iou"]
    assert (row["n_train"], row["n_test"]) == (150, 100)
    with pytest.raises(InvalidParameterError, match="concept"):
        V.probe_table(A, cc, A_test, cc_test, y_test, ["mix", "nope"], n_perm=0)
