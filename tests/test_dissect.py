"""vfcore.dissect against independent references: numpy.quantile, direct numpy computations of
M_k, E_x, c_k (Eq. 1) and r_k (Eq. 2), hand-made models and hand-computed small cases."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from vfcore import dissect as D
from vfcore.constants import AIR_HU
from vfcore.export import export_units
from vfcore.errors import (DataValueError, InvalidParameterError, LayerNotFoundError, MissingArtifactError,
                           StaleArtifactError)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------

def _ref_T(a: np.ndarray, q: float) -> np.ndarray:
    """numpy.quantile per unit over all samples and positions (the definition of T_k)."""
    K = a.shape[1]
    return np.array([np.quantile(a[:, k].ravel(), 1 - q) for k in range(K)], dtype=a.dtype)


def _stream(a: np.ndarray, q: float, batch: int, order=None, **kw) -> D.TopQuantile:
    tq = D.TopQuantile(q, **kw)
    order = np.arange(len(a)) if order is None else order
    for s in range(0, len(a), batch):
        tq.update(torch.from_numpy(a[order[s:s + batch]]))
    return tq


def _awkward(rng, N=23, K=6, shape=(3, 4, 2)) -> np.ndarray:
    """Random activations with the hard cases: ties, a constant unit, an all-zero unit, a
    ReLU-like mostly-zero unit, negative values."""
    a = rng.standard_normal((N, K, *shape)).astype(np.float32)
    a[:, 0] = np.round(a[:, 0] * 2) / 2          # heavy ties
    a[:, 1] = 0.0                                # all zero
    a[:, 2] = 1.25                               # constant
    relu = np.maximum(a[:, 3] - 2.0, 0)          # almost always zero
    a[:, 3] = relu
    return a


@pytest.mark.parametrize("q", [D.Q_TAIL_PAPER, D.quantile.Q_TAIL_PUBLISHED, 0.1, 0.37])
def test_thresholds_equal_numpy_quantile_for_every_batch_size_and_order(q):
    rng = np.random.default_rng(1)
    a = _awkward(rng)
    ref = _ref_T(a, q)
    for batch in (1, 2, 5, 7, 23, 64):          # 23 samples: never a multiple of most of them
        for order in (None, rng.permutation(len(a))):
            T = _stream(a, q, batch, order, n_samples=len(a)).thresholds()
            np.testing.assert_array_equal(T, ref)
    assert T.dtype == np.float32


@pytest.mark.parametrize("q, N", [(0.01, 1042), (0.005, 1559)])
def test_thresholds_equal_numpy_quantile_where_numpys_index_rounding_varies(q, N):
    """Sizes where numpy 2.0-2.3 (index (n - 1)(1 - q) in float32) read another order statistic
    than float64 arithmetic gives: still numpy.quantile of the installed numpy, bit for bit."""
    a = np.random.default_rng(7).standard_normal((N, 2, 512)).astype(np.float32)
    T = _stream(a, q, 256, n_samples=N).thresholds()
    np.testing.assert_array_equal(T, _ref_T(a, q))


def test_realised_tail_and_tail_entries_match_a_direct_count():
    rng = np.random.default_rng(2)
    a = _awkward(rng, N=31)
    q = 0.05
    tq = _stream(a, q, 4, n_samples=len(a))
    T = _ref_T(a, q)
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    expected = (flat > T[None, :, None]).mean(axis=(0, 2))
    np.testing.assert_allclose(tq.realised_tail(), expected, rtol=0, atol=1e-15)
    tail = tq.tail()
    got = set(zip(tail["unit"].tolist(), tail["sample"].tolist(), tail["position"].tolist()))
    s, k, p = np.nonzero(flat > T[None, :, None])
    assert got == set(zip(k.tolist(), s.tolist(), p.tolist()))
    np.testing.assert_array_equal(tail["value"], flat[tail["sample"], tail["unit"], tail["position"]])


def test_degenerate_units_are_flagged():
    rng = np.random.default_rng(3)
    a = _awkward(rng, N=40)
    flags = _stream(a, 0.005, 8, n_samples=40).flags()
    assert flags["constant"][1] and flags["constant"][2]           # all-zero and constant
    assert flags["never_fires"][1] and flags["never_fires"][2]
    assert flags["zero_threshold"][1] and not flags["zero_threshold"][2]
    assert flags["degenerate"][1] and flags["degenerate"][2]
    assert not flags["degenerate"][4] and not flags["degenerate"][5]  # plain Gaussian units


def test_smaller_q_from_the_same_buffer_and_buffer_size():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((50, 3, 8)).astype(np.float32)
    tq = _stream(a, 0.05, 6, n_samples=50)
    n = 50 * 8
    assert tq.values.shape[1] == int(np.ceil(0.05 * (n - 1))) + 1 == D.quantile.tail_size(n, 0.05)
    for q in (0.05, 0.01, 0.005, 0.001):
        np.testing.assert_array_equal(tq.thresholds(q), _ref_T(a, q))
    with pytest.raises(DataValueError, match="needs the top"):
        tq.thresholds(0.2)


def test_numpy_reading_below_the_kept_values_is_refused():
    from vfcore.dissect.quantile import numpy_quantile_of_top
    a = np.random.default_rng(9).standard_normal((1, 100)).astype(np.float32)
    top = -np.sort(-a, axis=1)
    np.testing.assert_array_equal(numpy_quantile_of_top(top[:, :3], 100, 0.01),
                                  np.array([np.quantile(a[0], 0.99)], dtype=np.float32))
    with pytest.raises(DataValueError, match="reads below"):
        numpy_quantile_of_top(top[:, :3], 100, 0.5)       # the median is not among the top 3


def test_the_buffer_is_sorted_once_per_state(monkeypatch):
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal((12, 3, 8)).astype(np.float32) for _ in range(2))
    tq = _stream(a, 0.05, 5, n_samples=12)
    sorts = []
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *x, **kw: sorts.append(1) or sort(*x, **kw))
    for _ in range(2):
        tq.thresholds(), tq.tail(), tq.realised_tail(), tq.flags(), tq.thresholds(0.01)
    assert len(sorts) == 2                      # one sort by index, one by value, once
    np.testing.assert_array_equal(tq.thresholds(), _ref_T(a, 0.05))
    tq.load_state_dict(_stream(b, 0.05, 5, n_samples=12).state_dict())   # a new state: read anew
    np.testing.assert_array_equal(tq.thresholds(), _ref_T(b, 0.05))
    assert len(sorts) == 4


def test_the_buffer_needs_every_promised_sample_and_finite_values():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((30, 2, 5)).astype(np.float32)
    np.testing.assert_array_equal(_stream(a, 0.01, 7, n_samples=30).thresholds(), _ref_T(a, 0.01))
    with pytest.raises(DataValueError, match="promised"):
        _stream(a[:20], 0.01, 7, n_samples=30).thresholds()
    with pytest.raises(DataValueError, match="more samples than n_samples"):
        _stream(a, 0.01, 7, n_samples=20)
    bad = a.copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(DataValueError, match="NaN"):
        _stream(bad, 0.01, 7, n_samples=30)
    with pytest.raises(InvalidParameterError, match=r"^q_tail must be in \(0, 1\).*; got 1\.5$"):
        D.TopQuantile(1.5, n_samples=30)
    with pytest.raises(InvalidParameterError, match=r"^n_samples must be a whole number >= 1; got 0$"):
        D.TopQuantile(0.01, n_samples=0)
    with pytest.raises(DataValueError, match=r"^TopQuantile\.update: NaN"):     # names the object, not a parameter
        _stream(bad, 0.01, 7, n_samples=30)


def test_sampled_sketch_is_only_approximate():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((200, 4, 64)).astype(np.float32)
    sketch = D.quantile.SampledQuantile(0.005, resolution=128, seed=0)
    for s in range(0, 200, 16):
        sketch.update(a[s:s + 16])
    est = sketch.thresholds()
    ref = _ref_T(a, 0.005)
    assert np.all(np.abs(est - ref) < 0.5)        # in the right region ...
    assert not np.array_equal(est, ref)           # ... but not the quantile


# --------------------------------------------------------------------------------------------
# A small hand-made network
# --------------------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """Conv + batch norm + ReLU + pool, a 'features' layer of 5 units on 4^3, dropout, a head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4),
                                        torch.nn.ReLU(), torch.nn.MaxPool3d(2))
        self.features = torch.nn.Sequential(torch.nn.Conv3d(4, 5, 3, padding=1), torch.nn.BatchNorm3d(5),
                                            torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(5 * 64, 1))

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():   # non-trivial running statistics, as after training
        for bn in (net.stem[1], net.features[1]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        net.features[0].weight[1] = 0.0          # unit 1 always zero after ReLU (bias < 0)
        net.features[0].bias[1] = -1.0
        net.features[1].bias[1] = -1.0
    x = torch.rand(37, 1, 8, 8, 8)
    labels = (torch.arange(37) % 3 == 0).int().numpy()
    return net, x, labels


def _reference_activations(net, x, batch):
    """The layer's output, captured with a plain hook and plain loops (independent of dissect)."""
    out = []
    h = net.features.register_forward_hook(lambda m, i, o: out.append(o.detach().clone()))
    net.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(net(x[s:s + batch]))[:, 0] for s in range(0, len(x), batch)])
    h.remove()
    return torch.cat(out).numpy(), probs.numpy()


def test_dissect_matches_a_direct_numpy_computation(tiny):
    net, x, labels = tiny
    q = 0.02
    d = D.dissect(net, x, "features", q_tail=q, batch_size=8, device="cpu", progress=False)
    A, p = _reference_activations(net, x, 8)
    T = _ref_T(A, q)
    np.testing.assert_array_equal(d.T, T)
    np.testing.assert_allclose(d.probability, p, rtol=1e-6)
    flat = A.reshape(37, 5, -1)
    M = flat > T[None, :, None]
    np.testing.assert_array_equal(d.mask_size, M.sum(axis=2))
    np.testing.assert_array_equal(d.enabled, M.any(axis=2))
    np.testing.assert_array_equal(d.enabled, d.max > d.T)               # E_x from the maxima
    np.testing.assert_allclose(d.r, (M * flat).sum(axis=2, dtype=np.float64), rtol=1e-12)
    np.testing.assert_array_equal(d.max, flat.max(axis=2))
    np.testing.assert_allclose(d.mean, flat.mean(axis=2), rtol=1e-6)
    for i in (0, 5, 36):
        np.testing.assert_array_equal(d.masks(i), M[i].reshape(5, 4, 4, 4))
        np.testing.assert_array_equal(d.E(i), np.flatnonzero(M[i].any(axis=1)))
        np.testing.assert_allclose(D.relevance(A[i], d.T), d.r[i], rtol=1e-12)
    np.testing.assert_allclose(D.relevance(A, d.T, axis=1), d.r, rtol=1e-12)
    np.testing.assert_array_equal(D.enabled_sets(A, d.T), d.enabled)
    assert d.flags["never_fires"][1] and d.flags["degenerate"][1]
    assert not np.isnan(d.r).any() and not np.isnan(d.mean).any()


def test_activations_do_not_depend_on_the_batch(tiny):
    """Eval mode: batch norm uses running statistics and dropout is off, so a sample's
    activations are the same alone, in a batch, or in a shuffled batch (up to the last bits
    of float32 arithmetic: oneDNN picks another convolution kernel for a batch of 1)."""
    net, x, _ = tiny
    net.train()                                   # as a careless caller would leave it
    alone, p_alone = D.activations(net, x[:6], "features", batch_size=1, device="cpu")
    together, p_together = D.activations(net, x[:6], "features", batch_size=6, device="cpu")
    perm = [4, 2, 0, 5, 1, 3]
    shuffled, _ = D.activations(net, x[perm], "features", batch_size=4, device="cpu")
    assert net.training and net.stem[1].training   # the caller's mode is restored
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shuffled, together[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p_alone, p_together, rtol=1e-5)
    # the published defect (batch statistics at inference) would fail the check above:
    with torch.no_grad():
        net.train()
        t1 = net.features(net.stem(x[:1].repeat(2, 1, 1, 1, 1)))[0]
        t6 = net.features(net.stem(x[:6]))[0]
    assert not torch.allclose(t1, t6, rtol=1e-3, atol=1e-3)
    # dissect with different batch sizes gives the same thresholds and statistics
    a = D.dissect(net, x, "features", q_tail=0.02, batch_size=5, device="cpu", progress=False)
    b = D.dissect(net, x, "features", q_tail=0.02, batch_size=37, device="cpu", progress=False)
    np.testing.assert_allclose(a.T, b.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.max, b.max, rtol=1e-5, atol=1e-6)


def test_unknown_layer_lists_the_available_ones(tiny):
    net, x, _ = tiny
    with pytest.raises(LayerNotFoundError) as err:
        D.dissect(net, x, "down_tr512", device="cpu", progress=False)
    assert "down_tr512" in str(err.value) and "features" in str(err.value) and "stem.0" in str(err.value)


# --------------------------------------------------------------------------------------------
# Eq. 1, rankings, exemplars (hand-made statistics)
# --------------------------------------------------------------------------------------------

def _made(enabled: np.ndarray, prob: np.ndarray, r: np.ndarray | None = None) -> D.Dissection:
    N, K = enabled.shape
    r = enabled * (1.0 + np.arange(N * K).reshape(N, K) % 7) if r is None else r
    return D.Dissection(
        layer="x", q_tail=0.005, spatial_shape=(1,), T=np.zeros(K, np.float32),
        realised_tail=np.full(K, 0.005), flags={"degenerate": np.zeros(K, bool)},
        unit_min=np.zeros(K), unit_max=np.ones(K), zero_fraction=np.zeros(K),
        max=r.astype(np.float32), mean=r.astype(np.float32) / 2, r=r.astype(np.float64),
        mask_size=enabled.astype(np.int32), probability=prob,
        tail={k: np.zeros(0, np.int32) for k in ("unit", "sample", "position", "value")})


def test_correlation_by_hand():
    #            unit: 0  1  2
    enabled = np.array([[1, 0, 1],    # TP
                        [1, 1, 0],    # TP
                        [0, 1, 0],    # FN (label 1, predicted 0)
                        [0, 1, 1],    # FP
                        [0, 0, 0]],   # TN
                       dtype=bool)
    labels = np.array([1, 1, 1, 0, 0])
    prob = np.array([0.9, 0.7, 0.2, 0.8, 0.1])
    d = _made(enabled, prob)
    o = D.outcomes(labels, prob)
    np.testing.assert_array_equal(D.correlation(enabled, o["tp"]), [1.0, 0.5, 0.5])
    np.testing.assert_array_equal(D.correlation(enabled, o["positive"]), [2 / 3, 2 / 3, 1 / 3])
    np.testing.assert_array_equal(D.correlation(enabled, o["fp"]), [0.0, 1.0, 1.0])  # / |FP| = 1
    t = D.rank_units(d, labels, "tp")
    assert t["unit"].tolist()[0] == 0 and t["rank"].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(t.set_index("unit").loc[[0, 1, 2], "c_positive"], [2 / 3, 2 / 3, 1 / 3])
    g = D.rank_units(d, labels, "positive")
    assert g["c_k"].tolist() == sorted(g["c_k"].tolist(), reverse=True)
    fp = D.rank_false_positives(d, labels)
    np.testing.assert_array_equal(fp.set_index("unit").loc[[0, 1, 2], "delta"], [-1.0, 0.5, 0.5])
    assert fp["unit"].tolist()[2] == 0


def test_undefined_correlation_is_an_error_not_a_division_by_zero():
    enabled = np.array([[1, 0], [0, 1]], dtype=bool)
    d = _made(enabled, np.array([0.1, 0.2]))             # nothing predicted positive
    with pytest.raises(D.UndefinedCorrelationError, match="no true-positive predictions"):
        D.rank_units(d, [1, 0], "tp")
    with pytest.raises(D.UndefinedCorrelationError, match="no false-positive"):
        D.rank_false_positives(d, [1, 0])
    d = _made(enabled, np.array([0.9, 0.2]))             # a TP, no FP
    t = D.rank_units(d, [1, 0], "tp")
    assert t["c_fp"].isna().all() and not t["c_k"].isna().any()


def test_exemplars_never_come_from_outside_the_subset():
    rng = np.random.default_rng(7)
    N, K = 40, 6
    enabled = rng.random((N, K)) < 0.5
    enabled[:, 5] = False
    enabled[3, 5] = enabled[31, 5] = True                # unit 5 fires in 2 samples only
    r = enabled * rng.random((N, K)) * 10
    d = _made(enabled, rng.random(N), r)
    subset = np.zeros(N, bool)
    subset[::3] = True                                    # samples 0, 3, 6, ..., 39
    for by in ("r", "max", "mean"):
        ex = D.exemplars(d, subset, k=25, by=by)
        for u, idx in ex.items():
            assert all(subset[i] for i in idx)
            score = {"r": d.r, "max": d.max, "mean": d.mean}[by][:, u]
            assert [score[i] for i in idx] == sorted((score[i] for i in idx), reverse=True)
    ex = D.exemplars(d, subset, k=25)
    assert ex[5] == [3]                                   # 31 fires but is not in the subset
    for u in range(5):                                    # the k best of the subset that fire
        cand = [i for i in range(N) if subset[i] and enabled[i, u]]
        best = sorted(cand, key=lambda i: (-r[i, u], i))[:25]
        assert ex[u] == best


# --------------------------------------------------------------------------------------------
# Geometry and exports
# --------------------------------------------------------------------------------------------

def test_upsampling_puts_a_feature_voxel_on_its_input_block():
    A = np.zeros((2, 8, 8, 8), np.float32)
    A[0, 2, 5, 7] = 1.0
    field = (slice(16, 80),) * 3                           # paper: centre 64^3 crop of 96^3
    up = D.upsample_to_patch(A, field)
    assert up.shape == (2, 96, 96, 96) and up.dtype == np.float32
    peak = np.array(np.unravel_index(np.argmax(up[0]), up[0].shape))
    centre = 16 + np.array([2, 5, 7]) * 8 + 3.5            # block [16 + 8i, 24 + 8i)
    assert np.all(np.abs(peak - centre) <= 0.5)
    assert not up[0][:16].any() and not up[0][80:].any()
    assert not up[1].any() and not np.isnan(up).any()       # all-zero unit: zeros, no NaN
    assert D.best_slice(up[1], 0.0) == 48
    assert D.best_slice(up[0], 0.5, "sagittal") in (16 + 7 * 8 + 3, 16 + 7 * 8 + 4)


def test_nifti_exports_overlay_and_have_no_nan(tmp_path):
    ct = np.random.default_rng(0).integers(-1000, 1500, (96, 96, 96)).astype(np.int16)
    act = np.zeros((96, 96, 96), np.float32)               # an all-zero unit
    affine = D.geometry.canonical_patch_affine()
    paths = D.geometry.write_nifti_exemplar(tmp_path, "rank1_case_L1", ct, act, 0.0, affine)
    imgs = {k: nib.load(p) for k, p in paths.items()}
    for img in imgs.values():
        np.testing.assert_allclose(img.affine, affine)
        assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert not np.isnan(img.get_fdata()).any()
    np.testing.assert_array_equal(imgs["ct"].get_fdata(), ct)
    assert (imgs["masked_ct"].get_fdata() == AIR_HU).all()
    # the patch centre sits at world 0 (canonical frame)
    np.testing.assert_allclose(affine @ [47.5, 47.5, 47.5, 1], [0, 0, 0, 1])
    assert not list(tmp_path.glob(".*part*"))


def test_concept_overlap_by_hand():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, :2, :2] = True                                 # 4 voxels
    concepts = np.zeros((4, 4, 4), np.int16)
    concepts[0, 0, :] = 1                                  # 4 voxels, 2 in the mask
    concepts[0, 1, 0] = 105                                # a disc voxel in the mask
    t = D.geometry.concept_overlap(mask, concepts, {1: "superior endplate"}).set_index("concept")
    assert t.loc["superior endplate", "fraction"] == 0.5
    assert t.loc["superior endplate", "iou"] == 2 / 6
    assert t.loc["superior endplate", "share"] == 4 / 64
    assert t.loc["superior endplate", "lift"] == 0.5 / (4 / 64)
    f = D.geometry.concept_overlap(mask, concepts, {1: "superior endplate"}, (slice(0, 1),) * 3).set_index("concept")
    assert f.loc["superior endplate", "share"] == 1.0    # only voxel (0, 0, 0) is visible
    assert list(f.index) == ["superior endplate"] and f.loc["superior endplate", "fraction"] == 1.0
    assert t.loc["intervertebral disc", "fraction"] == 0.25
    assert t.loc["background", "fraction"] == 0.25
    assert D.geometry.concept_overlap(np.zeros_like(mask), concepts, {}).empty
    v = np.zeros((4, 4, 4), np.int16)
    v[0, 0] = 20
    v[0, 1] = 21
    assert D.geometry.vertebra_overlap(mask, v, 20) == {"target": 0.5, "adjacent": 0.5, "outside": 0.0}


# --------------------------------------------------------------------------------------------
# Artifacts in the run folder
# --------------------------------------------------------------------------------------------

def test_artifacts_round_trip_and_staleness(tmp_path, tiny):
    net, x, labels = tiny
    d = D.dissect(net, x, "features", q_tail=0.02, batch_size=8, device="cpu", progress=False)
    identity = {"checkpoint_sha256": "a" * 64, "split": "test", "q_tail": 0.02, "layer": "features",
                "manifest_sha256": "b" * 64}
    rows = pd.DataFrame({"case": [f"sub-{i:03d}" for i in range(37)], "label": 20, "level": "L1"})
    with pytest.raises(MissingArtifactError, match="03_quantile_thresholding"):
        D.load_artifacts(tmp_path)
    D.artifacts.write_artifacts(tmp_path, d, identity, rows, labels)
    art = D.load_artifacts(tmp_path, expect=identity)
    back = art.dissection
    for name in ("T", "realised_tail", "max", "mean", "r", "mask_size", "probability"):
        np.testing.assert_array_equal(getattr(back, name), getattr(d, name))
    for key in d.tail:
        np.testing.assert_array_equal(back.tail[key], d.tail[key])
    np.testing.assert_array_equal(back.masks(3), d.masks(3))
    assert art.samples["fracture"].tolist() == labels.tolist()
    o = D.outcomes(labels, d.probability)
    assert art.meta["rankings"]["tp"]["defined"] == bool(o["tp"].any())
    assert art.meta["counts"]["tp"] == int(o["tp"].sum())
    assert 1 in art.meta["degenerate"]["never_fires"]
    for key, other in (("checkpoint_sha256", "c" * 64), ("split", "val"), ("q_tail", 0.01),
                       ("layer", "stem"), ("manifest_sha256", "d" * 64)):
        with pytest.raises(StaleArtifactError, match=key):
            D.load_artifacts(tmp_path, expect={**identity, key: other})
    with pytest.raises(MissingArtifactError, match="04_correlation_ranking"):
        D.load_artifacts(tmp_path, require_exports=True)
    (tmp_path / "dissection" / "exemplars.json").write_text(json.dumps({"dissection_id": "0" * 16}))
    with pytest.raises(StaleArtifactError, match="04_correlation_ranking"):
        D.load_artifacts(tmp_path)
    (tmp_path / "dissection" / "stats.npz").unlink()
    with pytest.raises(MissingArtifactError, match="stats.npz"):
        D.load_artifacts(tmp_path, expect=identity)


@pytest.mark.parametrize("name", ["thresholds.npz", "stats.npz", "tail.npz"])
def test_a_damaged_dissection_array_names_the_file(tmp_path, tiny, name):
    from vfcore.errors import CorruptFileError

    net, x, labels = tiny
    d = D.dissect(net, x, "features", q_tail=0.02, batch_size=8, device="cpu", progress=False)
    identity = {"checkpoint_sha256": "a" * 64, "split": "test", "q_tail": 0.02, "layer": "features",
                "manifest_sha256": "b" * 64}
    D.artifacts.write_artifacts(tmp_path, d, identity, pd.DataFrame({"case": ["c"] * len(labels)}), labels)
    path = tmp_path / "dissection" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=name):
        D.load_artifacts(tmp_path)


def test_undefined_rankings_are_recorded_not_written(tmp_path, tiny):
    net, x, _ = tiny
    d = D.dissect(net, x, "features", q_tail=0.02, batch_size=8, device="cpu", progress=False)
    identity = {"checkpoint_sha256": "a" * 64, "split": "test", "q_tail": 0.02, "layer": "features",
                "manifest_sha256": "b" * 64}
    rows = pd.DataFrame({"case": ["c"] * 37, "label": 20, "level": "L1"})
    D.artifacts.write_artifacts(tmp_path, d, identity, rows, np.zeros(37, int), threshold=1.1)  # no positives
    art = D.load_artifacts(tmp_path)
    assert art.ranking_tp is None and art.ranking_fp is None
    assert "no true-positive predictions" in art.meta["rankings"]["tp"]["reason"]
    assert not (tmp_path / "dissection" / "ranking_tp.csv").exists()


def test_patch_mask_keeps_every_feature_voxel_of_M_k():
    """NetDissect's "upsample A_k, then threshold" loses a peak just above T_k; the upsampled
    M_k keeps it as the input block that the feature voxel summarises."""
    A = np.zeros((4, 4, 4), np.float32)
    A[1, 2, 3] = 1.0
    A[1, 2, 2] = 0.9                                       # a neighbour just below T
    T = 0.999
    field = (slice(16, 80),) * 3                           # 16 mm blocks (small preset: 2 mm x 8)
    up = D.upsample_to_patch(A, field)
    assert not (up > T).any()                              # interpolation lowered the peak
    mask = D.patch_mask(A > T, field)
    block = np.zeros((96, 96, 96), bool)
    block[32:48, 48:64, 64:80] = True                      # the input block of feature (1, 2, 3)
    np.testing.assert_array_equal(mask, block)
    assert D.best_slice(up, T, "sagittal", mask) in range(64, 80)
    paper = D.patch_mask(np.ones((2, 8, 8, 8), bool), (slice(16, 80),) * 3)
    assert paper.shape == (2, 96, 96, 96) and paper[:, 16:80, 16:80, 16:80].all() and paper.sum() == 2 * 64 ** 3


# --------------------------------------------------------------------------------------------
# The run folder end to end (small preset, hand-made patch store, real vfcore.train checkpoint)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run folder with 12 test vertebrae (random HU with a bright block on half of them,
    a concept mask whose label 1 covers the network's field centre) and an untrained small
    network saved by ``vfcore.checkpoint.save_checkpoint``."""
    from vfcore.model import build_model
    from vfcore.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    store = run / "patches"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        case = f"sub-t{i:02d}"
        (store / case).mkdir(parents=True)
        ct = rng.integers(-200, 300, (96, 96, 96)).astype(np.int16)
        if i % 2:
            ct[30:60, 30:60, 30:60] += 800
        concepts = np.zeros((96, 96, 96), np.uint8)
        concepts[40:56, 40:56, 40:56] = 1
        vert = np.zeros((96, 96, 96), np.uint8)
        vert[24:72, 24:72, 24:72] = 20
        for kind, arr in (("ct", ct), ("concept", concepts), ("mask", vert)):
            np.save(store / case / f"L1_{kind}.npy", arr)
        rows.append({"case": case, "patient": case, "label": 20, "level": "L1", "fracture": i % 2,
                     "grade": 2 * (i % 2), "shape": "", "split": "test", "ct_path": f"{case}/L1_ct.npy",
                     "mask_path": f"{case}/L1_mask.npy", "concept_path": f"{case}/L1_concept.npy",
                     "source_sha256": "0", "out_of_field": 0.0, "reason": ""})
    pd.DataFrame(rows).to_csv(store / "manifest.csv", index=False)
    root = run / "data"
    root.mkdir()
    (root / "concept_labels.json").write_text(json.dumps({"labels": {"1": "superior endplate"}}))
    (store / "report.json").write_text(json.dumps({"root": str(root)}))
    torch.manual_seed(0)
    model = build_model("small")
    save_checkpoint(run / "model" / "best.pt", model)
    return run


def test_dissect_run_and_exports(small_run):
    from vfcore.data import load_split, to_network_input
    from vfcore.io import sha256_file
    from vfcore.checkpoint import load_checkpoint

    q = 0.01
    art = D.dissect_run(small_run, "test", q, batch_size=5, progress=False)
    # an independent computation: hook, plain loop, numpy
    model, _ = load_checkpoint(small_run / "model" / "best.pt")
    patches, labels, _ = load_split(small_run, "test")
    A = []
    h = model.down_tr512.register_forward_hook(lambda m, i, o: A.append(o.detach().clone()))
    with torch.no_grad():
        probs = [torch.sigmoid(model(to_network_input(patches[s:s + 5], "small"))) for s in (0, 5, 10)]
    h.remove()
    A = torch.cat(A).numpy()
    d = art.dissection
    np.testing.assert_array_equal(d.T, _ref_T(A, q))
    np.testing.assert_allclose(d.probability, torch.cat(probs).numpy(), rtol=1e-6)
    flat = A.reshape(12, A.shape[1], -1)
    M = flat > d.T[None, :, None]
    np.testing.assert_allclose(d.r, (flat.astype(np.float64) * M).sum(axis=2), rtol=1e-12)
    np.testing.assert_array_equal(d.mask_size, M.sum(axis=2))
    assert art.meta["checkpoint_sha256"] == sha256_file(small_run / "model" / "best.pt")
    assert art.meta["field"] == [[16, 80]] * 3 and art.meta["n_samples"] == 12
    assert art.samples["fracture"].tolist() == labels.tolist()

    # an untrained network may call no vertebra fractured: at the lower quartile of its
    # probabilities, 9 of the 12 are called fractured, so there are true and false positives
    threshold = float(np.quantile(d.probability, 0.25))
    art = D.dissect_run(small_run, "test", q, batch_size=5, threshold=threshold, progress=False)
    assert art.ranking_tp is not None and art.ranking_fp is not None
    art = export_units(small_run, top=2, top_fp=1, k=4, nifti_top=1, progress=False)
    o = D.outcomes(labels, d.probability, threshold)
    for name, entry in art.exemplars["subsets"].items():
        for u, items in entry["units"].items():
            assert all(o[name][it["sample"]] for it in items) and len(items) <= 4
    assert len(art.units) == sum(1 for r in (art.ranking_tp, art.ranking_fp) if r is not None) * 2 - \
        (art.ranking_fp is not None)                       # 2 TP units + 1 FP unit where defined
    for entry in art.exemplars["exported"].values():
        assert (art.folder / entry["collage"]).is_file()
        for files in entry["nifti"]:
            imgs = [nib.load(art.folder / f) for f in files.values()]
            assert all(np.allclose(i.affine, imgs[0].affine) for i in imgs)
            assert nib.aff2axcodes(imgs[0].affine) == ("I", "P", "L")
            assert not any(np.isnan(i.get_fdata()).any() for i in imgs)
    concepts = pd.read_csv(art.folder / "unit_concepts.csv")
    assert set(concepts["concept"]) <= {"superior endplate", "background"}
    assert np.all((concepts["fraction"] >= 0) & (concepts["fraction"] <= 1))


def test_dissect_run_runs_the_core_pass_bit_for_bit_as_the_sharded_pass(small_run, tmp_path, monkeypatch):
    """Issue 20: with one process ``dissect_run`` runs the core ``dissect()`` (before, always
    ``dissect_sharded``) and no collective. On the same store, network and batches the two
    passes give identical T_k, tail (the masks M_k), r_k, |M_k|, E_x, c_k and rankings."""
    from vfcore.dissect import artifacts
    from vfcore.dissect.sharded import dissect_sharded

    def boom(*args, **kwargs):
        raise AssertionError("distributed code on the one-process path")

    run = _with_splits(small_run, tmp_path / "run", ["test"] * 12)
    for name in ("dissect_sharded", "broadcast", "barrier"):
        monkeypatch.setattr(artifacts, name, boom)
    after = D.dissect_run(run, "test", 0.01, batch_size=5, progress=False)
    monkeypatch.undo()
    net = D.load_network(run)
    patches, labels, _ = D.load_dissection_set(run, "test")
    before = dissect_sharded(net.model, patches, net.layer, q_tail=0.01, batch_size=5,
                             transform=net.transform, progress=False)
    d = after.dissection
    for key in ("T", "realised_tail", "unit_min", "unit_max", "zero_fraction", "max", "mean", "r",
                "mask_size", "probability"):
        assert np.array_equal(getattr(d, key), getattr(before, key)), key
    for key in ("unit", "sample", "position", "value"):
        assert np.array_equal(d.tail[key], before.tail[key]), key
    assert all(np.array_equal(d.flags[k], before.flags[k]) for k in before.flags)
    assert np.array_equal(d.enabled, before.enabled) and d.tail["value"].size
    o = D.outcomes(labels, before.probability, after.meta["threshold"])
    for subset in ("positive", "all"):
        assert np.array_equal(D.correlation(d.enabled, o[subset]), D.correlation(before.enabled, o[subset]))
        pd.testing.assert_frame_equal(D.rank_units(d, labels, subset), D.rank_units(before, labels, subset))


def test_a_new_checkpoint_makes_the_dissection_stale(small_run, tmp_path):
    import shutil

    from vfcore.model import build_model
    from vfcore.checkpoint import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    D.dissect_run(run, "test", 0.01, batch_size=12, progress=False)
    export_units(run, top=1, top_fp=0, k=2, nifti_top=0, progress=False)
    torch.manual_seed(1)
    save_checkpoint(run / "model" / "best.pt", build_model("small"))    # retrained
    from vfcore.io import sha256_file
    with pytest.raises(StaleArtifactError, match="checkpoint_sha256"):
        D.load_artifacts(run, expect={"checkpoint_sha256": sha256_file(run / "model" / "best.pt")})
    with pytest.raises(StaleArtifactError, match="another checkpoint"):
        export_units(run, top=1, progress=False)
    art = D.dissect_run(run, "test", 0.01, batch_size=12, progress=False)   # redone, exports dropped
    assert art.exemplars is None and not (run / "dissection" / "collages").exists()
    with pytest.raises(DataValueError, match="unknown split"):
        D.dissect_run(run, "validation", 0.01, progress=False)


def test_bad_checkpoint_and_missing_inputs_name_the_problem(small_run, tmp_path):
    import shutil

    from vfcore.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "model" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        D.dissect_run(run, "test", progress=False)
    (run / "model" / "best.pt").unlink()
    with pytest.raises(MissingArtifactError, match="02_training"):
        D.dissect_run(run, "test", progress=False)
    with pytest.raises(MissingArtifactError, match="01_preprocessing"):
        D.dissect_run(tmp_path / "empty", "test", checkpoint=small_run / "model" / "best.pt", progress=False)


# --------------------------------------------------------------------------------------------
# Rankings with their n: bootstrap interval, ties, small-n flag (issue 11)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, 3])
def test_bootstrap_interval_equals_a_plain_numpy_loop(monkeypatch, block):
    import vfcore.dissect.ranking as ranking

    rng = np.random.default_rng(11)
    N, K = 23, 7
    enabled = rng.random((N, K)) < np.linspace(0.1, 0.9, K)
    subset = rng.random(N) < 0.6
    B, seed = 200, 5
    if block:                                    # resamples drawn a few at a time: same answer
        monkeypatch.setattr(ranking, "_BOOTSTRAP_CELLS", block * int(subset.sum()) * K)
    low, high = D.ranking.bootstrap_c(enabled, subset, B=B, seed=seed)
    # reference: B resamples one at a time, c_k of each, numpy.percentile
    members = enabled[subset]
    n = len(members)
    draw = np.random.default_rng(seed)
    c = np.empty((B, K))
    for b in range(B):
        idx = draw.integers(0, n, size=n)
        for k in range(K):
            c[b, k] = sum(members[i, k] for i in idx) / n
    # the same resamples give the same c^b; numpy's and scipy's linear quantiles (scipy at
    # alpha = (1 - level) / 2 in floating point) interpolate alike up to the last bit
    alpha = (1 - 0.95) / 2
    np.testing.assert_allclose(low, np.quantile(c, alpha, axis=0), rtol=1e-15, atol=0)
    np.testing.assert_allclose(high, np.quantile(c, 1 - alpha, axis=0), rtol=1e-15, atol=0)
    direct = scipy.stats.bootstrap((members,), np.mean, axis=0, n_resamples=B, method="percentile",
                                   random_state=np.random.default_rng(seed)).confidence_interval
    np.testing.assert_array_equal(low, direct.low)
    np.testing.assert_array_equal(high, direct.high)
    point = members.mean(axis=0)
    assert np.all(low <= point) and np.all(point <= high)
    # a unit that fires everywhere (or nowhere) has a zero-width interval
    enabled[:, 0], enabled[:, 1] = True, False
    low, high = D.ranking.bootstrap_c(enabled, subset, B=50)
    assert (low[0], high[0], low[1], high[1]) == (1.0, 1.0, 0.0, 0.0)
    with pytest.raises(D.UndefinedCorrelationError):
        D.ranking.bootstrap_c(enabled, np.zeros(N, bool))


def test_tie_counts_and_competition_ranks_equal_plain_loops():
    """pandas value_counts / rank(method="min") against loops over the values (NaN never ties)."""
    from vfcore.dissect.ranking import _competition_rank, tie_counts

    rng = np.random.default_rng(4)
    for trial in range(200):
        v = rng.integers(0, 5, rng.integers(1, 25)) / 7 + (0.3 - 0.1 - 0.2)   # rounding noise
        if trial % 3 == 0:
            v[rng.random(len(v)) < 0.2] = np.nan
        same = [[not np.isnan(a) and abs(a - b) < 1e-12 for b in v] for a in v]
        assert tie_counts(v).tolist() == [max(1, sum(row)) for row in same]
        s = np.r_[np.sort(v[~np.isnan(v)])[::-1], v[np.isnan(v)]]            # sorted, NaN last
        ranks = [next(j for j in range(i + 1) if j == i or abs(s[j] - s[i]) < 1e-12) + 1
                 for i in range(len(s))]
        assert _competition_rank(s).tolist() == ranks


def test_rankings_record_n_intervals_ties_and_the_small_n_flag():
    #            unit: 0  1  2  3
    enabled = np.array([[1, 1, 1, 0],    # TP
                        [1, 1, 0, 0],    # TP
                        [1, 0, 1, 1],    # TP
                        [0, 1, 1, 1],    # FP
                        [0, 0, 0, 0]],   # TN
                       dtype=bool)
    labels = np.array([1, 1, 1, 0, 0])
    prob = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    d = _made(enabled, prob)
    t = D.rank_units(d, labels, "tp", B=100).set_index("unit")
    # c_k over 3 TP: units 0 (3/3); 1, 2 (2/3, tied); 3 (1/3)
    np.testing.assert_array_equal(t.loc[[0, 1, 2, 3], "c_k"], [1.0, 2 / 3, 2 / 3, 1 / 3])
    assert t["n"].tolist() == [3] * 4 and t["small_n"].all()
    assert t.loc[[0, 1, 2, 3], "ties"].tolist() == [1, 2, 2, 1]
    assert t.loc[[0, 1, 2, 3], "tied_rank"].tolist() == [1, 2, 2, 4]
    assert (t["c_low"] <= t["c_k"]).all() and (t["c_k"] <= t["c_high"]).all()
    s = D.ranking.ranking_summary(D.rank_units(d, labels, "tp", B=10), "c_k", "tp", top=2)
    assert s["n"] == 3 and s["small_n"] and "only 3 true-positive predictions" in s["note"]
    assert s["ties"]["distinct_values"] == 2 and s["ties"]["units_sharing_top_values"] == 3
    assert s["ties"]["tied_across_cut"] == 1             # unit 2 ties with rank 2 below the cut
    fp = D.rank_false_positives(d, labels, B=100)
    assert fp["n"].tolist() == [1] * 4 and fp["small_n"].all()
    assert {"c_fp_low", "c_fp_high", "ties", "tied_rank"} <= set(fp.columns)
    big = np.tile(enabled, (2, 1)), np.tile(prob, 2), np.tile(labels, 2)
    t = D.rank_units(_made(big[0], big[1]), big[2], "tp", B=10)
    assert t["n"].tolist() == [6] * 4 and not t["small_n"].any()
    assert D.ranking.ranking_note(6, "tp") == "" and "1/4" in D.ranking.ranking_note(4, "fp")


def test_ranking_meta_records_n_bootstrap_ties_and_notes(tmp_path, tiny):
    net, x, labels = tiny
    d = D.dissect(net, x, "features", q_tail=0.02, batch_size=8, device="cpu", progress=False)
    identity = {"checkpoint_sha256": "a" * 64, "split": "test", "q_tail": 0.02, "layer": "features",
                "manifest_sha256": "b" * 64}
    rows = pd.DataFrame({"case": ["c"] * 37, "label": 20, "level": "L1"})
    D.artifacts.write_artifacts(tmp_path, d, identity, rows, labels, threshold=0.0, B=50, seed=3)  # all predicted 1
    art = D.load_artifacts(tmp_path)
    tp, fp = art.meta["rankings"]["tp"], art.meta["rankings"]["fp"]
    assert tp["n"] == int(labels.sum()) == art.ranking_tp["n"].iloc[0]
    assert fp["n"] == int((labels == 0).sum()) == art.ranking_fp["n"].iloc[0]
    assert tp["bootstrap"] == {"B": 50, "seed": 3, "level": 0.95, "method": "percentile"}
    assert not tp["small_n"] and tp["note"] == "" and art.ranking_status("tp") == ""
    assert tp["ties"]["top"] == min(10, d.n_units) and "ties are ordered by" in tp["ties"]["note"]
    sharing = art.ranking_tp["c_k"].round(12).isin(art.ranking_tp["c_k"].head(10).round(12)).sum()
    assert tp["ties"]["units_sharing_top_values"] == sharing
    assert art.reasons == {"tp": "", "fp": ""}


# --------------------------------------------------------------------------------------------
# Dissection sets of several splits; sets without TP or FP; layers without a grid (issue 11)
# --------------------------------------------------------------------------------------------

def _with_splits(small_run, run, splits):
    """A copy of ``small_run`` whose 12 vertebrae get the given splits (one per row)."""
    import shutil

    shutil.copytree(small_run, run)
    manifest = pd.read_csv(run / "patches" / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["split"] = splits
    manifest.to_csv(run / "patches" / "manifest.csv", index=False)
    return run


def test_dissect_run_on_the_held_out_union_with_a_dissect_split(small_run, tmp_path):
    splits = ["train", "test", "dissect", "val", "dissect", "test",
              "dissect", "train", "dissect", "test", "dissect", "dissect"]
    run = _with_splits(small_run, tmp_path / "run", splits)
    assert D.artifacts.default_split(run) == "test+dissect"
    assert D.artifacts.parse_split("dissect+test") == D.artifacts.parse_split(("test", "dissect")) == ("test", "dissect")
    with pytest.raises(DataValueError, match="unknown split"):
        D.artifacts.parse_split("test+validation")
    art = D.dissect_run(run, q_tail=0.01, batch_size=4, progress=False, B=100)
    order = [i for s in ("test", "dissect") for i, x in enumerate(splits) if x == s]   # by split
    assert art.meta["split"] == "test+dissect" and art.meta["splits"] == ["test", "dissect"]
    assert art.samples["case"].tolist() == [f"sub-t{i:02d}" for i in order]
    assert art.samples["split"].tolist() == [splits[i] for i in order]
    assert "train" not in set(art.samples["split"]) and "val" not in set(art.samples["split"])
    assert art.meta["split_counts"]["dissect"]["n"] == 6 and art.meta["split_counts"]["test"]["n"] == 3
    assert art.meta["split_counts"]["dissect"]["positive"] == sum(i % 2 for i in order[3:])
    assert art.samples["fracture"].tolist() == [i % 2 for i in order]
    # the same set however it is spelt: reused, not stale
    for spelling in (("dissect", "test"), "test+dissect", None):
        again = D.dissect_run(run, spelling, 0.01, progress=False, B=100)
        assert again.meta["created"] == art.meta["created"]
        D.load_artifacts(run, expect={"split": spelling})
    with pytest.raises(StaleArtifactError, match="split"):
        D.load_artifacts(run, expect={"split": "test"})
    # another threshold or bootstrap is not reused (the rankings depend on them)
    other = D.dissect_run(run, None, 0.01, threshold=0.0, progress=False, B=100)
    assert other.meta["threshold"] == 0.0 and other.meta["counts"]["tn"] == 0
    assert D.dissect_run(run, None, 0.01, threshold=0.0, progress=False, B=20).meta["bootstrap"]["B"] == 20
    art = D.dissect_run(run, None, 0.01, batch_size=4, progress=False, B=100)
    # independent check of the statistics on the union: hook + numpy on the rows in that order
    from vfcore.checkpoint import load_checkpoint
    from vfcore.data import PatchArray, to_network_input

    model, _ = load_checkpoint(run / "model" / "best.pt")
    x = to_network_input(PatchArray.of(run, [f"sub-t{i:02d}/L1_ct.npy" for i in order])[:], "small")
    A = []
    h = model.down_tr512.register_forward_hook(lambda m, i, o: A.append(o.detach().clone()))
    with torch.no_grad():
        for s in range(0, len(x), 4):                                # the pass's batches of 4
            model(x[s:s + 4])
    h.remove()
    np.testing.assert_array_equal(art.dissection.T, _ref_T(torch.cat(A).numpy(), 0.01))
    exported = export_units(run, top=2, top_fp=1, k=3, nifti_top=0, progress=False)
    assert exported.exemplars is not None
    one = D.dissect_run(run, "dissect", 0.01, progress=False)             # one split still works
    assert one.meta["split"] == "dissect" and len(one.samples) == 6


def test_a_store_without_a_dissect_split_defaults_to_test(small_run):
    assert D.artifacts.default_split(small_run) == "test"


def test_a_set_without_true_or_false_positives_still_runs(small_run, tmp_path):
    run = _with_splits(small_run, tmp_path / "run", ["test"] * 12)
    art = D.dissect_run(run, "test", 0.01, threshold=1.1, progress=False)   # nothing predicted positive
    assert art.ranking_tp is None and art.ranking_fp is None
    assert "c_k is undefined" in art.reasons["tp"] and "no true-positive predictions" in art.reasons["tp"]
    assert "no false-positive predictions" in art.reasons["fp"]
    assert art.ranking_status("fp") == art.reasons["fp"]
    assert not (art.folder / "ranking_tp.csv").exists() and not (art.folder / "ranking_fp.csv").exists()
    meta = json.loads((art.folder / "meta.json").read_text())
    assert meta["rankings"]["tp"]["defined"] is False and meta["rankings"]["tp"]["n"] == 0
    # no fractures at all: no TP ranking, the FP ranking stands (everything predicted positive)
    manifest = pd.read_csv(run / "patches" / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["fracture"], manifest["grade"] = "0", "0"
    manifest.to_csv(run / "patches" / "manifest.csv", index=False)
    art = D.dissect_run(run, "test", 0.01, threshold=0.0, progress=False, B=50)
    assert art.ranking_tp is None and "no true-positive" in art.reasons["tp"]
    assert art.ranking_fp is not None and art.meta["rankings"]["fp"]["n"] == 12
    assert art.ranking_fp["delta"].isna().all() and art.meta["rankings"]["fp"]["key"] == "c_fp"
    export_units(run, top=2, top_fp=1, k=2, nifti_top=0, progress=False)


def test_a_layer_without_a_grid_names_the_layer_and_its_shape(small_run, tmp_path):
    from vfcore.checkpoint import save_checkpoint
    from vfcore.model import Preset, build_model

    run = _with_splits(small_run, tmp_path / "run", ["test"] * 12)
    D.dissect_run(run, "test", 0.01, progress=False, B=10)
    with pytest.raises(D.dissection.LayerGridError, match=r"layer 'classifier.0'.*no spatial grid") as err:
        D.dissect_run(run, "test", 0.01, layer="classifier.0", progress=False)   # nn.Flatten
    import re
    assert "preset 'small'" in str(err.value) and re.search(r"shape \[1, \d+\]", str(err.value))
    assert (run / "dissection" / "meta.json").is_file()           # the earlier dissection is kept
    one = Preset("one_cube", crop=16, zoom=2, base=2, head=(4,), mlp=(4,), dropout=0.0)
    torch.manual_seed(0)
    save_checkpoint(run / "model" / "best.pt", build_model(one))
    with pytest.raises(D.dissection.LayerGridError, match=r"preset 'one_cube', layer 'down_tr512'.*1x1x1 grid") as err:
        D.dissect_run(run, "test", 0.01, progress=False)
    assert "32x1x1x1" in str(err.value)
    from vfcore.errors import GeometryError
    assert isinstance(err.value, GeometryError)
    # the check itself, on shapes
    assert D.dissection.check_layer_grid("x", (2, 5, 4, 4, 4)) == (4, 4, 4)
    with pytest.raises(D.dissection.LayerGridError, match="4x1x4"):
        D.dissection.check_layer_grid("x", (2, 5, 4, 1, 4))


def test_out_of_field_analysis_of_a_dissected_run(small_run, tmp_path):
    from vfcore.analysis import shortcut as S

    run = _with_splits(small_run, tmp_path / "run", ["test"] * 6 + ["dissect"] * 6)
    manifest = pd.read_csv(run / "patches" / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["out_of_field"] = [f"{v:.2f}" for v in np.linspace(0, 0.55, 12)]
    manifest.to_csv(run / "patches" / "manifest.csv", index=False)
    art = D.dissect_run(run, q_tail=0.01, progress=False, B=10)
    a = S.run_out_of_field(run)
    assert a.bins["n"].sum() == 12 and a.threshold == art.meta["threshold"]
    np.testing.assert_allclose(a.samples["out_of_field"], art.samples["out_of_field"])
    (art.folder / "samples.csv").write_text(art.samples.drop(columns="out_of_field").to_csv(index=False))
    b = S.run_out_of_field(run)                        # older samples.csv: joined with the manifest
    np.testing.assert_allclose(b.samples["out_of_field"], a.samples["out_of_field"])
    pd.testing.assert_frame_equal(a.bins, b.bins)
