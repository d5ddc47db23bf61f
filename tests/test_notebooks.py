"""Every notebook runs end to end on the embedded phantom, in order, through papermill.

This is the README's main command (``vfcore run-notebooks --run runs/phantom --quick``), run
once per session by the ``readme_run`` fixture (fresh in CI's clean clone).
The floors asserted here catch a broken pipeline, not a slightly weaker model.
"""
from __future__ import annotations

import json

import nbformat
import pytest

from vfcore.notebooks import run_notebooks


@pytest.fixture(scope="module")
def executed(readme_run):
    """The README command's run (tests/conftest.py), shared with the browser test."""
    return readme_run


@pytest.mark.slow
def test_series_runs_end_to_end(executed):
    run, notebooks = executed
    assert [p.stem for p in notebooks] == [
        "01_preprocessing", "02_training", "03_quantile_thresholding",
        "04_correlation_ranking", "05_concept_explorer", "06_concept_alignment", "07_causal_checks",
        "08_concept_directions",
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


#: The earlier steps a badge-opened notebook builds, at test size (the quick settings take
#: about 12 minutes on 2 cores; what is tested here is that the notebook builds them at all).
TINY_PREPARE = {"01_preprocessing": {"N_SCANS": 5, "N_DISSECT_SCANS": 2, "WORKERS": 1},
                "02_training": {"PRESET": "small", "EPOCHS": 2, "SEEDS": [0], "PATIENCE": 2,
                                "AUGMENT": "light"},
                "04_correlation_ranking": {"TOP_UNITS": 3, "TOP_FP_UNITS": 2}}


def test_missing_steps_follow_the_artifacts(tmp_path):
    from vfcore.prerequisites import missing_steps
    assert missing_steps(tmp_path, "preprocessing") == []
    assert missing_steps(tmp_path, "02_training") == ["preprocessing"]
    assert missing_steps(tmp_path, "explorer") == ["preprocessing", "training", "ranking"]
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "manifest.csv").write_text("")
    assert missing_steps(tmp_path, "thresholds") == ["training"]
    with pytest.raises(ValueError, match="notebook or stage must be one of"):
        missing_steps(tmp_path, "09_nothing")


def _printed_without_errors(path, stem: str) -> str:
    """An executed notebook's printed text, after checking that no cell raised."""
    nb = nbformat.read(path, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{stem}: {errors[0]['ename']}: {errors[0]['evalue']}"
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


#: Notebooks 05-08 need the same earlier steps (vfcore.prerequisites.NEEDS, checked below): 05 builds
#: them from an empty folder; 06-08 are opened on a copy of a folder holding only those steps (the
#: build is the same code path; each build at test size costs about two minutes of CI).
SAME_NEEDS = ["06_concept_alignment", "07_causal_checks", "08_concept_directions"]


def test_notebooks_05_to_08_need_the_same_earlier_steps(tmp_path):
    from vfcore.prerequisites import NEEDS, _stage_key, missing_steps
    assert len({NEEDS[_stage_key(s)] for s in ["05_concept_explorer", *SAME_NEEDS]}) == 1
    for stem in SAME_NEEDS:
        assert missing_steps(tmp_path, stem) == ["preprocessing", "training", "ranking"]


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["02_training", "03_quantile_thresholding", "04_correlation_ranking",
                                  "05_concept_explorer"])
def test_a_notebook_opened_alone_builds_its_earlier_steps(tmp_path, stem):
    """A Colab/Binder badge opens one notebook in an empty run folder: it builds the earlier
    notebooks' outputs itself (at test size here) and runs to the end."""
    run = tmp_path / "fresh"
    own = {"PREPARE": TINY_PREPARE, **TINY_PREPARE.get(stem, {})}   # 02 trains: at test size too
    out = run_notebooks(run, only=[stem], parameters={stem: own})
    text = _printed_without_errors(out[0], stem)
    assert f"run folder: {run.resolve()}" in text
    assert "building it with the settings given" in text
    assert (run / "patches" / "manifest.csv").is_file()


@pytest.fixture(scope="module")
def earlier_steps_only(tmp_path_factory):
    """A run folder holding only what notebooks 05-08 read (built at test size, as opened alone)."""
    from vfcore.prerequisites import prepare
    run = tmp_path_factory.mktemp("earlier") / "run"
    prepare(run, SAME_NEEDS[0], quick=TINY_PREPARE)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stem", SAME_NEEDS)
def test_a_notebook_opened_on_its_earlier_steps_runs_to_the_end(earlier_steps_only, tmp_path, stem):
    """06-08 opened alone, on a copy of a folder with just their earlier steps: they run to the end."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(earlier_steps_only, run)
    out = run_notebooks(run, only=[stem], parameters={stem: {"PREPARE": TINY_PREPARE}})
    text = _printed_without_errors(out[0], stem)
    assert f"run folder: {run.resolve()}" in text and "building it" not in text
