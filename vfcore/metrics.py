"""Vertebra-level metrics (paper, Table 1) and the one TP/FP/TN/FN labelling.

* :func:`outcome_names`: "TP", "FP", "TN" or "FN" per vertebra at a decision threshold; the
  masks of :func:`outcome_masks` (used for c_k, Eq. 1) are read from it, so the two can never
  disagree;
* :func:`auc_score` and :func:`average_precision`: MONAI's ``compute_roc_auc`` and
  ``compute_average_precision`` (ties handled as scikit-learn does), NaN where undefined;
* :func:`classification_metrics` (F1, accuracy, AUC, AP) and :func:`table1` (mean +- std
  over seeds in the layout of the paper's Table 1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

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
    from monai.metrics import compute_roc_auc

    pair = _both_classes(labels, scores)
    return float("nan") if pair is None else float(compute_roc_auc(*pair))


def average_precision(labels, scores) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (as scikit-learn;
    ``monai.metrics.compute_average_precision``); NaN without positives."""
    from monai.metrics import compute_average_precision

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


def table1(per_seed: dict, training: str = "phantom", testing: str = "phantom") -> pd.DataFrame:
    """Mean +- std over seeds in the layout of the paper's Table 1 (values in %)."""
    values = pd.DataFrame(per_seed).T[list(METRICS)] * 100
    row = {"Training": training, "Testing": testing}
    for m, name in zip(METRICS, ("F1 (%)", "Acc. (%)", "AUC (%)", "AP (%)")):
        std = values[m].std(ddof=1) if len(values) > 1 else 0.0
        row[name] = f"{values[m].mean():.1f} ± {std:.1f}"
    return pd.DataFrame([row])
