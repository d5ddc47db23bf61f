"""The ``vfcore`` command line: every stage as a command, with exit codes that tell the truth.

A tiny run made only through the commands (phantom of 6 scans -> ``vfcore patches`` ->
``vfcore train`` for 1 epoch -> ``vfcore dissect``), then the failure paths: failing scans
(exit 1, one line each), a grade table that matches no scan (a warning), a notebook that
raises (its own error and cell, exit 1), bad values (one line, exit 2).
References are independent of the commands: the files they must have written, read here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from store_helpers import run_cli

PROJECT = Path(__file__).resolve().parents[1]
N_SCANS = 6


def small_root(folder: Path, n_scans: int = 2) -> Path:
    """A phantom VerSe-layout root (with its fracture_grades.tsv)."""
    from vfcore.phantom import write_phantom_root

    return write_phantom_root(folder, n_scans=n_scans, seed=0, prevalence=0.4, workers=1,
                              progress=False)


@pytest.fixture(scope="module")
def root2(tmp_path_factory) -> Path:
    return small_root(tmp_path_factory.mktemp("root2") / "data")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> dict:
    """The tiny run, built by the commands; the output of each command is kept."""
    import torch

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("cli") / "run"
    data = small_root(run / "data", N_SCANS)
    out = {"run": run, "data": data}
    out["patches"] = run_cli("patches", data, run, "--quiet")
    out["train"] = run_cli("train", run, "--epochs", 1, "--augment", "none", "--device", "cpu",
                           "--quiet")
    out["dissect"] = run_cli("dissect", run, "--device", "cpu", "--q", 0.01, "--top", 2,
                             "--top-fp", 1, "--quiet")
    return out


def test_patches_command(cli_run):
    code, out, err = cli_run["patches"]
    run = cli_run["run"]
    assert code == 0, err
    manifest = pd.read_csv(run / "patches" / "manifest.csv")
    assert manifest["case"].nunique() == N_SCANS
    assert f"{len(manifest)} vertebrae from {N_SCANS} of {N_SCANS} scans" in out
    assert str(run / "patches" / "manifest.csv") in out
    assert "fracture_grades.tsv" in out  # the grade table found in the root is named
    assert err == ""


def test_train_command(cli_run):
    code, out, err = cli_run["train"]
    run = cli_run["run"]
    assert code == 0, err
    assert (run / "model" / "best.pt").is_file()
    assert str(run / "model" / "best.pt") in out and str(run / "model" / "metrics.json") in out
    history = pd.read_csv(run / "model" / "seed0" / "history.csv")
    assert len(history) == 1  # --epochs 1
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    assert metrics["seeds"] == [0] and metrics["preset"] == "small"


def test_dissect_command(cli_run):
    code, out, err = cli_run["dissect"]
    run = cli_run["run"]
    assert code == 0, err
    meta = json.loads((run / "dissection" / "meta.json").read_text())
    assert meta["q_tail"] == 0.01 and meta["split"] == "test"
    assert str(run / "dissection") in out
    assert "exported" in out and (run / "dissection" / "units.csv").is_file()


def test_dissect_unknown_layer_is_one_line(cli_run):
    code, out, err = run_cli("dissect", cli_run["run"], "--layer", "no_such_layer",
                             "--device", "cpu", "--no-export", "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vfcore: error:")
    assert "no_such_layer" in err and "Traceback" not in err


def test_train_unknown_preset_and_augmentation(cli_run):
    for option, value in (("--preset", "huge"), ("--augment", "heavy")):
        code, out, err = run_cli("train", cli_run["run"], option, value)
        assert code == 2
        assert err.count("\n") == 1 and value in err and option in err


def test_patches_exit_1_when_a_scan_fails(root2, tmp_path):
    """Issue 13, case 5: exit 1 after one line per failed scan; the others are in the store."""
    root = tmp_path / "data"
    shutil.copytree(root2, root)
    cts = sorted(root.rglob("*_ct.nii.gz"))
    cts[0].write_bytes(cts[0].read_bytes()[:300])
    run = tmp_path / "run"
    code, out, err = run_cli("patches", root, run, "--quiet")
    assert code == 1
    failures = [ln for ln in err.splitlines() if ln.startswith("vfcore: failed:")]
    assert len(failures) == 1 and cts[0].name in failures[0]
    assert "1 of 2 scans failed" in err
    manifest = pd.read_csv(run / "patches" / "manifest.csv")
    assert manifest["case"].nunique() == 1
    report = json.loads((run / "patches" / "report.json").read_text())
    assert len(report["failed"]) == 1


def test_patches_grades_option_and_a_table_that_matches_no_scan(root2, tmp_path):
    """Issue 13, case 7 / issue 14, item 3: --grades TABLE is used; a table whose case ids
    match no scan gives a warning (stderr and report.json) and an unlabelled store."""
    table = tmp_path / "other_grades.tsv"
    pd.DataFrame({"case": ["sub-elsewhere01", "sub-elsewhere02"], "label": [20, 21],
                  "grade": [0, 2]}).to_csv(table, sep="\t", index=False)
    run = tmp_path / "run"
    code, out, err = run_cli("patches", root2, run, "--grades", table, "--quiet")
    assert code == 0
    assert "vfcore: warning:" in err and "matches a scan" in err and str(table) in err
    report = json.loads((run / "patches" / "report.json").read_text())
    assert report["grade_table"]["source"] == str(table)
    assert report["grade_table"]["matched_cases"] == 0 and report["grade_table"]["warning"]
    manifest = pd.read_csv(run / "patches" / "manifest.csv", keep_default_na=False)
    assert (manifest["fracture"] == "").all() and set(manifest["reason"]) == {"not graded"}

    # the same table naming the root's cases labels them
    grades = pd.read_csv(root2 / "fracture_grades.tsv", sep="\t")
    grades.to_csv(table, sep="\t", index=False)
    code, out, err = run_cli("patches", root2, tmp_path / "run2", "--grades", table, "--quiet")
    assert code == 0 and "warning" not in err
    manifest = pd.read_csv(tmp_path / "run2" / "patches" / "manifest.csv", keep_default_na=False)
    assert (manifest["fracture"] != "").any()


def test_run_notebooks_surfaces_the_notebooks_own_error(tmp_path, monkeypatch):
    """Issue 13, case 5: the notebook's exception, message and cell, not papermill's traceback;
    exit 1; the executed copy up to that cell is kept."""
    from vfcore import notebooks

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('RUN_DIR = "x"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from vfcore.run import RunFolder\n"
                                          "RunFolder(RUN_DIR).require('checkpoint')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    path = tmp_path / "nbs" / "01_failing.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    monkeypatch.setattr(notebooks, "series", lambda *_: [path])
    monkeypatch.setenv("PYTHONPATH", str(PROJECT))
    run = tmp_path / "run"
    code, out, err = run_cli("run-notebooks", "--run", run)
    assert code == 1
    assert err.count("\n") == 1, err
    assert "MissingArtifactError" in err and "`from vfcore.run import RunFolder`" in err
    assert "notebooks/02_training.ipynb" in err  # the notebook's own message
    assert str(run / "notebooks" / "01_failing.ipynb") in err
    assert (run / "notebooks" / "01_failing.ipynb").is_file()
    summary = json.loads((run / "notebooks" / "series.json").read_text())
    assert "MissingArtifactError" in summary["failed"]["error"]


def test_run_notebooks_unknown_only_lists_the_stems(tmp_path):
    code, out, err = run_cli("run-notebooks", "--run", tmp_path / "run", "--only", "07_nothing")
    assert code == 2
    assert "07_nothing" in err and "01_preprocessing" in err and "05_concept_explorer" in err
    assert not (tmp_path / "run").exists()


def test_python_m_vfcore_exit_status_and_one_line(tmp_path):
    """The real entry point: the status reaches the shell and no traceback is printed."""
    proc = subprocess.run([sys.executable, "-m", "vfcore", "patches", tmp_path / "missing",
                           tmp_path / "run"], capture_output=True, text=True, cwd=PROJECT,
                          env={"PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "missing") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_phantom_command_passes_the_rates_to_each_scan(tmp_path):
    """`vfcore phantom --prevalence/--dissect-prevalence/--dissect-confounders` reach the scans'
    drawing parameters (their truth JSON), and the dissection-only scan is pinned to 'dissect'."""
    import json

    root = tmp_path / "data"
    code, out, err = run_cli("phantom", root, "--scans", 1, "--prevalence", 0.3, "--dissect-scans", 1,
                             "--dissect-prevalence", 0.6, "--dissect-confounders", 2.5)
    assert code == 0, err
    by_index = {i: json.loads((root / "derivatives" / f"sub-phantom{i:03d}" /
                               f"sub-phantom{i:03d}_phantom-truth.json").read_text())["params"]
                for i in (0, 1)}
    assert by_index[0]["prevalence"] == 0.3 and by_index[0]["confounders"] == 1.0
    assert by_index[1]["prevalence"] == 0.6 and by_index[1]["confounders"] == 2.5
    table = (root / "splits.tsv").read_text().split()
    assert "sub-phantom001" in table and "dissect" in table and "sub-phantom000" not in table
    code, out, err = run_cli("phantom", tmp_path / "bad", "--scans", 1, "--prevalence", 7)
    assert code == 2 and "prevalence" in err and "7" in err


@pytest.mark.parametrize("option, value", [("--threshold", "1.5"), ("--threshold", "nan"), ("--q", "0")])
def test_dissect_fractions_outside_0_1_are_usage_errors(tmp_path, option, value):
    code, out, err = run_cli("dissect", tmp_path / "run", option, value)
    assert code == 2 and option in err and "between 0 and 1" in err
