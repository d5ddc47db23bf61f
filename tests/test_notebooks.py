"""Every notebook runs end to end on the embedded phantom, in order, through papermill.

This is the README's main command (``vfcore run-notebooks --quick``) on a fresh run folder.
The floors asserted here catch a broken pipeline, not a slightly weaker model.
"""
from __future__ import annotations

import json

import nbformat
import pytest

from vfcore.notebooks import run_notebooks


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    run = tmp_path_factory.mktemp("series") / "run"
    return run, run_notebooks(run, quick=True)


@pytest.mark.slow
def test_series_runs_end_to_end(executed):
    run, notebooks = executed
    assert [p.stem for p in notebooks] == [
        "01_preprocessing", "02_training", "03_quantile_thresholding",
        "04_correlation_ranking", "05_concept_explorer",
    ]
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, f"{path.name} shows no static figure"


#: A floor that catches a broken pipeline (shuffled labels, inputs that lost the vertebra: AUC
#: about 0.5), not a weaker model: the quick run's test split holds only about 7 fractures.
AUC_FLOOR = 0.65


@pytest.mark.slow
def test_small_preset_learns(executed):
    """Issue 4: the CI run of notebook 02 learns: test AUC well above chance."""
    run, _ = executed
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    auc = metrics["test"]["auc"]
    print(f"small preset, quick run: test AUC {auc:.3f} on {metrics['n_test']} vertebrae "
          f"({metrics['n_test_fractured']} fractured)")
    assert auc >= AUC_FLOOR, f"test AUC {auc:.3f} < {AUC_FLOOR}: the pipeline is broken"
