"""vfcore.analysis.shortcut against hand-computed cases and an independent Spearman (ranks + numpy)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from vfcore.analysis import shortcut as S
from vfcore.errors import DataValueError


def _samples():
    #                 label prob  out_of_field          outcome (threshold 0.5)
    rows = [(1, 0.9, 0.00),   # TP, bin 0-1 %
            (1, 0.8, 0.05),   # TP, bin 1-10 %
            (1, 0.3, 0.30),   # FN, bin 25-50 %
            (1, 0.2, 0.60),   # FN, bin 50-100 %
            (0, 0.1, 0.00),   # TN, bin 0-1 %
            (0, 0.2, 0.005),  # TN, bin 0-1 %
            (0, 0.6, 0.40),   # FP, bin 25-50 %
            (0, 0.7, 1.00),   # FP, bin 50-100 % (the last bin includes 1)
            (0, 0.4, 0.10)]   # TN, bin 10-25 % (a bin is [low, high))
    return pd.DataFrame(rows, columns=["fracture", "probability", "out_of_field"])


def _spearman(x, y) -> float:
    """Pearson correlation of the ranks (average ranks for ties)."""
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def test_bins_outcomes_and_correlation_by_hand():
    a = S.out_of_field_analysis(_samples())
    t = a.bins.set_index("bin")
    assert list(t.index) == ["0%-1%", "1%-10%", "10%-25%", "25%-50%", "50%-100%"]
    assert t["n"].tolist() == [3, 1, 1, 2, 2]
    assert t["fractured"].tolist() == [1, 1, 0, 1, 1]
    assert t["predicted_fractured"].tolist() == [1, 1, 0, 1, 1]
    assert t["fp"].tolist() == [0, 0, 0, 1, 1] and t["fn"].tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_allclose(t["mean_probability"], [(0.9 + 0.1 + 0.2) / 3, 0.8, 0.4, 0.45, 0.45])
    np.testing.assert_allclose(t["error_rate"], [0, 0, 0, 1, 1])
    o = a.by_outcome.set_index("outcome")
    assert o.loc[["TP", "FP", "TN", "FN"], "n"].tolist() == [2, 2, 3, 2]
    np.testing.assert_allclose(o.loc["FP", "mean_out_of_field"], 0.7)
    assert o.loc["FN", "outside"] == 2 and o.loc["TN", "outside"] == 0     # 0.10 is not > 10 %
    c = a.correlation.set_index("class")
    s = _samples()
    for name, cls in (("fractured", 1), ("not fractured", 0)):
        part = s[s["fracture"] == cls]
        assert c.loc[name, "n"] == len(part)
        np.testing.assert_allclose(c.loc[name, "rho"], _spearman(part["out_of_field"], part["probability"]))
    assert c.loc["fractured", "rho"] == pytest.approx(-1.0)          # more outside, lower P
    assert c.loc["not fractured", "rho"] > 0.8                       # the shortcut


def test_undefined_correlations_say_why_and_bad_input_is_typed():
    s = _samples()
    a = S.out_of_field_analysis(s[s["fracture"] == 0].iloc[:4].assign(out_of_field=0.0))
    c = a.correlation.set_index("class")
    assert np.isnan(c.loc["fractured", "rho"]) and "0 sample" in c.loc["fractured", "reason"]
    assert np.isnan(c.loc["not fractured", "rho"]) and "out_of_field is the same" in c.loc["not fractured", "reason"]
    assert a.bins["n"].sum() == 4 and np.isnan(a.bins["mean_probability"].iloc[-1])
    with pytest.raises(DataValueError, match="out_of_field"):
        S.out_of_field_analysis(s.drop(columns="out_of_field"))
    with pytest.raises(DataValueError, match="bins"):
        S.out_of_field_analysis(s, bins=(0.0, 0.5))


def test_outside_patches_tells_end_vertebrae_from_the_others():
    manifest = pd.DataFrame({
        "case": ["a", "a", "a", "b", "b", "b"], "label": [21, 19, 20, 20, 19, 28],
        "level": ["L2", "T12", "L1", "L1", "T12", "T13"], "split": ["test"] * 6,
        "out_of_field": [0.3, 0.2, 0.0, 0.5, 0.05, 0.11]})
    t = S.outside_patches(manifest)
    assert list(zip(t["case"], t["level"], t["end"])) == [("a", "L2", True), ("a", "T12", True),
                                                         ("b", "L1", True), ("b", "T13", False)]
