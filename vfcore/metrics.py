"""Vertebra-level metrics (paper, Table 1) and the one TP/FP/TN/FN labelling.

* :func:`outcome_names`: "TP", "FP", "TN" or "FN" per vertebra at a decision threshold; the
  masks of :func:`outcome_masks` (used for c_k, Eq. 1) are read from it, so the two can never
  disagree;
* :func:`auc_score` and :func:`average_precision`: MONAI's ``compute_roc_auc`` and
  ``compute_average_precision`` (ties handled as scikit-learn does), NaN where undefined;
* :func:`classification_metrics` (F1, accuracy, AUC, AP), :func:`bootstrap_intervals`
  (``scipy.stats.bootstrap``, percentile, stratified by class) and
  :func:`table1` (mean +- std over seeds, or one seed with its bootstrap interval, in the
  layout of the paper's Table 1, whose rows are :data:`PAPER_TABLE1`).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from scipy.stats import DegenerateDataWarning, bootstrap

METRICS = ("f1", "accuracy", "auc", "ap")
OUTCOMES = ("TP", "FP", "TN", "FN")


def outcome_names(labels, probability, threshold: float = 0.5) -> np.ndarray:
    """"TP", "FP", "TN" or "FN" per vertebra [N] (predicted fractured: probability >= threshold)."""
    y = np.asarray(labels).astype(int) == 1
    pred = np.asarray(probability) >= threshold
    return np.where(y, np.where(pred, "TP", "FN"), np.where(pred, "FP", "TN"))


def outcome_masks(labels, probability, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Boolean [N] masks ``tp``, ``fp``, ``tn``, ``fn`` (from :func:`outcome_names`),
    ``positive`` (ground truth) and ``all``."""
    names = outcome_names(labels, probability, threshold)
    masks = {o.lower(): names == o for o in OUTCOMES}
    masks["positive"] = np.asarray(labels).astype(int) == 1
    masks["all"] = np.ones(len(names), dtype=bool)
    return masks


def _both_classes(labels, scores) -> tuple[torch.Tensor, torch.Tensor] | None:
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        return None
    return torch.from_numpy(s), torch.from_numpy(y.astype(np.int64))


def auc_score(labels, scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2
    (``monai.metrics.compute_roc_auc``); NaN when one class is missing."""
    from monai.metrics import compute_roc_auc   # monai is heavy to import: on first use only

    pair = _both_classes(labels, scores)
    return float("nan") if pair is None else float(compute_roc_auc(*pair))


def average_precision(labels, scores) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (as scikit-learn;
    ``monai.metrics.compute_average_precision``); NaN without positives."""
    from monai.metrics import compute_average_precision   # heavy: on first use only

    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    if y.all():                                     # every threshold has precision 1
        return 1.0
    pair = _both_classes(labels, scores)
    return float(compute_average_precision(*pair))


def classification_metrics(labels, probability, threshold: float = 0.5) -> dict[str, float]:
    """F1, accuracy (at ``threshold``), AUC and AP of fracture probabilities."""
    o = outcome_masks(labels, probability, threshold)
    tp, fp, fn = int(o["tp"].sum()), int(o["fp"].sum()), int(o["fn"].sum())
    n = len(o["all"])
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"f1": f1, "accuracy": (tp + int(o["tn"].sum())) / n if n else float("nan"),
            "auc": auc_score(labels, probability), "ap": average_precision(labels, probability)}


#: The paper's Table 1 (mean +- std over five seeds, %): trained on VerSe alone (3,920
#: vertebrae, 254 fractured) or on VerSe and in-house data (10,675 vertebrae, 1,246 fractured).
PAPER_TABLE1 = pd.DataFrame([
    {"Training": "VerSe", "Testing": "VerSe", "F1 (%)": "71.2 ± 10.8", "Acc. (%)": "78.2 ± 12.0",
     "AUC (%)": "84.5 ± 9.1", "AP (%)": "76.4 ± 14.5", "n (fractured)": "paper"},
    {"Training": "VerSe, in-house", "Testing": "VerSe", "F1 (%)": "86.1 ± 2.6", "Acc. (%)": "90.9 ± 1.6",
     "AUC (%)": "96.2 ± 0.9", "AP (%)": "94.1 ± 1.6", "n (fractured)": "paper"},
    {"Training": "VerSe, in-house", "Testing": "VerSe, in-house", "F1 (%)": "88.0 ± 0.7",
     "Acc. (%)": "88.0 ± 0.4", "AUC (%)": "94.7 ± 0.5", "AP (%)": "95.0 ± 0.4", "n (fractured)": "paper"},
])
_COLUMNS = dict(zip(METRICS, ("F1 (%)", "Acc. (%)", "AUC (%)", "AP (%)")))


def bootstrap_intervals(labels, probability, threshold: float = 0.5, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of F1, accuracy, AUC and AP over the vertebrae [N]
    (``scipy.stats.bootstrap``, ``method="percentile"``, ``n_boot`` resamples, seeded).

    Stratified by class: the fractured and the healthy vertebrae are two samples that scipy
    resamples separately, with replacement, so every resample keeps the split's class counts
    and AUC and AP stay defined (NaN only where a class is missing altogether); a class of one
    vertebra is the same in every resample. Returns, per metric, the (lower, upper) ``level``
    interval: how much the finite test set moves the result (a standard deviation over seeds
    says how much training moves it).
    """
    y = np.asarray(labels).astype(int) == 1
    p = np.asarray(probability, dtype=np.float64)
    classes = [p[y], p[~y]]                                  # fractured, healthy
    drawn = [i for i, c in enumerate(classes) if len(c) >= 2]    # scipy resamples 2 or more

    def statistic(*resampled) -> np.ndarray:
        parts = list(classes)
        for i, r in zip(drawn, resampled):
            parts[i] = r
        truth = np.r_[np.ones(len(parts[0]), int), np.zeros(len(parts[1]), int)]
        values = classification_metrics(truth, np.concatenate(parts), threshold)
        return np.array([values[m] for m in METRICS])

    if not drawn:                                            # nothing varies: the value itself
        low = high = statistic()
    else:
        with warnings.catch_warnings():  # a missing class: AUC is NaN in every resample, as it is
            warnings.simplefilter("ignore", DegenerateDataWarning)
            res = bootstrap([classes[i] for i in drawn], statistic, n_resamples=n_boot,
                            vectorized=False, confidence_level=level, method="percentile",
                            random_state=np.random.default_rng(seed))
        low, high = res.confidence_interval
    return {m: (float(lo), float(hi)) for m, lo, hi in zip(METRICS, low, high)}


def table1(per_seed: dict, training: str = "phantom", testing: str = "phantom",
           labels=None, probability=None, threshold: float = 0.5) -> pd.DataFrame:
    """One row in the layout of the paper's Table 1 (values in %).

    Several seeds: mean +- std over them. One seed: its value, and where the test split's
    ``labels`` and ``probability`` are given the 95 % bootstrap interval over its vertebrae
    (never "+- 0.0"). The column ``n (fractured)`` gives the test split's size.
    """
    values = pd.DataFrame(per_seed).T[list(METRICS)] * 100
    row = {"Training": training, "Testing": testing}
    ci = (bootstrap_intervals(labels, probability, threshold)
          if len(values) == 1 and labels is not None and probability is not None else None)
    for m, name in _COLUMNS.items():
        if len(values) > 1:
            row[name] = f"{values[m].mean():.1f} ± {values[m].std(ddof=1):.1f}"
        elif ci is not None:
            row[name] = f"{values[m].iloc[0]:.1f} ({100 * ci[m][0]:.1f}-{100 * ci[m][1]:.1f})"
        else:
            row[name] = f"{values[m].iloc[0]:.1f}"
    if labels is not None:
        y = np.asarray(labels).astype(int)
        row["n (fractured)"] = f"{len(y)} ({int(y.sum())})"
    return pd.DataFrame([row])
