"""vfcore.analysis.tcav against hand-worked cases, numpy and scipy references."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from vfcore.analysis.alignment import ConceptCounts
from vfcore.analysis.tcav import (TooFewExamplesError, cell_examples, cell_pools, cell_vectors, directional_derivatives,
                                  fit_cav, layer_gradients, logistic_regression, significance, tcav_magnitude,
                                  run_tcav, tcav_score, tcav_test, vertebra_pools, vertebra_vectors)
from vfcore.errors import DataValueError, InvalidParameterError
from tiny_run import tiny_run  # noqa: F401  (fixture: a small real run folder)

K, GRID = 4, (2, 2, 2)


class _Sum(nn.Module):
    """logit = sum over cells of f(a_cell): ``f`` maps [B, K, cells] -> [B, cells]."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, a):
        return self.f(a.reshape(a.shape[0], a.shape[1], -1)).sum(dim=1, keepdim=True)


def _net(f, pre: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(OrderedDict(pre=pre or nn.Identity(), layer=nn.Identity(), head=_Sum(f)))


def test_linear_model_gradient_is_w_and_score_is_the_sign_of_w_dot_v():
    w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    net = _net(lambda a: torch.einsum("bkc,k->bc", a, w))
    x = torch.randn(5, K, *GRID)
    A, G = layer_gradients(net, x, "layer", batch_size=2)
    np.testing.assert_allclose(A, x.numpy())
    np.testing.assert_allclose(G, np.broadcast_to(w.numpy()[None, :, None, None, None], G.shape))
    # by hand: w.v = 1 - 2 = -1 < 0 -> 0; w.v = 1 + 0.5 > 0 -> 1; w.v = -(-2) > 0 -> 1
    assert tcav_score(G, np.array([1.0, 1.0, 0.0, 0.0])) == 0.0
    assert tcav_score(G, np.array([1.0, 0.0, 1.0, 0.0])) == 1.0
    assert tcav_score(G, np.array([0.0, -1.0, 0.0, 0.0])) == 1.0
    assert tcav_score(G, np.array([0.0, 0.0, 0.0, 1.0])) == 0.0          # S = 0 is not > 0
    assert tcav_score(G, np.array([0.0, 1.0, 0.0, 0.0]), per_cell=True) == 0.0
    # S_i = cells * w.v = 8 * 1.5 for every sample
    np.testing.assert_allclose(directional_derivatives(G, np.array([1.0, 0, 1, 0])), np.full(5, 12.0))


def test_weights_put_v_where_the_concept_is():
    rng = np.random.default_rng(2)
    G = rng.normal(size=(6, K, *GRID))
    v = rng.normal(size=K)
    W = rng.uniform(size=(6, 8)) * (rng.uniform(size=(6, 8)) > 0.5)
    W[0] = 0                                                  # sample 0 has none of the concept
    S = np.array([sum(W[i, c] * G[i, :, c // 4, (c // 2) % 2, c % 2] @ v for c in range(8)) for i in range(6)])
    np.testing.assert_allclose(directional_derivatives(G, v, weights=W), S)
    assert tcav_score(G, v, weights=W) == pytest.approx(np.mean(S > 0))
    per = np.einsum("nkc,k->nc", G.reshape(6, K, 8), v) * W
    assert tcav_score(G, v, per_cell=True, weights=W) == pytest.approx(np.mean(per[W > 0] > 0))
    with pytest.raises(DataValueError, match="weights"):
        directional_derivatives(G, v, weights=W[:, :4])


def test_nonlinear_model_fraction_by_numpy():
    """logit = sum_c (a_c . w)^2 / 2 after a 1x1 conv: grad_c = (a_c . w) w, so
    S = (w . v) sum_c a_c . w; a = the conv of x computed here with einsum."""
    torch.manual_seed(1)
    conv = nn.Conv3d(2, K, 1)
    w = torch.tensor([0.3, -1.0, 2.0, 0.7])
    net = _net(lambda a: 0.5 * torch.einsum("bkc,k->bc", a, w) ** 2, pre=conv)
    x = torch.randn(40, 2, *GRID)
    _, G = layer_gradients(net, x, "layer", batch_size=16)
    Wc, bc = conv.weight.detach().numpy()[:, :, 0, 0, 0], conv.bias.detach().numpy()
    a = np.einsum("kj,bjc->bkc", Wc, x.numpy().reshape(40, 2, -1)) + bc[None, :, None]
    proj = np.einsum("bkc,k->bc", a, w.numpy())                    # [B, cells]
    for v in (np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0]), np.array([0.5, 0.2, -0.1, 1.0])):
        wv = float(w.numpy() @ v)
        assert tcav_score(G, v) == pytest.approx(np.mean(wv * proj.sum(axis=1) > 0))
        assert tcav_score(G, v, per_cell=True) == pytest.approx(np.mean(wv * proj > 0))
        S = wv * proj.sum(axis=1)
        assert tcav_magnitude(G, v) == pytest.approx(S[S > 0].sum() / np.abs(S).sum(), rel=1e-5)
    assert 0 < tcav_score(G, np.array([1.0, 0, 0, 0])) < 1                  # a real mixture


def test_layer_gradients_restores_mode_and_keeps_no_parameter_grad():
    conv = nn.Conv3d(2, K, 1)
    bn = nn.BatchNorm3d(K)
    net = _net(lambda a: a.sum(dim=1), pre=nn.Sequential(conv, bn))
    net.train()
    before = bn.running_mean.clone()
    layer_gradients(net, torch.randn(3, 2, *GRID), "layer")
    assert net.training and bn.training
    torch.testing.assert_close(bn.running_mean, before)          # eval mode: statistics untouched
    assert all(p.grad is None for p in net.parameters())


def test_logistic_regression_matches_the_first_order_condition():
    """At the optimum X^T (sigmoid(Xw + b) - y) / n + l2 w = 0 and the mean residual is 0."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = (X @ rng.normal(size=5) + rng.normal(size=200) > 0).astype(float)
    w, b = logistic_regression(X, y, l2=0.1)
    r = 1 / (1 + np.exp(-(X @ w + b))) - y
    np.testing.assert_allclose(X.T @ r / 200 + 0.1 * w, 0, atol=1e-5)
    assert abs(r.mean()) < 1e-5


def test_cav_points_along_the_planted_direction():
    rng = np.random.default_rng(3)
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    X = rng.normal(size=(600, 16))
    pos, neg = X[X @ u > 0.3], X[X @ u < -0.3]                   # separable with a margin along u
    v = fit_cav(pos + 2.0, neg + 2.0)                            # an offset: the intercept takes it
    assert np.linalg.norm(v) == pytest.approx(1.0)
    assert v @ u > 0.95


@pytest.mark.filterwarnings("ignore:Precision loss")   # scipy's own call on the constant set 'c'
def test_significance_against_a_hand_computed_t_test():
    conc = {"a": [0.9, 0.8, 1.0, 0.95, 0.85], "b": [0.5, 0.6, 0.4, 0.55, 0.45], "c": [1.0, 1.0, 1.0, 1.0, 1.0]}
    rand = np.array([0.4, 0.6, 0.5, 0.7, 0.3, 0.55])
    t = significance(conc, rand).set_index("concept")
    for name, s in conc.items():
        s = np.asarray(s)
        n1, n2 = len(s), len(rand)
        sp = ((n1 - 1) * s.var(ddof=1) + (n2 - 1) * rand.var(ddof=1)) / (n1 + n2 - 2)   # pooled variance
        tt = (s.mean() - rand.mean()) / np.sqrt(sp * (1 / n1 + 1 / n2))
        p = 2 * stats.t.sf(abs(tt), n1 + n2 - 2)
        assert t.loc[name, "p"] == pytest.approx(p, rel=1e-9)
        assert t.loc[name, "p"] == pytest.approx(stats.ttest_ind(s, rand).pvalue, rel=1e-9)
        assert t.loc[name, "p_bonferroni"] == pytest.approx(min(1.0, 3 * p))
        assert t.loc[name, "significant"] == (min(1.0, 3 * p) < 0.05)
        assert t.loc[name, "mean"] == pytest.approx(s.mean())
        assert t.loc[name, "std"] == pytest.approx(s.std(ddof=1))
    assert bool(t.loc["a", "significant"]) and not bool(t.loc["b", "significant"])
    assert t.loc["b", "p_shown"] == f"{t.loc['b', 'p_bonferroni']:.3f}"     # 0.05 -> three decimals
    assert "Bonferroni over 3" in t.attrs["rule"]


def _planted(n_tp: int = 30, seed: int = 0):
    """Cells [M, K] of isotropic noise; concept 'signal' cells shifted along g (the logit's
    gradient direction at every cell), concept 'noise' cells a random subset (no direction)."""
    rng = np.random.default_rng(seed)
    k = 8
    g = np.zeros(k)
    g[0] = 1.0
    X = rng.normal(size=(3000, k))
    X[:300] += 3.0 * g
    grad = np.broadcast_to(g[None, :, None], (n_tp, k, 8)) + 0.3 * rng.normal(size=(n_tp, k, 8))
    pools = {"signal": (np.arange(300), np.arange(300, 3000)),
             "noise": (np.arange(1000, 1300), np.r_[np.arange(300, 1000), np.arange(1300, 3000)])}
    return grad, X, pools


def test_tcav_test_planted_concept_is_significant_and_a_random_one_is_not():
    grad, X, pools = _planted()
    pools["rare"] = "3 cells at least 0.25 covered by it, need at least 10"
    t = tcav_test(grad, X, pools, n_runs=30, n_examples=100, seed=0).set_index("concept")
    assert t.loc["signal", "mean"] == 1.0 and bool(t.loc["signal", "significant"])
    assert t.loc["signal", "accuracy"] > 0.9 and t.loc["noise", "accuracy"] < 0.7
    assert not bool(t.loc["noise", "significant"])
    assert t.loc["signal", "runs"] == 30 and t.loc["signal", "n"] == 30 and t.loc["signal", "positives"] == 300
    assert t.loc["rare", "reason"].startswith("3 cells") and np.isnan(t.loc["rare", "mean"])
    assert "Bonferroni over 2" in t.attrs["rule"]                       # the untested one is not counted


def test_tcav_test_with_weights_scores_only_the_true_positives_with_the_concept():
    grad, X, pools = _planted()
    W = np.zeros((30, 8))
    W[:12, :3] = 0.5                                          # 12 true positives have the concept
    t = tcav_test(grad.reshape(30, 8, 2, 2, 2), X, {"signal": pools["signal"]}, n_runs=5,
                  weights={"signal": W.reshape(30, 2, 2, 2)}).set_index("concept")
    assert t.loc["signal", "n"] == 12 and t.loc["signal", "mean"] == 1.0
    t = tcav_test(grad, X, {"signal": pools["signal"]}, n_runs=2, weights={"signal": np.zeros((30, 8))})
    assert t["reason"].tolist() == ["no true positive has it"]


def test_cell_vectors_and_examples_follow_the_counts_order():
    A = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 2, 2, 2)
    X = cell_vectors(A)
    for i in range(2):
        for c in range(8):
            np.testing.assert_array_equal(X[i * 8 + c], A[i, :, c // 4, (c // 2) % 2, c % 2])
    np.testing.assert_allclose(vertebra_vectors(A), A.reshape(2, 3, -1).mean(axis=2))
    counts = np.zeros((2, 8, 2), np.uint8)
    counts[0, [1, 2, 5], 0] = [10, 64, 16]          # cell volume 64: shares 0.16, 1.0, 0.25
    counts[1, :, 0] = 3
    counts[1, 7, 0] = 0
    cc = ConceptCounts(["x", "y"], counts, counts.sum(axis=1), GRID, 64)
    np.testing.assert_array_equal(cell_examples(cc, "x", min_examples=2), [2, 5])
    np.testing.assert_array_equal(cell_examples(cc, "x", without=True, min_examples=2), [0, 3, 4, 6, 7, 15])
    sub = cell_examples(cc, "x", n=3, without=True, seed=1, min_examples=2)
    assert len(sub) == 3 and set(sub) <= {0, 3, 4, 6, 7, 15}
    with pytest.raises(TooFewExamplesError, match="need at least 10"):
        cell_examples(cc, "x")
    assert "need at least" in cell_pools(cc, ["y"], min_examples=2)["y"]
    counts[:, :, 1] = 64                               # "y" covers every cell but 0 and 15: the region
    counts[0, 0, 1] = counts[1, 7, 1] = 0
    pos, neg = cell_pools(cc, ["x"], min_examples=2, within="y")["x"]
    np.testing.assert_array_equal(pos, [2, 5])
    np.testing.assert_array_equal(neg, [3, 4, 6, 7])   # without x (0, 3, 4, 6, 7, 15) and inside y
    with pytest.raises(DataValueError, match="not a concept"):
        cell_examples(cc, "z")


def test_vertebra_pools_by_hand():
    flag = np.zeros(30, bool)
    flag[[1, 4, 7, 8, 9, 12, 20, 21, 22, 25, 29]] = True
    pos, neg = vertebra_pools({"wedge": flag}, 30)["wedge"]
    np.testing.assert_array_equal(pos, [1, 4, 7, 8, 9, 12, 20, 21, 22, 25, 29])
    assert len(neg) == 19 and not set(neg) & set(pos)
    assert vertebra_pools({"rare": flag & (np.arange(30) < 5)}, 30)["rare"].startswith("2 vertebrae with it")
    with pytest.raises(DataValueError, match="30 booleans"):
        vertebra_pools({"bad": flag[:10]}, 30)


def test_bad_input_gets_typed_errors():
    grad = np.zeros((3, 4, 8))
    with pytest.raises(DataValueError, match="cav"):
        tcav_score(grad, np.ones(5))
    with pytest.raises(DataValueError, match="same K"):
        tcav_test(grad, np.zeros((50, 5)), {})
    with pytest.raises(InvalidParameterError, match="n_runs"):
        tcav_test(grad, np.zeros((50, 4)), {}, n_runs=1)
    with pytest.raises(TooFewExamplesError, match="1 positive"):
        fit_cav(np.zeros((1, 4)), np.ones((5, 4)))
    with pytest.raises(DataValueError, match="same K"):
        fit_cav(np.zeros((5, 4)), np.ones((5, 3)))


def test_run_tcav_on_a_tiny_run_counts_its_true_positives_and_their_concepts(tiny_run, monkeypatch):  # noqa: F811
    """The wiring: n = the true positives whose own concept mask reaches the field (read here
    from the masks), n_train = the training split's vertebrae. The tiny run's few epochs call no
    fracture (no true positive: a typed error), so its fractures are relabelled true positives."""
    import vfcore.analysis.tcav as T
    from vfcore.analysis.alignment import RunConcepts
    from vfcore.data import load_split

    def with_outcome(rule):
        def load(run_dir):
            art = load_artifacts(run_dir)
            art.samples = art.samples.assign(outcome=rule(art.samples))
            return art
        return load

    load_artifacts = T.load_artifacts
    monkeypatch.setattr(T, "load_artifacts", with_outcome(lambda s: "TN"))
    with pytest.raises(DataValueError, match="no true positives"):
        run_tcav(tiny_run, n_runs=2)
    monkeypatch.setattr(T, "load_artifacts", with_outcome(lambda s: np.where(s["fracture"] == 1, "TP", "TN")))
    art = T.load_artifacts(tiny_run)
    tp = np.flatnonzero(art.samples["outcome"].to_numpy() == "TP")
    r = run_tcav(tiny_run, n_runs=2, n_examples=20, min_share=0.05)
    t = r.table.set_index("concept")
    assert r.n_train == len(load_split(tiny_run, "train")[1]) and len(tp) > 0
    masks = RunConcepts.from_run(tiny_run, art.samples)
    tested = t.index[t["reason"] == ""]
    assert len(tested) > 0
    for concept in tested:
        have = sum(bool(masks[int(i)][concept][art.field].any()) for i in tp)
        assert t.loc[concept, "n"] == have, concept
    flat = run_tcav(tiny_run, n_runs=2, n_examples=20, min_share=0.05, local=False, counts=r.counts)
    assert set(flat.table.loc[flat.table["reason"] == "", "n"]) == {len(tp)}
