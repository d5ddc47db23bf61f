"""Does the fracture score *use* a concept? TCAV (Kim et al., ICML 2018) at the dissected layer.

Alignment (:mod:`~vfcore.analysis.alignment`) asks whether single units fire on a concept;
TCAV asks whether a *direction* of the layer that encodes the concept moves the fracture logit:

1. **CAV.** Examples are vectors of the layer's K units: one grid **cell** of one vertebra of
   the *training* split (positives: cells a concept covers by at least ``min_share`` of their
   voxels, :func:`cell_examples`; negatives: random cells without it), or, where there are no
   concept masks (real data), whole **vertebrae** (the cells pooled, :func:`vertebra_vectors`)
   from sets the student names. The CAV v [K] is the unit normal of an L2-regularised logistic
   regression separating positives from negatives (:func:`fit_cav`).
2. **TCAV score.** For the true positives of the dissected set, grad [N, K, *grid] = d logit /
   dA (:func:`layer_gradients`). The directional derivative S_i = sum over cells of
   grad_i[:, cell] . v (Kim et al.'s S_{C,k,l}, with the concept added along v at every cell
   at once: the layer-wide default, one number per vertebra as the paper has per image);
   ``per_cell=True`` counts every (vertebra, cell) instead. TCAV_Q = #{S > 0} / N
   (:func:`tcav_score`); the magnitude variant sum(S+)/sum(|S|) (:func:`tcav_magnitude`).
3. **Significance** (the paper's and Captum's tutorial procedure): ``n_runs`` CAVs per concept,
   each against a fresh random negative set, and ``n_runs`` random-vs-random CAVs; a two-sided
   t-test (``scipy.stats.ttest_ind``) of the concept's scores against the random ones,
   Bonferroni over the concepts tested (:func:`significance`, :func:`tcav_test`).

Any [K] vector can be scored (e.g. a Net2Vec probe): :func:`tcav_score` takes it as it is.
Draws nothing; :func:`run_tcav` does a run end to end (with wall times, so a notebook can
budget it).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize
from scipy.stats import ttest_ind

from vfcore.analysis.alignment import (CONFOUNDERS, FRACTURE_CONCEPTS, ConceptCounts, RunConcepts,
                                       concept_counts)
from vfcore.analysis.story import format_p
from vfcore.data import PatchArray, load_split
from vfcore.dissect.artifacts import load_artifacts, load_network
from vfcore.errors import DataValueError, InvalidParameterError
from vfcore.forward import evaluating, find_layer, forward_batches, model_device

__all__ = ["ALPHA", "N_RUNS", "MIN_SHARE", "TooFewExamplesError", "layer_gradients", "layer_activations",
           "cell_vectors", "vertebra_vectors", "cell_examples", "cell_pools", "logistic_regression",
           "fit_cav", "directional_derivatives", "tcav_score", "tcav_magnitude", "significance",
           "tcav_test", "default_concepts", "TcavRun", "run_tcav"]

#: Significance level after the Bonferroni correction.
ALPHA = 0.05
#: CAVs per concept, and random-vs-random CAVs (Kim et al.: "many"; >= 30 here).
N_RUNS = 30
#: A cell is an example of a concept when the concept covers at least this share of its voxels.
#: Not "mostly" (0.5): on the phantom no training cell is half endplate, cortex or condensation
#: band (thin structures: at most 48 %, 44 %, 47 % of an 8^3 cell), while 0.25 leaves
#: 244 (band) to 1304 (endplate) cells.
MIN_SHARE = 0.25


class TooFewExamplesError(DataValueError):
    """A concept has too few examples (cells or vertebrae) to fit a CAV."""


# --------------------------------------------------------------------------------------------
# The layer: activations and gradients of the fracture logit
# --------------------------------------------------------------------------------------------

def _logit(output, batch: int) -> torch.Tensor:
    """The fracture logit [B]: one output; for two classes log P1/P0 = z1 - z0."""
    y = (output[0] if isinstance(output, (tuple, list)) else output).reshape(batch, -1)
    if y.shape[1] == 1:
        return y[:, 0]
    if y.shape[1] == 2:
        return y[:, 1] - y[:, 0]
    raise DataValueError(None, f"model output: expected one logit (or two classes) per sample, got {tuple(y.shape)}")


def layer_gradients(model: torch.nn.Module, patches, layer: str, transform: Callable | None = None,
                    batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A [N, K, *grid] activations of ``layer`` and grad [N, K, *grid] = d logit / dA (float32).

    A forward hook replaces the layer's output by a detached copy that requires grad, so the
    backward pass (``torch.autograd.grad``) stops at the layer. Eval mode (batch norm's running
    statistics: samples are independent, so one backward of the batch's summed logits gives
    each sample's gradient), fp32, on the model's device; no parameter gradient is kept.
    ``patches`` [N, ...]: HU patches (with ``transform``, e.g. ``net.transform``) or inputs.
    """
    module = find_layer(model, layer)
    device = model_device(model)
    held: list[torch.Tensor] = []

    def hook(_m, _i, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        leaf = out.detach().float().requires_grad_(True)
        held.append(leaf)
        return leaf

    acts, grads = [], []
    handle = module.register_forward_hook(hook)
    try:
        with evaluating(model), torch.enable_grad():
            for start in range(0, len(patches), batch_size):
                batch = patches[start:start + batch_size]
                x = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
                x = x.to(device)
                x = (transform(x) if transform is not None else x).float()
                held.clear()
                z = _logit(model(x), x.shape[0])
                if not held:
                    raise DataValueError(layer, "the layer did not run in the forward pass")
                (g,) = torch.autograd.grad(z.sum(), held[0])
                acts.append(held[0].detach().cpu().numpy())
                grads.append(g.cpu().numpy())
    finally:
        handle.remove()
    if not acts:
        raise DataValueError(None, "patches: no samples")
    return np.concatenate(acts).astype(np.float32), np.concatenate(grads).astype(np.float32)


def layer_activations(model: torch.nn.Module, patches, layer: str, transform: Callable | None = None,
                      batch_size: int = 16) -> np.ndarray:
    """A [N, K, *grid] float32 of ``layer`` (the forward engine in exact fp32, ``amp=False``)."""
    out = [b.activations[layer].cpu().numpy() for b in
           forward_batches(model, patches, [layer], batch_size=batch_size, transform=transform, amp=False)]
    if not out:
        raise DataValueError(None, "patches: no samples")
    return np.concatenate(out)


def cell_vectors(A: np.ndarray) -> np.ndarray:
    """A [N, K, *grid] -> [N * cells, K]: row i * cells + c is cell c (C order) of sample i, as
    the rows of ``ConceptCounts.counts.reshape(-1, C)``."""
    A = np.asarray(A)
    return A.reshape(A.shape[0], A.shape[1], -1).transpose(0, 2, 1).reshape(-1, A.shape[1])


def vertebra_vectors(A: np.ndarray) -> np.ndarray:
    """A [N, K, *grid] -> [N, K]: each vertebra's cells pooled (mean), for vertebra-level concepts."""
    A = np.asarray(A)
    return A.reshape(A.shape[0], A.shape[1], -1).mean(axis=2)


# --------------------------------------------------------------------------------------------
# Examples of a concept
# --------------------------------------------------------------------------------------------

def cell_examples(counts: ConceptCounts, concept: str, n: int | None = None, seed: int = 0,
                  min_share: float = MIN_SHARE, without: bool = False, min_examples: int = 10) -> np.ndarray:
    """Indices into :func:`cell_vectors` rows of cells covered by ``concept`` for at least
    ``min_share`` of their voxels (``without``: cells with none of it), ``n`` of them drawn
    without replacement (None: all, sorted). :class:`TooFewExamplesError` below ``min_examples``."""
    if concept not in counts.names:
        raise DataValueError(concept, f"not a concept of the counts; they have {list(counts.names)}")
    c = counts.counts[..., counts.names.index(concept)].reshape(-1)
    pool = np.flatnonzero(c == 0) if without else np.flatnonzero(c >= min_share * counts.cell_volume)
    if len(pool) < min_examples:
        what = "cells without it" if without else f"cells at least {min_share:g} covered by it"
        raise TooFewExamplesError(concept, f"{len(pool)} {what}, need at least {min_examples}")
    if n is None or n >= len(pool):
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, size=int(n), replace=False))


def cell_pools(counts: ConceptCounts, concepts: Sequence[str], min_share: float = MIN_SHARE,
               min_examples: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray] | str]:
    """{concept: (positive cells, negative cells)} for :func:`tcav_test`; a concept with too few
    examples maps to the reason (a string), so the table can say why it was not tested."""
    out: dict = {}
    for c in concepts:
        try:
            out[c] = (cell_examples(counts, c, None, min_share=min_share, min_examples=min_examples),
                      cell_examples(counts, c, None, without=True, min_examples=min_examples))
        except TooFewExamplesError as e:
            out[c] = e.problem
    return out


# --------------------------------------------------------------------------------------------
# The CAV: a logistic regression
# --------------------------------------------------------------------------------------------

def logistic_regression(X: np.ndarray, y: np.ndarray, l2: float = 0.01, max_iter: int = 500) -> tuple[np.ndarray, float]:
    """(w [K], b) minimising mean log(1 + exp(-s (X w + b))) + l2 / 2 |w|^2, s = 2 y - 1.

    SciPy's L-BFGS-B on the exact gradient in float64 (no scikit-learn here). Why not torch: the
    objective is strictly convex (L2), so the optimum is unique and a deterministic float64
    solver from w = 0 gives the same CAV at any thread count; the randomness of TCAV is in the
    example draws (their seeds). ``l2`` = 0.01 is the penalty of Captum's default classifier
    (SGD, alpha = 0.01), with the logistic loss in place of its hinge."""
    X = np.asarray(X, dtype=np.float64)
    s = 2.0 * np.asarray(y, dtype=np.float64) - 1.0
    n, k = X.shape

    def loss(theta):
        w, b = theta[:k], theta[k]
        m = s * (X @ w + b)
        dm = -s * np.exp(-np.logaddexp(0.0, m))           # d/dm log(1 + e^-m) = -sigmoid(-m)
        return (np.logaddexp(0.0, -m).mean() + 0.5 * l2 * w @ w,
                np.append(X.T @ dm / n + l2 * w, dm.mean()))

    res = minimize(loss, np.zeros(k + 1), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    if not res.success:
        warnings.warn(f"logistic regression: L-BFGS-B stopped without converging ({res.message})")
    return res.x[:k], float(res.x[k])


def _check_sets(pos: np.ndarray, neg: np.ndarray, min_examples: int) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise DataValueError(None, f"pos {pos.shape} and neg {neg.shape}: expected [n, K] and [m, K], same K")
    for name, a in (("positive", pos), ("negative", neg)):
        if len(a) < min_examples:
            raise TooFewExamplesError(None, f"{len(a)} {name} examples, need at least {min_examples}")
    return pos, neg


def fit_cav(pos: np.ndarray, neg: np.ndarray, l2: float = 0.01, min_examples: int = 2) -> np.ndarray:
    """The concept activation vector: the unit normal [K] of :func:`logistic_regression`
    separating ``pos`` [n, K] (label 1) from ``neg`` [m, K]; it points towards the concept."""
    pos, neg = _check_sets(pos, neg, min_examples)
    w, _ = logistic_regression(np.vstack([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))], l2)
    norm = np.linalg.norm(w)
    if norm == 0:
        raise DataValueError(None, "pos and neg: the fitted CAV is zero (identical sets?)")
    return w / norm


# --------------------------------------------------------------------------------------------
# The score
# --------------------------------------------------------------------------------------------

def directional_derivatives(grad: np.ndarray, cav: np.ndarray, per_cell: bool = False) -> np.ndarray:
    """S [N] = sum over cells of grad[:, :, cell] . v (``per_cell``: [N, cells], each cell's own)."""
    grad = np.asarray(grad)
    v = np.asarray(cav, dtype=np.float64).reshape(-1)
    if grad.ndim < 2 or grad.shape[1] != len(v):
        raise DataValueError(None, f"grad {grad.shape} and cav {v.shape}: expected [N, K, ...] and [K]")
    per = np.einsum("nkc,k->nc", grad.reshape(grad.shape[0], grad.shape[1], -1).astype(np.float64), v)
    return per if per_cell else per.sum(axis=1)


def tcav_score(grad: np.ndarray, cav: np.ndarray, per_cell: bool = False) -> float:
    """TCAV_Q: the fraction of S > 0 (:func:`directional_derivatives`; S = 0 counts as not)."""
    return float(np.mean(directional_derivatives(grad, cav, per_cell) > 0))


def tcav_magnitude(grad: np.ndarray, cav: np.ndarray, per_cell: bool = False) -> float:
    """Captum's magnitude score: sum of the positive S over sum of |S| (NaN when all S are 0)."""
    S = directional_derivatives(grad, cav, per_cell)
    total = np.abs(S).sum()
    return float(S[S > 0].sum() / total) if total > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Significance
# --------------------------------------------------------------------------------------------

def significance(scores: Mapping[str, Sequence[float]], random_scores: Sequence[float],
                 alpha: float = ALPHA) -> pd.DataFrame:
    """One row per concept: ``mean``, ``std`` (ddof 1) of its TCAV scores, ``p`` of the two-sided
    t-test against ``random_scores`` (``scipy.stats.ttest_ind``, equal variances as tensorflow/tcav),
    ``p_bonferroni`` = min(1, p m) with m = len(scores), ``p_shown`` (at the rule's precision,
    :func:`~vfcore.analysis.story.format_p`), ``significant`` (p_bonferroni < alpha; False when p
    is undefined: both sets constant and equal), ``runs``."""
    r = np.asarray(random_scores, dtype=np.float64)
    m = len(scores)
    rows = []
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        with warnings.catch_warnings():      # a constant set (every run 1.0) warns; its p stays valid
            warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
            p = float(ttest_ind(s, r).pvalue) if len(s) > 1 and len(r) > 1 else float("nan")
        pb = min(1.0, p * m) if np.isfinite(p) else float("nan")
        rows.append({"concept": name, "mean": float(s.mean()), "std": float(s.std(ddof=1)) if len(s) > 1 else np.nan,
                     "random_mean": float(r.mean()), "random_std": float(r.std(ddof=1)) if len(r) > 1 else np.nan,
                     "p": p, "p_bonferroni": pb, "p_shown": format_p(pb, alpha),
                     "significant": bool(np.isfinite(pb) and pb < alpha), "runs": len(s)})
    table = pd.DataFrame(rows)
    table.attrs["rule"] = f"two-sided t-test against {len(r)} random CAVs, Bonferroni over {m} concepts: p < {alpha:g}"
    return table


def tcav_test(grad: np.ndarray, examples: np.ndarray, pools: Mapping[str, tuple[np.ndarray, np.ndarray] | str],
              n_runs: int = N_RUNS, n_examples: int = 100, l2: float = 0.01, alpha: float = ALPHA,
              seed: int = 0, per_cell: bool = False, holdout: float = 1 / 3) -> pd.DataFrame:
    """TCAV with its significance test, one row per concept of ``pools``.

    ``grad`` [N, K, *grid] of the fracture logit on the true positives (:func:`layer_gradients`);
    ``examples`` [M, K] the training examples (:func:`cell_vectors` or :func:`vertebra_vectors`);
    ``pools`` {concept: (positive rows, negative rows)} of ``examples`` (:func:`cell_pools`), or a
    reason string (the row says it, untested). Run j: up to ``n_examples`` positives and as many
    negatives drawn at random, ``holdout`` of each kept out to measure the CAV's accuracy, the
    CAV fitted on the rest and scored; the random CAVs: two random sets of ``n_examples`` rows
    of all ``examples``. Columns of :func:`significance` plus ``n`` (true positives),
    ``positives`` (the pool), ``accuracy`` (mean held-out accuracy), ``magnitude`` (mean), ``reason``.
    """
    grad, X = np.asarray(grad), np.asarray(examples)
    if X.ndim != 2 or grad.ndim < 2 or grad.shape[1] != X.shape[1]:
        raise DataValueError(None, f"grad {grad.shape} and examples {X.shape}: expected [N, K, ...] and [M, K], same K")
    if int(n_runs) < 2:
        raise InvalidParameterError("n_runs", "at least 2 (the paper and Captum: many; default 30)", n_runs)
    if not 0 <= holdout < 1:
        raise InvalidParameterError("holdout", "a share in [0, 1)", holdout)
    rng = np.random.default_rng(seed)

    def run(pos_pool, neg_pool, size):
        pos = rng.choice(pos_pool, size=min(size, len(pos_pool)), replace=False)
        neg = rng.choice(neg_pool, size=len(pos), replace=False)
        cut = int(round(len(pos) * (1 - holdout)))
        w, b = logistic_regression(np.vstack([X[pos[:cut]], X[neg[:cut]]]), np.r_[np.ones(cut), np.zeros(cut)], l2)
        v = w / np.linalg.norm(w)
        acc = np.nan
        if cut < len(pos):
            z = np.r_[X[pos[cut:]] @ w, X[neg[cut:]] @ w] + b
            acc = float(np.mean((z > 0) == np.r_[np.ones(len(pos) - cut), np.zeros(len(pos) - cut)]))
        return tcav_score(grad, v, per_cell), tcav_magnitude(grad, v, per_cell), acc

    everything = np.arange(len(X))
    random_runs = []
    for _ in range(int(n_runs)):
        both = rng.choice(everything, size=min(2 * n_examples, len(X)), replace=False)
        half = len(both) // 2
        random_runs.append(run(both[:half], both[half:], half))
    tested, extra, untested = {}, {}, []
    for name, pool in pools.items():
        if isinstance(pool, str):
            untested.append({"concept": name, "reason": pool})
            continue
        res = np.array([run(np.asarray(pool[0]), np.asarray(pool[1]), n_examples) for _ in range(int(n_runs))])
        tested[name] = res[:, 0]
        extra[name] = {"positives": len(pool[0]), "accuracy": float(np.nanmean(res[:, 2])) if holdout else np.nan,
                       "magnitude": float(np.nanmean(res[:, 1]))}
    table = significance(tested, [r[0] for r in random_runs], alpha) if tested else pd.DataFrame()
    for col in ("positives", "accuracy", "magnitude"):
        table[col] = [extra[c][col] for c in table.get("concept", [])]
    table = pd.concat([table, pd.DataFrame(untested)], ignore_index=True)
    table.insert(1, "n", grad.shape[0] * (int(np.prod(grad.shape[2:])) if per_cell else 1))
    table["reason"] = table["reason"].fillna("") if "reason" in table else ""
    r = np.array(random_runs, dtype=np.float64)
    table.attrs.update({"rule": f"two-sided t-test against {len(r)} random CAVs, Bonferroni over {len(tested)} "
                                f"concepts: p < {alpha:g}", "random_accuracy": float(np.nanmean(r[:, 2])),
                        "random_magnitude": float(np.nanmean(r[:, 1])), "per_cell": per_cell})
    return table


# --------------------------------------------------------------------------------------------
# A run end to end
# --------------------------------------------------------------------------------------------

def default_concepts(names: Sequence[str]) -> list[str]:
    """The fracture signs and the confounders (``outside the scan`` among them) that ``names`` has."""
    return [c for c in (*FRACTURE_CONCEPTS, *CONFOUNDERS) if c in names]


@dataclass
class TcavRun:
    """:func:`run_tcav`'s result: the ``table`` (:func:`tcav_test`), the training cells'
    concept ``counts`` (reuse them for another model), ``seconds`` per step, ``n_train``."""

    table: pd.DataFrame
    counts: ConceptCounts | None
    seconds: dict[str, float] = dc_field(default_factory=dict)
    n_train: int = 0


def run_tcav(run_dir, model: torch.nn.Module | None = None, concepts: Sequence[str] | None = None,
             counts: ConceptCounts | None = None, vertebra_sets: Mapping[str, np.ndarray] | None = None,
             n_runs: int = N_RUNS, n_examples: int = 100, min_share: float = MIN_SHARE, seed: int = 0,
             batch_size: int = 8, **kwargs) -> TcavRun:
    """TCAV of the fracture logit on a run's dissected true positives, CAVs from its training split.

    ``model``: default the run's network (an untrained one of the same preset is the control);
    the layer and input transform are the run's. Cells and concept masks by default (the phantom:
    :class:`~vfcore.analysis.alignment.RunConcepts`, raising ``NoConceptMasksError`` on real
    data); ``vertebra_sets`` {name: bool [N_train]} (training rows with the flag) makes the
    examples whole vertebrae instead, negatives the rows without it. Other arguments: :func:`tcav_test`.
    """
    seconds: dict[str, float] = {}
    art, net = load_artifacts(run_dir), load_network(run_dir)
    model = net.model if model is None else model
    t = time.perf_counter()
    tp = np.flatnonzero(art.samples["outcome"].to_numpy() == "TP")
    if len(tp) == 0:
        raise DataValueError(run_dir, "no true positives in the dissected set: the TCAV score is undefined")
    tp_patches = PatchArray.of(run_dir, art.samples["ct_path"].to_numpy()[tp])   # the dissected set's TPs
    _, grad = layer_gradients(model, tp_patches, net.layer, net.transform, batch_size)
    seconds["gradients"] = time.perf_counter() - t
    t = time.perf_counter()
    train, _, rows = load_split(run_dir, "train")
    A = layer_activations(model, train, net.layer, net.transform, 2 * batch_size)
    seconds["train_activations"] = time.perf_counter() - t
    t = time.perf_counter()
    if vertebra_sets is not None:
        X = vertebra_vectors(A)
        pools = {}
        for name, flag in vertebra_sets.items():
            flag = np.asarray(flag, dtype=bool)
            if flag.shape != (len(X),):
                raise DataValueError(name, f"expected {len(X)} booleans (training rows), got shape {flag.shape}")
            ok = min(flag.sum(), (~flag).sum()) >= 10
            pools[name] = (np.flatnonzero(flag), np.flatnonzero(~flag)) if ok else \
                f"{int(flag.sum())} vertebrae with it and {int((~flag).sum())} without, need at least 10 each"
    else:
        if counts is None:
            counts = concept_counts(RunConcepts.from_run(run_dir, rows), A.shape[2:], art.field)
            seconds["concept_counts"] = time.perf_counter() - t
            t = time.perf_counter()
        X = cell_vectors(A)
        pools = cell_pools(counts, default_concepts(counts.names) if concepts is None else concepts, min_share)
    table = tcav_test(grad, X, pools, n_runs, n_examples, seed=seed, **kwargs)
    seconds["cavs"] = time.perf_counter() - t
    return TcavRun(table, counts, seconds, len(X) if vertebra_sets is not None else len(A))
