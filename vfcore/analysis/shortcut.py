"""Shortcut learning: does P(fracture) follow how much of the patch lies outside the scan?

A patch cut from a scan near its cranio-caudal end is partly outside the CT (``out_of_field``
in the patch manifest: the fraction of the 96^3 patch outside the scan, filled with air). A
network can learn "much air = fracture" if truncated patches and fractures go together in its
training data: a shortcut, right for the wrong reason. This module measures it for any run
and draws nothing (the notebook cell plots what it returns):

* :func:`out_of_field_analysis` (samples with ``fracture``, ``probability``, ``out_of_field``)
  -> per bin of out-of-field fraction: n, fractured, predicted fractured, TP/FP/TN/FN, mean
  P(fracture), error rate; per outcome the mean fraction; and, within each class, Spearman's
  rank correlation of ``out_of_field`` with P(fracture) (a shortcut shows as rho > 0 among
  the non-fractured, whose probability should not depend on the field of view at all);
* :func:`run_out_of_field` does it on a run's dissected set (``dissection/samples.csv`` of
  notebook 03, joined with the manifest's ``out_of_field`` where the samples lack it);
* :func:`outside_patches` lists the patches more than 10 % outside the scan, their levels,
  and whether each is a cranio-caudal end vertebra of its scan (where real scans truncate).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from vfcore.data import read_store
from vfcore.dissect.artifacts import load_artifacts
from vfcore.errors import DataValueError
from vfcore.metrics import outcome_names
from vfcore.verse import craniocaudal

__all__ = ["DEFAULT_BINS", "OUTSIDE_LIMIT", "OutOfFieldAnalysis", "out_of_field_analysis",
           "run_out_of_field", "outside_patches", "rank_correlation"]

#: Bin edges of the out-of-field fraction: [0, 1 %), [1 %, 10 %), ..., [50 %, 100 %].
DEFAULT_BINS = (0.0, 0.01, 0.1, 0.25, 0.5, 1.0)
#: A patch "outside the scan" (issue 11's measured goal): more than 10 % of it.
OUTSIDE_LIMIT = 0.1


@dataclass
class OutOfFieldAnalysis:
    """What :func:`out_of_field_analysis` measures (every table carries its n).

    ``bins``: one row per bin (``bin``, ``low``, ``high``, ``n``, ``fractured``,
    ``predicted_fractured``, ``tp``, ``fp``, ``tn``, ``fn``, ``mean_probability``,
    ``error_rate``); ``by_outcome``: ``outcome`` (TP/FP/TN/FN), ``n``, ``mean_out_of_field``,
    ``outside`` (how many > :data:`OUTSIDE_LIMIT`); ``correlation``: per class (``fractured``,
    ``not fractured``) ``n``, ``rho``, ``p``, ``reason`` (why rho is undefined, else "");
    ``samples``: the input with ``bin`` and ``outcome``; ``threshold``.
    """

    bins: pd.DataFrame
    by_outcome: pd.DataFrame
    correlation: pd.DataFrame
    samples: pd.DataFrame
    threshold: float


def rank_correlation(x, y) -> tuple[float, float, str]:
    """Spearman's rho of x and y with its p-value (``scipy.stats.spearmanr``), or (NaN, NaN,
    reason) when it is undefined: fewer than 3 samples, or x or y constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return float("nan"), float("nan"), f"undefined: {len(x)} sample(s), needs at least 3"
    for name, v in (("out_of_field", x), ("probability", y)):
        if np.all(v == v[0]):
            return float("nan"), float("nan"), f"undefined: {name} is the same ({v[0]:.3g}) for all {len(v)}"
    rho, p = spearmanr(x, y)
    return float(rho), float(p), ""


def _bin_labels(edges: np.ndarray) -> list[str]:
    return [f"{a:.0%}-{b:.0%}" for a, b in zip(edges[:-1], edges[1:])]


def out_of_field_analysis(samples: pd.DataFrame, threshold: float = 0.5,
                          bins=DEFAULT_BINS) -> OutOfFieldAnalysis:
    """P(fracture) and the errors against the out-of-field fraction (see the module docstring).

    ``samples``: one row per vertebra with ``fracture`` (0/1), ``probability`` and
    ``out_of_field`` (0-1). ``bins``: increasing edges from 0 to 1; a bin is [low, high), the
    last one [low, 1]. The outcome is ``vfcore.metrics.outcome_names`` at ``threshold``.
    """
    for col in ("fracture", "probability", "out_of_field"):
        if col not in samples:
            raise DataValueError(None, f"samples: needs a column {col!r} (has {list(samples.columns)})")
    edges = np.asarray(bins, dtype=np.float64)
    if len(edges) < 2 or np.any(np.diff(edges) <= 0) or edges[0] > 0 or edges[-1] < 1:
        raise DataValueError(None, f"bins: needs increasing edges from 0 to 1, got {list(bins)}")
    s = samples.reset_index(drop=True).copy()
    y = s["fracture"].to_numpy(dtype=int)
    prob = s["probability"].to_numpy(dtype=np.float64)
    oof = s["out_of_field"].to_numpy(dtype=np.float64)
    s["outcome"] = outcome_names(y, prob, threshold)
    which = np.clip(np.searchsorted(edges, oof, side="right") - 1, 0, len(edges) - 2)
    labels = _bin_labels(edges)
    s["bin"] = [labels[i] for i in which]
    rows = []
    for i, label in enumerate(labels):
        member = which == i
        o = s.loc[member, "outcome"]
        n = int(member.sum())
        rows.append({"bin": label, "low": edges[i], "high": edges[i + 1], "n": n,
                     "fractured": int(y[member].sum()), "predicted_fractured": int((prob[member] >= threshold).sum()),
                     **{k.lower(): int((o == k).sum()) for k in ("TP", "FP", "TN", "FN")},
                     "mean_probability": float(prob[member].mean()) if n else float("nan"),
                     "error_rate": float(o.isin(["FP", "FN"]).mean()) if n else float("nan")})
    by_outcome = pd.DataFrame([
        {"outcome": k, "n": int((s["outcome"] == k).sum()),
         "mean_out_of_field": float(oof[s["outcome"] == k].mean()) if (s["outcome"] == k).any() else float("nan"),
         "outside": int((oof[s["outcome"] == k] > OUTSIDE_LIMIT).sum())} for k in ("TP", "FP", "TN", "FN")])
    corr = []
    for name, cls in (("fractured", 1), ("not fractured", 0)):
        member = y == cls
        rho, p, reason = rank_correlation(oof[member], prob[member])
        corr.append({"class": name, "n": int(member.sum()), "rho": rho, "p": p, "reason": reason})
    return OutOfFieldAnalysis(pd.DataFrame(rows), by_outcome, pd.DataFrame(corr), s, float(threshold))


def run_out_of_field(run_dir: str | Path, bins=DEFAULT_BINS) -> OutOfFieldAnalysis:
    """:func:`out_of_field_analysis` on a run's dissected set (notebook 03's samples, with the
    threshold recorded in its meta.json); ``out_of_field`` from the patch manifest when
    samples.csv predates that column."""
    art = load_artifacts(run_dir)
    samples = art.samples
    if "out_of_field" not in samples:
        manifest = read_store(run_dir)[["ct_path", "out_of_field"]]
        samples = samples.merge(manifest, on="ct_path", how="left", validate="one_to_one")
    return out_of_field_analysis(samples, art.meta.get("threshold", 0.5), bins)


def outside_patches(manifest: pd.DataFrame, limit: float = OUTSIDE_LIMIT) -> pd.DataFrame:
    """The manifest's patches more than ``limit`` outside the scan: ``case``, ``level``,
    ``split``, ``out_of_field``, ``end`` (True when it is the most cranial or most caudal
    vertebra of its scan in the manifest: where a real scan truncates). Labelled or not."""
    ends = set()
    for case, group in manifest.groupby("case"):
        order = craniocaudal(group["label"].astype(int).tolist())
        ends |= {(case, order[0]), (case, order[-1])}
    out = manifest[manifest["out_of_field"].astype(float) > limit]
    table = out[["case", "label", "level", "split", "out_of_field"]].reset_index(drop=True)
    table["end"] = [(c, int(lab)) in ends for c, lab in zip(table["case"], table["label"])]
    return table
