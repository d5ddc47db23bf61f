"""Does the fracture score *use* a concept? TCAV (Kim et al., ICML 2018) at the dissected layer.

1. **CAV** (:func:`fit_cav`): the unit normal v [K] of an L2 logistic regression separating
   positive from negative examples, K-vectors from the *training* split: grid **cells**
   (positives: cells a concept covers for >= ``min_share`` of their voxels, :func:`cell_examples`;
   negatives: random cells without it, or only such cells of one tissue, ``within``), or, without
   concept masks (real data), whole **vertebrae** (cells pooled) from sets the student names.
2. **Score** (:func:`tcav_score`): grad [N, K, *grid] = d logit / dA on the dissected set's true
   positives (:func:`layer_gradients`); S_i = sum over cells of w_i(cell) grad_i[:, cell] . v and
   TCAV_Q = #{S > 0} / N. Default w = 1: v added at every cell, one number per vertebra as the
   paper has per image. ``weights`` = the concept's share of each cell of that vertebra: v added
   where the concept is. ``per_cell``: each (vertebra, cell) counts. Magnitude: :func:`tcav_magnitude`.
3. **Significance** (the paper's and Captum's tutorial procedure, :func:`tcav_test`): ``n_runs``
   CAVs per concept against fresh random negatives, ``n_runs`` random-vs-random CAVs, a two-sided
   ``scipy.stats.ttest_ind`` of the scores, Bonferroni over the concepts tested.

Two-sided: a score far *below* the random ones (v lowers the logit) is significant too. Read
with the untrained network of the same preset beside it: the negatives shape the CAV (Nicolson
et al. 2024), and an InstanceNorm right above the layer (the small preset's head) cancels most of
a shift added at every cell. Any [K] vector (a Net2Vec probe) can be scored. Draws nothing.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import ttest_ind

from vfcore.analysis.alignment import (CONFOUNDERS, FRACTURE_CONCEPTS, ConceptCounts, RunConcepts,
                                       concept_counts)
from vfcore.analysis.directions import cell_activations, cell_vectors
from vfcore.analysis.story import format_p
from vfcore.data import PatchArray, load_split
from vfcore.dissect.artifacts import load_artifacts, load_network
from vfcore.errors import DataValueError, InvalidParameterError
from vfcore.forward import evaluating, find_layer, model_device

#: Significance level after the Bonferroni correction.
ALPHA = 0.05
#: CAVs per concept, and random-vs-random CAVs (Kim et al.: "many"; >= 30 here).
N_RUNS = 30
#: A cell is an example of a concept when the concept covers at least this share of its voxels.
#: Not "mostly" (0.5): no phantom training cell is half endplate, cortex or condensation band (at
#: most 48, 44, 47 % of an 8^3 cell); 0.25 leaves 244 (band) to 1304 (endplate) cells.
MIN_SHARE = 0.25


class TooFewExamplesError(DataValueError):
    """A concept has too few examples (cells or vertebrae) to fit a CAV."""


def _logit(output, batch: int) -> torch.Tensor:
    """The fracture logit [B]: one output; for two classes log P1/P0 = z1 - z0."""
    y = (output[0] if isinstance(output, (tuple, list)) else output).reshape(batch, -1)
    if y.shape[1] not in (1, 2):
        raise DataValueError(None, f"model output: expected one logit (or two classes) per sample, got {tuple(y.shape)}")
    return y[:, 0] if y.shape[1] == 1 else y[:, 1] - y[:, 0]


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
        held.append((output[0] if isinstance(output, (tuple, list)) else output).detach().float().requires_grad_(True))
        return held[-1]

    acts, grads = [], []
    handle = module.register_forward_hook(hook)
    try:
        with evaluating(model), torch.enable_grad():
            for start in range(0, len(patches), batch_size):
                x = torch.as_tensor(np.asarray(patches[start:start + batch_size])).to(device)
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


def vertebra_vectors(A: np.ndarray) -> np.ndarray:
    """A [N, K, *grid] -> [N, K]: each vertebra's cells pooled (mean), for vertebra-level concepts."""
    return np.asarray(A).reshape(len(A), np.shape(A)[1], -1).mean(axis=2)


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
    return pool if n is None or n >= len(pool) else np.sort(np.random.default_rng(seed).choice(pool, int(n), False))


def cell_pools(counts: ConceptCounts, concepts: Sequence[str], min_share: float = MIN_SHARE,
               min_examples: int = 10, within: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray] | str]:
    """{concept: (positive cells, negative cells)} for :func:`tcav_test`; a concept with too few
    examples maps to the reason (a string), so the table can say why it was not tested.
    ``within`` (e.g. ``"vertebral body"``): negatives only from cells that concept covers for at
    least ``min_share`` (random cells of the same tissue, not of the whole field)."""
    region = None if within is None else cell_examples(counts, within, None, min_share=min_share)
    out: dict = {}
    for c in concepts:
        try:
            pos = cell_examples(counts, c, None, min_share=min_share, min_examples=min_examples)
            neg = cell_examples(counts, c, None, without=True, min_examples=min_examples)
            if region is not None and len(neg := np.intersect1d(neg, region)) < min_examples:
                raise TooFewExamplesError(c, f"{len(neg)} cells of {within!r} without it, need {min_examples}")
            out[c] = (pos, neg)
        except TooFewExamplesError as e:
            out[c] = e.problem
    return out


def vertebra_pools(sets: Mapping[str, np.ndarray], n: int, min_examples: int = 10) -> dict:
    """Vertebra-level pools for data without concept masks: {name: bool [n] (the training rows
    with the flag)} -> {name: (rows with it, rows without it)} or the reason, as :func:`cell_pools`."""
    out: dict = {}
    for name, flag in sets.items():
        flag = np.asarray(flag, dtype=bool)
        if flag.shape != (n,):
            raise DataValueError(name, f"expected {n} booleans (one per training row), got shape {flag.shape}")
        few = min(flag.sum(), (~flag).sum()) < min_examples
        out[name] = (f"{int(flag.sum())} vertebrae with it, {int((~flag).sum())} without: need at least "
                     f"{min_examples} each") if few else (np.flatnonzero(flag), np.flatnonzero(~flag))
    return out


def logistic_regression(X: np.ndarray, y: np.ndarray, l2: float = 0.01, max_iter: int = 500) -> tuple[np.ndarray, float]:
    """(w [K], b) minimising mean log(1 + exp(-s (X w + b))) + l2 / 2 |w|^2, s = 2 y - 1.

    ``torch.optim.LBFGS`` (strong Wolfe line search) in float64 from w = 0 (no scikit-learn here).
    The objective is strictly convex (L2): the optimum is unique and the CAV deterministic; TCAV's
    randomness is in the example draws (their seeds). Torch, not SciPy's L-BFGS-B: SciPy's solver
    calls OpenBLAS, whose threads thrash on a busy 2-core machine (measured on 134 x 128 phantom
    cells: 0.5 s a fit against 0.01 s with one BLAS thread), while torch keeps to
    ``torch.set_num_threads``. ``l2`` = 0.01 is the penalty of Captum's default classifier (SGD,
    alpha = 0.01), with the logistic loss in place of its hinge."""
    X = torch.as_tensor(np.asarray(X, dtype=np.float64))
    s = 2.0 * torch.as_tensor(np.asarray(y, dtype=np.float64)) - 1.0
    theta = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=max_iter, tolerance_grad=1e-5, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = torch.nn.functional.softplus(-s * (X @ theta[:-1] + theta[-1])).mean() + 0.5 * l2 * theta[:-1] @ theta[:-1]
        f.backward()
        return f

    with torch.enable_grad():
        opt.step(closure)
    if float(theta.grad.abs().max()) > 1e-4:      # stops at 1e-5: within 1e-7 of the optimum's direction (cosine)
        warnings.warn(f"logistic regression: LBFGS stopped after {max_iter} iterations without converging")
    out = theta.detach().numpy()
    return out[:-1].copy(), float(out[-1])


def fit_cav(pos: np.ndarray, neg: np.ndarray, l2: float = 0.01, min_examples: int = 2) -> np.ndarray:
    """The concept activation vector: the unit normal [K] of :func:`logistic_regression`
    separating ``pos`` [n, K] (label 1) from ``neg`` [m, K]; it points towards the concept."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise DataValueError(None, f"pos {pos.shape} and neg {neg.shape}: expected [n, K] and [m, K], same K")
    if min(len(pos), len(neg)) < min_examples:
        raise TooFewExamplesError(None, f"{len(pos)} positive and {len(neg)} negative examples, need at "
                                  f"least {min_examples} of each")
    w, _ = logistic_regression(np.vstack([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))], l2)
    if not np.linalg.norm(w) > 0:
        raise DataValueError(None, "pos and neg: the fitted CAV is zero (identical sets?)")
    return w / np.linalg.norm(w)


def directional_derivatives(grad: np.ndarray, cav: np.ndarray, per_cell: bool = False,
                            weights: np.ndarray | None = None) -> np.ndarray:
    """S [N] = sum over cells of w[:, cell] grad[:, :, cell] . v, w = 1 or ``weights`` [N, cells]
    (e.g. the concept's share of each cell: v added where the concept is); ``per_cell``:
    [N, cells], each cell's own (times w)."""
    grad = np.asarray(grad)
    v = np.asarray(cav, dtype=np.float64).reshape(-1)
    if grad.ndim < 2 or grad.shape[1] != len(v):
        raise DataValueError(None, f"grad {grad.shape} and cav {v.shape}: expected [N, K, ...] and [K]")
    per = np.einsum("nkc,k->nc", grad.reshape(grad.shape[0], grad.shape[1], -1).astype(np.float64), v)
    if weights is not None:
        if np.size(weights) != per.size:
            raise DataValueError(None, f"weights {np.shape(weights)}: expected one per sample and cell, {per.shape}")
        per = per * np.asarray(weights, dtype=np.float64).reshape(per.shape)
    return per if per_cell else per.sum(axis=1)


def tcav_score(grad: np.ndarray, cav: np.ndarray, per_cell: bool = False, weights: np.ndarray | None = None) -> float:
    """TCAV_Q: the fraction of S > 0 (:func:`directional_derivatives`; S = 0 counts as not; with
    ``weights`` and ``per_cell`` only the cells of weight > 0 count)."""
    S = directional_derivatives(grad, cav, per_cell, weights)
    if per_cell and weights is not None:
        S = S[np.asarray(weights).reshape(S.shape) > 0]
    return float(np.mean(S > 0))


def tcav_magnitude(grad: np.ndarray, cav: np.ndarray, per_cell: bool = False, weights=None) -> float:
    """Captum's magnitude score: sum of the positive S over sum of |S| (NaN when all S are 0)."""
    S = directional_derivatives(grad, cav, per_cell, weights)
    total = np.abs(S).sum()
    return float(S[S > 0].sum() / total) if total > 0 else float("nan")


def significance(scores: Mapping[str, Sequence[float]], random_scores, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per concept: ``mean``, ``std`` (ddof 1) of its TCAV scores, ``p`` of the two-sided
    t-test against the random CAVs' scores (``random_scores``: one list, or one per concept;
    ``scipy.stats.ttest_ind``, equal variances as tensorflow/tcav), ``p_bonferroni`` = min(1, p m)
    with m = len(scores), ``p_shown`` (at the rule's precision, :func:`~vfcore.analysis.story.format_p`),
    ``significant`` (p_bonferroni < alpha; False when p is undefined: both sets constant), ``runs``."""
    m = len(scores)
    rows = []
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        r = np.asarray(random_scores[name] if isinstance(random_scores, Mapping) else random_scores, dtype=np.float64)
        with warnings.catch_warnings():      # a constant set (every run 1.0) warns; its p stays valid
            warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
            p = float(ttest_ind(s, r).pvalue) if len(s) > 1 and len(r) > 1 else float("nan")
        pb = min(1.0, p * m) if np.isfinite(p) else float("nan")
        rows.append({"concept": name, "mean": s.mean(), "std": s.std(ddof=1) if len(s) > 1 else np.nan,
                     "random_mean": r.mean(), "random_std": r.std(ddof=1) if len(r) > 1 else np.nan,
                     "p": p, "p_bonferroni": pb, "p_shown": format_p(pb, alpha),
                     "significant": bool(np.isfinite(pb) and pb < alpha), "runs": len(s)})
    table = pd.DataFrame(rows, columns=["concept", "mean", "std", "random_mean", "random_std", "p", "p_bonferroni",
                                        "p_shown", "significant", "runs"])
    table.attrs["rule"] = f"two-sided t-test against random CAVs, Bonferroni over {m} concepts: p < {alpha:g}"
    return table


def tcav_test(grad: np.ndarray, examples: np.ndarray, pools: Mapping[str, tuple[np.ndarray, np.ndarray] | str],
              n_runs: int = N_RUNS, n_examples: int = 100, l2: float = 0.01, alpha: float = ALPHA,
              seed: int = 0, per_cell: bool = False, holdout: float = 1 / 3, random_pool: np.ndarray | None = None,
              weights: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """TCAV with its significance test, one row per concept of ``pools``.

    ``grad`` [N, K, *grid] of the fracture logit on the true positives (:func:`layer_gradients`);
    ``examples`` [M, K] the training examples (:func:`cell_vectors` or :func:`vertebra_vectors`);
    ``pools`` {concept: (positive rows, negative rows)} of ``examples`` (:func:`cell_pools`), or a
    reason string (the row says it, untested). Run j: up to ``n_examples`` positives and as many
    negatives drawn at random, ``holdout`` of each kept out to measure the CAV's accuracy, the
    CAV fitted on the rest and scored; random CAVs: two random sets of ``n_examples`` rows of
    ``random_pool`` (default: all). ``weights`` {concept: [N, cells]}: S only where the concept
    is (:func:`directional_derivatives`), over the true positives that have it, the random CAVs
    scored the same way. Columns of :func:`significance` plus ``n`` (true positives scored),
    ``positives`` (the pool), ``accuracy`` (mean held-out), ``magnitude`` (mean), ``reason``."""
    grad, X = np.asarray(grad), np.asarray(examples)
    if X.ndim != 2 or grad.ndim < 2 or grad.shape[1] != X.shape[1]:
        raise DataValueError(None, f"grad {grad.shape} and examples {X.shape}: expected [N, K, ...] and [M, K], same K")
    if not 0 <= holdout < 1 or int(n_runs) < 2:
        raise InvalidParameterError("n_runs, holdout", ">= 2 (default 30) and a share in [0, 1)", (n_runs, holdout))
    rng = np.random.default_rng(seed)
    grad = grad.reshape(grad.shape[0], grad.shape[1], -1)

    def fit(pos_pool, neg_pool, size) -> tuple[np.ndarray, float]:
        pos = rng.choice(pos_pool, size=min(size, len(pos_pool)), replace=False)
        neg = rng.choice(neg_pool, size=len(pos), replace=False)
        cut = int(round(len(pos) * (1 - holdout)))
        w, b = logistic_regression(np.vstack([X[pos[:cut]], X[neg[:cut]]]), np.r_[np.ones(cut), np.zeros(cut)], l2)
        right = np.r_[X[pos[cut:]] @ w + b > 0, X[neg[cut:]] @ w + b <= 0]        # held-out accuracy
        return w / np.linalg.norm(w), right.mean() if len(right) else np.nan

    everything = np.arange(len(X)) if random_pool is None else np.asarray(random_pool)
    random_cavs = []
    for _ in range(int(n_runs)):
        both = rng.choice(everything, size=min(2 * n_examples, len(everything)), replace=False)
        random_cavs.append(fit(both[:len(both) // 2], both[len(both) // 2:], len(both) // 2))
    scores, random_scores, extra, untested = {}, {}, {}, []
    for name, pool in pools.items():
        wt = None if weights is None or isinstance(pool, str) else np.asarray(weights[name]).reshape(len(grad), -1)
        have = np.ones(len(grad), bool) if wt is None else wt.sum(axis=1) > 0     # true positives with it
        if isinstance(pool, str) or not have.any():
            untested.append({"concept": name, "reason": pool if isinstance(pool, str) else "no true positive has it"})
            continue
        g, wt = grad[have], None if wt is None else wt[have]
        if not per_cell:                  # S = (sum over cells of w grad) . v: sum once, not in every run
            g, wt = (g if wt is None else g * wt[:, None, :]).sum(axis=2, dtype=np.float64)[:, :, None], None
        cavs = [fit(np.asarray(pool[0]), np.asarray(pool[1]), n_examples) for _ in range(int(n_runs))]
        scores[name] = [tcav_score(g, v, per_cell, wt) for v, _ in cavs]
        random_scores[name] = [tcav_score(g, v, per_cell, wt) for v, _ in random_cavs]
        extra[name] = {"n": len(g), "positives": len(pool[0]), "accuracy": np.nanmean([a for _, a in cavs]),
                       "magnitude": np.mean([tcav_magnitude(g, v, per_cell, wt) for v, _ in cavs])}
    table = significance(scores, random_scores, alpha)
    rule = table.attrs["rule"]
    for col in ("n", "positives", "accuracy", "magnitude"):
        table[col] = [extra[c][col] for c in table.get("concept", [])]
    table = pd.concat([table, pd.DataFrame(untested, columns=["concept", "reason"])], ignore_index=True)
    table["reason"] = table["reason"].fillna("")
    table[["n", "runs", "positives"]] = table[["n", "runs", "positives"]].astype("Int64")
    table.attrs.update(rule=rule, random_accuracy=float(np.nanmean([a for _, a in random_cavs])), per_cell=per_cell)
    return table


@dataclass
class TcavRun:
    """:func:`run_tcav`'s result: the ``table`` (:func:`tcav_test`), the concept counts of the
    training cells and of the true positives (``counts``, ``tp_counts``: reuse them for another
    model), ``seconds`` per step, ``n_train`` vertebrae."""

    table: pd.DataFrame
    counts: ConceptCounts | None
    tp_counts: ConceptCounts | None = None
    seconds: dict[str, float] = dc_field(default_factory=dict)
    n_train: int = 0


def run_tcav(run_dir, model: torch.nn.Module | None = None, concepts: Sequence[str] | None = None, *,
             counts: ConceptCounts | None = None, tp_counts: ConceptCounts | None = None, local: bool = True,
             within: str | None = None, vertebra_sets: Mapping[str, np.ndarray] | None = None,
             n_runs: int = N_RUNS, n_examples: int = 100, min_share: float = MIN_SHARE, seed: int = 0,
             batch_size: int = 8, train_activations: np.ndarray | None = None, **kwargs) -> TcavRun:
    """TCAV of the fracture logit on a run's dissected true positives, CAVs from its training split.

    ``model``: default the run's network (an untrained one of the same preset is the control);
    the layer and input transform are the run's. Cells and concept masks by default (the phantom:
    :class:`~vfcore.analysis.alignment.RunConcepts`; ``NoConceptMasksError`` on real data).
    ``local``: S on each true positive's own cells of the concept (weights: its share of each
    cell; the default, as an InstanceNorm above the layer cancels a shift at every cell). ``within``:
    negatives and random sets from that concept's cells (:func:`cell_pools`). ``vertebra_sets``
    {name: bool [N_train]} (training rows with the flag): whole vertebrae as examples
    (:func:`vertebra_pools`; S over every cell). ``train_activations``: ``model``'s activations of
    the training split [N_train, K, *grid], if already computed. Other arguments: :func:`tcav_test`."""
    art, net = load_artifacts(run_dir), load_network(run_dir)
    model, seconds, t = net.model if model is None else model, {}, time.perf_counter()
    tp = np.flatnonzero(art.samples["outcome"].to_numpy() == "TP")
    if len(tp) == 0:
        raise DataValueError(run_dir, "no true positives in the dissected set: the TCAV score is undefined")
    tp_patches = PatchArray.of(run_dir, art.samples["ct_path"].to_numpy()[tp])   # the dissected set's TPs
    _, grad = layer_gradients(model, tp_patches, net.layer, net.transform, batch_size)
    seconds["gradients"] = time.perf_counter() - t
    t = time.perf_counter()
    train, _, rows = load_split(run_dir, "train")
    if train_activations is None:
        A = cell_activations(model, train, net.layer, net.transform, 2 * batch_size).reshape(len(train), *grad.shape[1:])
    else:                                            # [N, K, *grid] or [N, K, cells]
        A = np.asarray(train_activations)
        if A.shape[0] != len(train) or A[0].size != np.prod(grad.shape[1:]):
            raise DataValueError("train_activations", f"shape {A.shape}: expected [{len(train)} training vertebrae, "
                                 f"{', '.join(map(str, grad.shape[1:]))}] (the layer's activations)")
        A = A.reshape(len(train), *grad.shape[1:])
    seconds["train_activations"] = time.perf_counter() - t
    t = time.perf_counter()
    if vertebra_sets is not None:
        X, pools = vertebra_vectors(A), vertebra_pools(vertebra_sets, len(A))
    else:
        if counts is None:
            counts = concept_counts(RunConcepts.from_run(run_dir, rows), A.shape[2:], art.field)
        if local and tp_counts is None:
            tp_counts = concept_counts(RunConcepts.from_run(run_dir, art.samples.iloc[tp]), A.shape[2:], art.field)
        seconds["concept_counts"], t = time.perf_counter() - t, time.perf_counter()
        X = cell_vectors(A)
        default = [c for c in (*FRACTURE_CONCEPTS, *CONFOUNDERS) if c in counts.names]   # "outside the scan" too
        pools = cell_pools(counts, default if concepts is None else concepts, min_share, within=within)
        if within is not None:
            kwargs["random_pool"] = cell_examples(counts, within, None, min_share=min_share)
        if local:
            kwargs["weights"] = {c: tp_counts.counts[..., tp_counts.names.index(c)] / tp_counts.cell_volume
                                 for c in pools}
    table = tcav_test(grad, X, pools, n_runs, n_examples, seed=seed, **kwargs)
    seconds["cavs"] = time.perf_counter() - t
    return TcavRun(table, counts, tp_counts, seconds, len(A))
