"""Eq. 1 and Eq. 2: enabled sets E_x, relevance r_k, correlation c_k, rankings, exemplars.

c_k = |{x in P : k in E_x}| / |P| (Eq. 1) over the true-positive predictions P (the paper),
the false-positive variant divided by |FP|, and r_k(x) = sum(M_k(x) * A_k(x)) (Eq. 2).

c_k is a proportion over |P| samples, so it moves in steps of 1/|P|: every ranking records its
n, a bootstrap 95 % interval of c_k (:func:`bootstrap_c`), how many units share a value
(:func:`tie_counts`), and a flag when n < :data:`MIN_RANKING_N` (:func:`ranking_summary`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap

from vfcore.errors import DataValueError, InvalidParameterError

from vfcore.metrics import outcome_masks as outcomes  # the one TP/FP/TN/FN labelling

from .dissection import Dissection
from .quantile import M_k


class UndefinedCorrelationError(DataValueError):
    """c_k (Eq. 1) over an empty set (no true positives, no false positives): undefined."""


def enabled_sets(A, T, axis: int = 1) -> np.ndarray:
    """E_x as an indicator [N, K]: sum M_k(x) > 0 with M_k(x) = A_k(x) > T_k, for activations
    A [N, K, *spatial] (``axis`` = the unit axis)."""
    M = M_k(A, T, axis)
    return M.reshape(M.shape[:axis + 1] + (-1,)).any(axis=-1)


def relevance(A, T, axis: int = 0) -> np.ndarray:
    """r_k = sum(M_k(x) * A_k(x)) (Eq. 2) with M_k(x) = A_k(x) > T_k (float64).

    ``A`` [K, *spatial] for one sample -> [K]; [N, K, *spatial] with ``axis=1`` -> [N, K].
    """
    M = M_k(A, T, axis)
    A = np.asarray(A.detach().float().cpu() if isinstance(A, torch.Tensor) else A, dtype=np.float64)
    thresholded = np.where(M, A, 0.0)
    return thresholded.reshape(thresholded.shape[:axis + 1] + (-1,)).sum(axis=-1)


def top_units(r: np.ndarray, n: int = 10) -> np.ndarray:
    """The n most relevant units of one inference: descending r_k, ties by unit index."""
    r = np.asarray(r, dtype=np.float64)
    return np.lexsort((np.arange(len(r)), -r))[:n]


SUBSET_NAMES = {"tp": "true-positive predictions", "fp": "false-positive predictions",
                "tn": "true negatives", "fn": "false negatives",
                "positive": "ground-truth fractures", "all": "all samples"}


def correlation(enabled: np.ndarray, subset: np.ndarray, name: str = "subset") -> np.ndarray:
    """c_k = sum_{x in P} 1_{E_x}(k) / |P| (Eq. 1) for the samples where ``subset`` is True.

    ``enabled`` [N, K] bool (k in E_x). An empty subset raises
    :class:`UndefinedCorrelationError` (c_k is undefined; no division by zero).
    """
    enabled = np.asarray(enabled, dtype=bool)
    subset = np.asarray(subset, dtype=bool)
    n = int(subset.sum())
    if n == 0:
        raise UndefinedCorrelationError(None, f"c_k is undefined: the dissection set has no "
                                        f"{SUBSET_NAMES.get(name, name)} (0 of {len(subset)} samples)")
    return enabled[subset].sum(axis=0) / n


#: A ranking over fewer samples than this is flagged (``small_n``): c_k moves in steps of 1/n.
MIN_RANKING_N = 5
#: Bootstrap resamples for the interval of c_k, and the seed of their generator.
BOOTSTRAP_B = 1000
BOOTSTRAP_SEED = 0
_BOOTSTRAP_CELLS = 1 << 24                 # resampled entries held at once (K x batch x n: 16 MB)


def bootstrap_c(enabled: np.ndarray, subset: np.ndarray, B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED,
                level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of c_k (Eq. 1) over the samples of ``subset``
    (``scipy.stats.bootstrap``, ``method="percentile"``, seeded).

    ``enabled`` [N, K] bool (k in E_x), ``subset`` [N] bool with n samples. Each of the ``B``
    resamples draws n of the subset's samples with replacement
    (``numpy.random.default_rng(seed)``) and recomputes c_k, the mean of 1_{E_x}(k) over them;
    the interval is the (1 - level)/2 and (1 + level)/2 quantiles (linear) of the B values.
    Resamples come in batches of K x batch x n booleans (bounded memory for any n), the same
    random stream as one draw. One sample is every resample: the interval is [c_k, c_k].
    Returns (c_low [K], c_high [K]).
    Raises :class:`UndefinedCorrelationError` for an empty subset.
    """
    E = np.asarray(enabled, dtype=bool)[np.asarray(subset, dtype=bool)]          # [n, K]
    n, K = E.shape
    if n == 0:
        raise UndefinedCorrelationError(None, "no bootstrap interval: the subset is empty")
    if n == 1:                                   # scipy resamples two or more samples
        c = E[0].astype(np.float64)
        return c, c.copy()
    res = bootstrap((E,), np.mean, axis=0, n_resamples=B, batch=max(1, _BOOTSTRAP_CELLS // (n * K)),
                    vectorized=True, confidence_level=level, method="percentile",
                    random_state=np.random.default_rng(seed))
    return res.confidence_interval.low, res.confidence_interval.high


def tie_counts(values: np.ndarray, decimals: int = 12) -> np.ndarray:
    """For every unit, how many units (itself included) share its value (rounded to
    ``decimals``, so 0.3 - 0.1 and 0.2 count as one value; NaN never ties): pandas
    ``value_counts``."""
    v = pd.Series(np.round(np.asarray(values, dtype=np.float64), decimals))
    return v.map(v.value_counts()).fillna(1).to_numpy(dtype=int)


def ranking_note(n: int, subset: str) -> str:
    """The message notebooks and the explorer print above a ranking over n samples ("" when
    n >= MIN_RANKING_N)."""
    if n >= MIN_RANKING_N:
        return ""
    what = SUBSET_NAMES.get(subset, subset)
    return (f"only {n} {what}: c_k moves in steps of 1/{n}, so this ranking is anecdotal "
            f"(fewer than {MIN_RANKING_N} samples); read its units as examples, not as a ranking")


TIE_BREAK = {"c_k": "mean r_k over the subset, then unit index", "delta": "c_fp, then unit index",
             "c_fp": "mean r_k over the false positives, then unit index"}


def ranking_summary(table: pd.DataFrame, key: str, subset: str, top: int = 10) -> dict:
    """What meta.json records of a ranking (``table`` sorted, with columns ``n``, ``ties`` and
    the sort ``key``): ``n``, ``small_n``, ``note`` (:func:`ranking_note`) and ``ties``:
    ``top``, ``distinct_values`` (among the top ``top`` values of ``key``),
    ``units_sharing_top_values`` (all units whose value is one of them), ``tied_across_cut``
    (units below rank ``top`` that share the value at rank ``top``: the cut is arbitrary), and a
    ``note``."""
    n = int(table["n"].iloc[0]) if len(table) else 0
    head = np.round(table[key].head(top).to_numpy(dtype=np.float64), 12)
    values = np.round(table[key].to_numpy(dtype=np.float64), 12)
    sharing = int(np.isin(values, head).sum())
    across = int((values[len(head):] == head[-1]).sum()) if len(head) else 0
    distinct = int(len(np.unique(head)))
    tie_break = TIE_BREAK.get(key, "unit index")
    note = (f"the top {len(head)} units have {distinct} distinct {key} values, shared by {sharing} units; "
            f"{across} unit(s) below rank {len(head)} tie with rank {len(head)}; ties are ordered by {tie_break}")
    return {"n": n, "subset": subset, "key": key, "small_n": n < MIN_RANKING_N, "note": ranking_note(n, subset),
            "ties": {"top": len(head), "distinct_values": distinct, "units_sharing_top_values": sharing,
                     "tied_across_cut": across, "tie_break": tie_break, "note": note}}


def _competition_rank(values: np.ndarray, decimals: int = 12) -> np.ndarray:
    """For a sorted (descending) column: the rank of the first unit with the same value
    ("1224" ranking: tied units share the best rank; pandas ``rank(method="min")``; NaN, sorted
    last, never ties: its own position)."""
    v = pd.Series(np.round(np.asarray(values, dtype=np.float64), decimals))
    rank = v.rank(method="min", ascending=False)
    return rank.fillna(pd.Series(np.arange(1, len(v) + 1, dtype=np.float64))).to_numpy(dtype=int)


def _add_counts(table: pd.DataFrame, key: str, n: int, low: np.ndarray, high: np.ndarray,
                prefix: str) -> pd.DataFrame:
    """Insert the interval, n, tie and small-n columns after ``key`` (table sorted by ``rank``)."""
    units = table["unit"].to_numpy()
    at = table.columns.get_loc(prefix if prefix in table else key) + 1
    name = "c" if prefix == "c_k" else prefix
    for offset, (col, values) in enumerate(((f"{name}_low", low[units]), (f"{name}_high", high[units]))):
        table.insert(at + offset, col, values)
    table["n"] = n
    table["ties"] = tie_counts(table[key].to_numpy())
    table["tied_rank"] = _competition_rank(table[key].to_numpy())
    table["small_n"] = n < MIN_RANKING_N
    return table


def _order(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Descending by ``primary``, then ``secondary``, then ascending unit index."""
    k = np.arange(len(primary))
    return np.lexsort((k, -np.nan_to_num(secondary, nan=-np.inf), -np.nan_to_num(primary, nan=-np.inf)))


def _c_or_nan(d: Dissection, subset: np.ndarray, name: str) -> np.ndarray:
    try:
        return correlation(d.enabled, subset, name)
    except UndefinedCorrelationError:
        return np.full(d.n_units, np.nan)


def _mean_r(d: Dissection, subset: np.ndarray) -> np.ndarray:
    return d.r[subset].mean(axis=0) if subset.any() else np.full(d.n_units, np.nan)


def rank_units(d: Dissection, labels, subset: str = "tp", threshold: float = 0.5,
               B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Units sorted by c_k over ``subset`` (``"tp"``: true-positive predictions, the paper;
    ``"positive"``: ground-truth fractures, what the published code did).

    Columns: ``rank`` (1 = most correlated), ``unit``, ``c_k`` (the sort key), ``c_low``,
    ``c_high`` (bootstrap 95 % interval of c_k, :func:`bootstrap_c` with ``B``, ``seed``),
    ``c_tp``, ``c_positive``, ``c_fp``, ``c_all``, ``mean_r`` (mean r_k over the subset; ties
    in c_k are broken by it, then by unit index), ``T_k``, ``realised_tail``, ``degenerate``,
    ``n`` (|subset|), ``ties`` (units with the same c_k), ``tied_rank`` (the best rank of its
    tie group), ``small_n`` (n < MIN_RANKING_N).
    Raises :class:`UndefinedCorrelationError` when the subset is empty.
    """
    o = outcomes(labels, d.probability, threshold)
    c = correlation(d.enabled, o[subset], subset)
    low, high = bootstrap_c(d.enabled, o[subset], B, seed)
    mean_r = _mean_r(d, o[subset])
    order = _order(c, mean_r)
    table = pd.DataFrame({
        "unit": np.arange(d.n_units), "c_k": c,
        "c_tp": _c_or_nan(d, o["tp"], "tp"), "c_positive": _c_or_nan(d, o["positive"], "positive"),
        "c_fp": _c_or_nan(d, o["fp"], "fp"), "c_all": _c_or_nan(d, o["all"], "all"),
        "mean_r": mean_r, "T_k": d.T.astype(np.float64), "realised_tail": d.realised_tail,
        "degenerate": d.flags["degenerate"]}).iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, d.n_units + 1))
    return _add_counts(table, "c_k", int(o[subset].sum()), low, high, "c_k")


def rank_false_positives(d: Dissection, labels, threshold: float = 0.5,
                         B: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Units behind false positives: c_k over the false positives (Eq. 1 with P = FP, divided by
    |FP|), and the differential ``delta = c_fp - c_tp`` (fires more in false than in true
    positives). Sorted by ``delta`` (then c_fp); ``rank`` is that order, ``rank_c_fp`` the
    order by c_fp alone. ``c_tp``/``delta`` are NaN when there are no true positives.
    ``c_fp_low``/``c_fp_high``: bootstrap 95 % interval of c_fp; ``n`` = |FP|; ``ties``,
    ``tied_rank`` on ``delta`` (on ``c_fp`` when there is no TP); ``small_n`` as in :func:`rank_units`.
    Raises :class:`UndefinedCorrelationError` when there are no false positives.
    """
    o = outcomes(labels, d.probability, threshold)
    c_fp = correlation(d.enabled, o["fp"], "fp")
    low, high = bootstrap_c(d.enabled, o["fp"], B, seed)
    c_tp = _c_or_nan(d, o["tp"], "tp")
    delta = c_fp - c_tp
    by_fp = _order(c_fp, _mean_r(d, o["fp"]))
    rank_fp = np.empty(d.n_units, dtype=int)
    rank_fp[by_fp] = np.arange(1, d.n_units + 1)
    order = _order(delta, c_fp)
    table = pd.DataFrame({
        "unit": np.arange(d.n_units), "delta": delta, "c_fp": c_fp, "c_tp": c_tp,
        "rank_c_fp": rank_fp, "mean_r_fp": _mean_r(d, o["fp"]), "mean_r_tp": _mean_r(d, o["tp"]),
        "T_k": d.T.astype(np.float64), "degenerate": d.flags["degenerate"]}).iloc[order]
    table = table.reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, d.n_units + 1))
    key = "delta" if o["tp"].any() else "c_fp"           # without TP, delta is NaN: c_fp orders
    return _add_counts(table, key, int(o["fp"].sum()), low, high, "c_fp")


# --------------------------------------------------------------------------------------------
# Exemplars: top-activating samples per unit, from the requested subset only
# --------------------------------------------------------------------------------------------

EXEMPLAR_SCORES = ("r", "max", "mean")


def exemplars(d: Dissection, subset: np.ndarray | None = None, k: int = 25, by: str = "r",
              units: Sequence[int] | None = None) -> dict[int, list[int]]:
    """Per unit, the indices of its ``k`` top-activating samples among ``subset`` (bool [N];
    None = all), best first (ties: lower index first).

    ``by``: ``"r"`` = r_k(x) = sum(M_k * A_k) (default; only samples where the unit fires, so
    every exemplar shows a mask), ``"max"`` or ``"mean"`` of A_k(x). A unit that fires in fewer
    than k samples of the subset gets fewer exemplars: the list is never filled with samples
    outside the subset (the published code's defect).
    """
    if by not in EXEMPLAR_SCORES:
        raise InvalidParameterError("by", f"one of {EXEMPLAR_SCORES}", by)
    score = {"r": d.r, "max": d.max, "mean": d.mean}[by]
    member = np.ones(d.n_samples, dtype=bool) if subset is None else np.asarray(subset, dtype=bool)
    if member.shape != (d.n_samples,):
        raise InvalidParameterError("subset", f"{d.n_samples} booleans (one per sample)", member.shape)
    out = {}
    for u in (range(d.n_units) if units is None else units):
        u = int(u)
        candidates = member & (d.mask_size[:, u] > 0) if by == "r" else member
        idx = np.flatnonzero(candidates)
        order = np.lexsort((idx, -score[idx, u].astype(np.float64)))
        out[u] = [int(i) for i in idx[order[:k]]]
    return out
