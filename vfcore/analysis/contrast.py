"""A contrastive ranking beside Eq. 1 (notebook 04, beyond the paper).

Eq. 1, c_k = |{x in P : k in E_x}| / |P|, counts how often unit k fires on the true positives
P. It has no negative class: a unit that fires on almost every vertebra (healthy or not) gets
c_k near 1. With q = 0.005 on a grid of 512 cells a unit's mask holds about 2.6 cells per
vertebra on average, so most units fire somewhere on most vertebrae and c_k saturates.

:func:`contrast_table` adds what Eq. 1 leaves out, from the same dissection:

* ``c_tn``: Eq. 1 over the true negatives (healthy vertebrae called healthy);
* ``delta = c_tp - c_tn``: how much more often the unit fires on found fractures than on
  correctly cleared vertebrae. As a test "unit fires -> found fracture" it is the true-positive
  rate minus the false-positive rate (Youden's J): it keeps Eq. 1's E_x and T_k and adds only
  the baseline;
* ``auc``: the AUC of the unit's per-vertebra maximum activation for the ground-truth label
  (threshold-free; 0.5 = no information), over all dissected vertebrae.

Draws nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata


def unit_auc(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC per column of ``values`` [N, K] for binary ``labels`` [N] (Mann-Whitney, ties count
    half); NaN when a class is empty."""
    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return np.full(v.shape[1], np.nan)
    r = rankdata(v, axis=0)
    return (r[y].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def contrast_table(enabled: np.ndarray, unit_max: np.ndarray, outcome, labels) -> pd.DataFrame:
    """Per unit: ``c_tp`` (Eq. 1), ``c_tn``, ``delta`` = c_tp - c_tn, ``auc`` of its maximum for
    the label, and ``rank_c`` / ``rank_delta`` / ``rank_auc`` (1 = best; ties by unit index).

    ``enabled`` [N, K] (k in E_x), ``unit_max`` [N, K] (max of A_k(x)), ``outcome`` [N] of
    "TP"/"FP"/"TN"/"FN", ``labels`` [N] ground truth. Sorted by ``rank_delta``. ``n_tp``,
    ``n_tn`` in ``attrs``.
    """
    E = np.asarray(enabled, dtype=bool)
    o = np.asarray(outcome, dtype=str)
    tp, tn = o == "TP", o == "TN"
    c_tp = E[tp].mean(axis=0) if tp.any() else np.full(E.shape[1], np.nan)
    c_tn = E[tn].mean(axis=0) if tn.any() else np.full(E.shape[1], np.nan)
    t = pd.DataFrame({"unit": np.arange(E.shape[1]), "c_tp": c_tp, "c_tn": c_tn, "delta": c_tp - c_tn,
                      "auc": unit_auc(unit_max, labels)})
    for col in ("c_tp", "delta", "auc"):
        order = np.lexsort((t["unit"].to_numpy(), -np.nan_to_num(t[col].to_numpy(), nan=-np.inf)))
        rank = np.empty(len(t), dtype=int)
        rank[order] = np.arange(1, len(t) + 1)
        t["rank_" + ("c" if col == "c_tp" else col)] = rank
    t = t.sort_values("rank_delta").reset_index(drop=True)
    t.attrs.update(n_tp=int(tp.sum()), n_tn=int(tn.sum()))
    return t


def top(table: pd.DataFrame, by: str = "delta", k: int = 10) -> list[int]:
    """The top-k units of ``table`` by ``c`` (Eq. 1), ``delta`` or ``auc``."""
    return [int(u) for u in table.sort_values(f"rank_{by}").unit[:k]]
