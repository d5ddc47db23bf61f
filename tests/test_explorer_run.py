"""The explorer on a real (small) run folder: what it reads must agree with the dissection.

The run is ``tiny_run`` (phantom -> patches -> small preset -> dissection, built once per
session). References: ``dissection/samples.csv`` and ``stats.npz`` written by the dissection
pass (r_k there comes from the pass's top-m buffer, not from the explorer's direct
computation), and the NIfTI export of notebook 04 (``vfcore.dissect.write_nifti_exemplar``
in the scan's world frame) read back through the upload path.
"""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from explorer_reference import parse_readout, parse_status
from tiny_run import tiny_run  # noqa: F401  (fixture: a small real run folder)
from vfcore import dissect as dx
from vfcore.errors import VfcoreError
from vfcore.explorer import Explorer, RunData, explore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tiny_run):  # noqa: F811
    return RunData.from_run(tiny_run)


def test_sample_list_is_the_dissected_split(tiny_run, data):  # noqa: F811
    samples = pd.read_csv(tiny_run / "dissection" / "samples.csv", dtype={"case": str, "level": str})
    app = Explorer(data)
    assert [v for _, v in app.sample_select.options] == list(range(len(samples)))
    for (label, i), (_, row) in zip(app.sample_select.options, samples.iterrows()):
        assert label.startswith(f"{row['case']} {row['level']} ·") and label.endswith(f"· {row['outcome']}")
        assert f"p = {row['probability']:.2f}" in label
    counts = samples["outcome"].value_counts()
    assert [lab for lab, _ in app.filter.options][1:] == [f"{o} ({int(counts.get(o, 0))})"
                                                          for o in ("TP", "FP", "TN", "FN")]
    ranking = pd.read_csv(tiny_run / "dissection" / "ranking_tp.csv")
    assert list(data.rank[ranking["unit"]]) == list(range(1, len(ranking) + 1))
    with np.load(tiny_run / "dissection" / "thresholds.npz") as t:
        np.testing.assert_array_equal(data.thresholds, t["T"].astype(np.float64))


def test_relevance_probability_and_masks_match_the_dissection_pass(tiny_run, data):  # noqa: F811
    with np.load(tiny_run / "dissection" / "stats.npz") as s:
        r, prob, mask_size, peak = s["r"], s["probability"], s["mask_size"], s["max"]
    grid = json.loads((tiny_run / "dissection" / "meta.json").read_text())["spatial_shape"][0]
    block = (data.field[0].stop - data.field[0].start) // grid  # patch voxels per feature voxel
    # T_k is itself an activation value (an order statistic): a unit whose peak lies within float
    # noise of T_k can flip M_k between a batched pass and a single-sample pass (convolution
    # kernels round differently per batch size). Those units are compared nowhere else.
    at_threshold = np.abs(peak - data.thresholds[None, :]) <= 1e-4 * np.maximum(1.0, np.abs(peak))
    for i in range(len(r)):
        a = data.analyse_sample(i)
        keep = ~at_threshold[i]
        np.testing.assert_allclose(a.relevance[keep], r[i][keep], rtol=1e-4, atol=1e-6)
        assert a.probability == pytest.approx(float(prob[i]), abs=1e-5)
        for k in a.top:  # M_k on the patch: |M_k| feature voxels, each a block^3 cube
            if keep[k]:
                assert int(a.maps[k].mask.sum()) == int(mask_size[i, k]) * block ** 3


def test_upload_of_an_exported_nifti_gives_the_same_analysis(tiny_run, data, tmp_path):  # noqa: F811
    """Notebook 04 exports exemplar patches as NIfTI in the scan's world frame; uploading one
    must give back the stored patch (reoriented to (I, P, L)) and the same units."""
    samples = data.samples.table
    i = int(samples.index[-1])
    patch = data.samples.load(i)
    affine = dx.geometry.patch_world_affine(tiny_run, samples.loc[i, "case"], int(samples.loc[i, "label"]))
    paths = dx.geometry.write_nifti_exemplar(tmp_path, "x", patch, np.zeros(patch.shape, np.float32), 1.0, affine)
    app = Explorer(data)
    app.select_sample(i)
    expected_top = list(app.analysis.top)
    raw = paths["ct"].read_bytes()
    app.load_upload("exported_ct.nii.gz", raw)
    assert app.analysis.name == "upload exported_ct.nii.gz", app.status_text
    np.testing.assert_array_equal(app.analysis.patch, patch)
    assert app.analysis.top == expected_top
    app.load_upload("exported_ct.nii", gzip.decompress(raw))
    np.testing.assert_array_equal(app.analysis.patch, patch)
    k, view, s = parse_readout(app)
    assert parse_status(app) == (k, view, s) and k == expected_top[0]


def _partial_run(src, dst, parts):
    """A run folder holding only some stages (links to the tiny run's files)."""
    dst.mkdir()
    for part in parts:
        if part == "dissection":
            shutil.copytree(src / part, dst / part)
        else:
            (dst / part).symlink_to(src / part, target_is_directory=True)
    return dst


@pytest.mark.parametrize("parts, notebook", [
    ((), "01_preprocessing"),
    (("patches",), "02_training"),
    (("patches", "model"), "03_quantile_thresholding"),
])
def test_missing_stages_name_their_notebook(tiny_run, tmp_path, parts, notebook):  # noqa: F811
    app = explore(_partial_run(tiny_run, tmp_path / "run", parts))
    assert f"notebooks/{notebook}.ipynb" in app.status_text, app.status_text
    assert app.analysis is None and app.slider.disabled
    app.select_sample(0)  # a call from the notebook: a message, no exception
    assert app.analysis is None and "no run data" in app.status_text


def test_stale_dissection_is_a_message(tiny_run, tmp_path):  # noqa: F811
    run = _partial_run(tiny_run, tmp_path / "run", ("patches", "model", "dissection"))
    meta_path = run / "dissection" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["checkpoint_sha256"] = "0" * 64  # made with another checkpoint
    meta_path.write_text(json.dumps(meta))
    app = explore(run)
    assert "stale" in app.status_text and "03_quantile_thresholding" in app.status_text, app.status_text
    assert app.analysis is None


@pytest.mark.parametrize("name, damage", [
    ("thresholds.npz", "truncate"),
    ("stats.npz", "truncate"),
    ("tail.npz", "zero"),
    ("samples.csv", "binary"),
])
def test_damaged_dissection_artifact_is_a_message_naming_it(tiny_run, tmp_path, name, damage):  # noqa: F811
    """Issue 13: a truncated thresholds.npz (or another damaged artifact) must not escape
    explore() as BadZipFile: the status line names the file, nothing is raised."""
    run = _partial_run(tiny_run, tmp_path / "run", ("patches", "model", "dissection"))
    path = run / "dissection" / name
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "zero":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x00\xff" * 50 + raw[:40])
    app = explore(run)  # never raises
    assert app.analysis is None and app.slider.disabled, app.status_text
    assert name in app.status_text, app.status_text
    assert "BadZipFile" not in app.status_text or "damaged" in app.status_text
    with pytest.raises(VfcoreError):  # the typed error behind the message
        RunData.from_run(run)


def test_explorer_shows_the_exemplars_notebook_04_exported(tiny_run, tmp_path):  # noqa: F811
    """The explorer's exemplars of a unit are exemplars.json's list (same subset, same order),
    and that list is, independently, the unit's fractured samples by r_k from stats.npz."""
    run = _partial_run(tiny_run, tmp_path / "run", ("patches", "model", "dissection"))
    from vfcore.export import export_units

    art = export_units(run, top=3, top_fp=1, k=25, nifti_top=0, progress=False)
    data = RunData.from_run(run)
    assert data.exemplar_source == "exported"
    samples = pd.read_csv(run / "dissection" / "samples.csv")
    with np.load(run / "dissection" / "stats.npz") as s:
        r = s["r"]
    tp_units = [int(u) for u in art.units[art.units.role == "tp"].unit]
    assert tp_units
    for u in tp_units:
        exported = art.exemplar_list(u, "positive")
        assert data.exemplars[u] == exported
        ref = [i for i in np.argsort(-r[:, u], kind="stable")
               if samples.fracture[i] == 1 and r[i, u] > 0][:25]
        assert exported == [int(i) for i in ref]
        assert data.exemplar_subset(u) == "ground-truth fractures"
    app = Explorer(data)
    app.select_sample(int(samples.index[samples.fracture == 1][0]))
    k = next((u for u in app.analysis.top if data.exemplars[u]), None)
    if k is not None:
        app.select_unit(k)
        names = [f"{samples.case[i]} {samples.level[i]}" for i in data.exemplars[k][:5]]
        assert [c.splitlines()[0] for c in app.exemplar_captions] == names
        assert "ground-truth fractures" in app.exemplar_header.value
