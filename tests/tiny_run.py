"""A small but real run folder for the explorer's tests: phantom -> patches -> the small preset
trained for a few epochs -> dissection of the test split. Built once per pytest session
(about a minute or two on 2 CPU cores) and shared by every test module that imports the
``tiny_run`` fixture.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Phantom size and fracture prevalence: enough fractures that the test split has positives.
N_SCANS = 6
PREVALENCE = 0.4
EPOCHS = 3

_BUILT: dict[str, Path] = {}


def build_tiny_run(run_dir: Path) -> Path:
    """Write the tiny run into ``run_dir`` (and its phantom into ``run_dir/data``)."""
    import torch

    from vfcore.dissect import dissect_run
    from vfcore.patches import extract_patches
    from vfcore.phantom import write_phantom_root
    from vfcore.train import fit, predict_split

    torch.manual_seed(0)
    root = write_phantom_root(run_dir / "data", n_scans=N_SCANS, seed=0, prevalence=PREVALENCE,
                              workers=1, progress=False)
    extract_patches(root, run_dir, workers=1, seed=0, progress=False)
    fit(run_dir, preset="small", epochs=EPOCHS, seeds=[0], augment="light", progress=False)
    # a few epochs on six scans call few vertebrae fractured: dissect at the lower quartile of
    # the test probabilities, and no higher than the most probable fractured and healthy
    # vertebra, so that both rankings (true and false positives) exist whatever the few epochs
    # learnt (on the Xeon of 2026-12-08 the quartile alone left the 3 fractures below it)
    rows = predict_split(run_dir)
    probability, fractured = rows["probability"], rows["fracture"].astype(int) == 1
    threshold = min(float(probability.quantile(0.25)), float(probability[fractured].max()),
                    float(probability[~fractured].max()))
    dissect_run(run_dir, split="test", threshold=threshold, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny run (built once per session). While developing, ``VFCORE_TINY_RUN=<folder>``
    reuses a run built earlier with :func:`build_tiny_run` (its dissection must be complete)."""
    reuse = os.environ.get("VFCORE_TINY_RUN")
    from vfcore.run import RunFolder

    if reuse and RunFolder(reuse).has("dissection_meta"):
        return Path(reuse)
    if "run" not in _BUILT:
        _BUILT["run"] = build_tiny_run(tmp_path_factory.mktemp("tiny") / "run")
    return _BUILT["run"]
