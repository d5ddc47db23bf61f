"""The concept explorer, kernel side: what the widgets show after the student's actions.

References are independent of the explorer's code: activation maps upsampled with
``scipy.ndimage.zoom`` (linear, grid mode) from a numpy "network" (``explorer_synthetic``),
r_k = sum(M_k * A_k) in numpy, the expected picture written out pixel by pixel from the
patch slice, the HU window and the mask, and decoded from the widget's PNG bytes.
"""
from __future__ import annotations

import datetime
import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest

import explorer_synthetic as syn
from explorer_reference import (check_image, parse_readout, parse_status, ref_best_slice, ref_slice,
                                ref_unit)
from vfcore import explorer as ex
from vfcore.constants import DISPLAY_WINDOW_HU
from vfcore.errors import InputError
from vfcore.explorer import Explorer
from vfcore.viz import units as vu


def ref_maps(patch: np.ndarray, T: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """unit -> (activation, mask) on the patch for one synthetic patch (``ref_unit``)."""
    A, _ = syn.activations(patch[None])
    return {k: ref_unit(A[0, k], float(T[k])) for k in range(syn.K)}


@pytest.fixture
def setup(tmp_path):
    data, patches = syn.make_run_data(tmp_path)
    app = Explorer(data)
    return app, data, patches


# ---- pure pieces --------------------------------------------------------------------------

def test_views_follow_the_patch_axes():
    vol = np.arange(96 ** 3).reshape(96, 96, 96)
    assert np.array_equal(vu.take_slice(vol, "sagittal", 7), vol[:, :, 7])   # rows I, columns P
    assert np.array_equal(vu.take_slice(vol, "coronal", 7), vol[:, 7, :])    # rows I, columns L
    assert np.array_equal(vu.take_slice(vol, "axial", 7), vol[7])            # rows P, columns L


def test_mask_outline_hand_case():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    expected = m.copy()
    expected[2, 2] = False
    assert np.array_equal(vu.mask_outline(m), expected)
    m2 = np.ones((3, 3), bool)  # the image border counts as outside
    assert vu.mask_outline(m2).sum() == 8


# ---- the sample and its units -----------------------------------------------------------

def test_top_units_by_relevance(setup):
    app, data, patches = setup
    app.select_sample(3)
    A, prob = syn.activations(patches[3][None])
    T = data.thresholds
    r = np.array([np.sum(np.where(A[0, k] > T[k], A[0, k], 0)) for k in range(syn.K)])  # Eq. 2
    order = sorted(range(syn.K), key=lambda k: (-r[k], k))[:10]
    assert app.analysis.top == order
    np.testing.assert_allclose(app.analysis.relevance, r, rtol=1e-5)
    assert app.analysis.probability == pytest.approx(prob[0])
    # the list shows r_k order and each unit's c_k rank (1 = highest c_k; NaN c_k last)
    c = np.where(np.isnan(data.c_k), -np.inf, data.c_k)
    labels = [lab for lab, _ in app.unit_select.options]
    for pos, (lab, k) in enumerate(zip(labels, order), start=1):
        expected_rank = 1 + int(np.sum(c > c[k])) + int(np.sum((c == c[k]) & (np.arange(syn.K) < k)))
        assert lab.startswith(f"{pos}. unit {k} ") and f"c_k rank {expected_rank}" in lab, lab
    assert app.unit == order[0]


def test_unit_table_says_where_each_mask_lies(setup):
    app, data, patches = setup
    app.select_sample(9)
    maps = ref_maps(patches[9], data.thresholds)
    vert = data.meta["vertebrae"][9]
    table = app.unit_table()
    assert list(table["unit"]) == app.analysis.top
    for _, row in table.iterrows():
        m = maps[row["unit"]][1]
        assert row["mask voxels"] == m.sum()
        if m.sum():
            assert row["target"] == pytest.approx((vert[m] == 21).mean(), abs=0.01)
            assert row["adjacent"] == pytest.approx((vert[m] == 20).mean(), abs=0.01)
            assert row["outside"] == pytest.approx((vert[m] == 0).mean(), abs=0.01)
    assert table[["adjacent"]].to_numpy().max() > 0, "the synthetic case has a unit on the neighbour"
    k = app.unit
    assert f"unit {k}</b> on this sample" in app.unit_info.value and "adjacent vertebrae" in app.unit_info.value


def test_default_sample_is_most_confident_true_positive(tmp_path):
    data, _ = syn.make_run_data(tmp_path)
    t = data.samples.table
    tp = t[(t.fracture == 1) & (t.probability >= 0.5)]
    assert data.pick("TP") == tp.probability.idxmax()
    fp = t[(t.fracture == 0) & (t.probability >= 0.5)]
    assert data.pick("FP") == (fp.probability.idxmax() if len(fp) else None)


def test_slider_step_shows_that_slice_of_that_unit(setup):
    app, data, patches = setup
    app.select_sample(6)
    maps = ref_maps(patches[6], data.thresholds)
    k = app.unit
    T = float(data.thresholds[k])
    act, mask = maps[k]
    assert app.index == ref_best_slice(act, mask, "sagittal")
    before = app.image.value
    # a neighbouring slice where the unit's mask is still visible
    target = max((app.index + 1, app.index - 1), key=lambda j: ref_slice(mask, "sagittal", j).sum())
    app.slider.value = target  # as the student would
    s = app.index
    assert s == app.slider.value == target
    check_image(app.image.value, patches[6], act, mask, T, "sagittal", s)
    assert app.image.value != before
    assert parse_readout(app) == (k, "sagittal", s) == parse_status(app)
    n_on = int(ref_slice(mask, "sagittal", s).sum())
    assert n_on > 0
    assert f"M_k: {n_on} voxels" in app.readout_text


def test_choosing_another_unit_jumps_to_its_best_slice(setup):
    app, data, patches = setup
    app.select_sample(9)
    maps = ref_maps(patches[9], data.thresholds)
    other = app.analysis.top[2]
    app.unit_select.value = other
    T = float(data.thresholds[other])
    s = ref_best_slice(*maps[other], "sagittal")
    assert (app.unit, app.index) == (other, s)
    check_image(app.image.value, patches[9], *maps[other], T, "sagittal", s)
    assert parse_readout(app) == (other, "sagittal", s) == parse_status(app)
    # with "keep slice", the slice stays where the student put it
    app.keep_slice.value = True
    app.slider.value = s + 1
    app.unit_select.value = app.analysis.top[4]
    assert app.index == s + 1
    check_image(app.image.value, patches[9], *maps[app.analysis.top[4]],
                float(data.thresholds[app.analysis.top[4]]), "sagittal", s + 1, min_on=0)


@pytest.mark.parametrize("view", ["coronal", "axial"])
def test_view_axis_and_modes(setup, view):
    app, data, patches = setup
    app.select_sample(9)
    maps = ref_maps(patches[9], data.thresholds)
    k = app.unit
    T = float(data.thresholds[k])
    app.view_select.value = view
    assert app.slider.max == 95
    s = ref_best_slice(*maps[k], view)
    assert app.index == s
    check_image(app.image.value, patches[9], *maps[k], T, view, s)
    for mode in ("contour", "off"):
        app.mode_select.value = mode
        check_image(app.image.value, patches[9], *maps[k], T, view, s, mode, min_on=10)
    app.slider.value = s - 1
    check_image(app.image.value, patches[9], *maps[k], T, view, s - 1, "off", min_on=0)
    assert parse_readout(app) == (k, view, s - 1) == parse_status(app)


def test_filters_list_only_that_outcome(setup):
    app, data, _ = setup
    t = data.samples.table
    for o in ("TP", "FP", "TN", "FN"):
        app.filter.value = o
        values = [v for _, v in app.sample_select.options]
        assert values == list(t.index[t.outcome == o])
        assert all(f"· {o}" in lab for lab, _ in app.sample_select.options)
    app.filter.value = "all"
    assert len(app.sample_select.options) == syn.N
    # choosing from the list loads that sample
    app.sample_select.value = 4
    assert app.analysis.name == "sub-syn004 T11"
    assert "sub-syn004 T11" in app.prediction.value


def test_exemplars_are_the_units_top_samples(setup):
    app, data, patches = setup
    app.select_sample(2)
    k = app.unit
    shown = data.exemplar_maps(k)
    assert [i for i, _, _ in shown] == data.exemplars[k][:5]
    for i, patch, umap in shown:
        act, mask = ref_maps(patches[i], data.thresholds)[k]
        np.testing.assert_allclose(umap.activation, act, atol=1e-5)
        assert np.array_equal(umap.mask, mask) and mask.any()
    t = data.samples.table
    captions = [f"{t.case[i]} {t.level[i]}" for i in data.exemplars[k][:5]]
    assert [c.splitlines()[0] for c in app.exemplar_captions] == captions
    assert app.exemplar_header.value.startswith(f"unit {k}: 5 exemplar(s)")
    fig = app.static_figure()
    assert fig is not None and len(fig.axes) >= 6


# ---- uploads ------------------------------------------------------------------------------

def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _nifti(a, affine, gz=True) -> bytes:
    raw = nib.Nifti1Image(a, affine).to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def test_upload_npy_and_reoriented_nifti(setup):
    app, data, patches = setup
    p = patches[6].astype(np.float32)
    app.load_upload("v.npy", _npy(p))
    assert app.analysis.name == "upload v.npy" and app.analysis.truth is None
    np.testing.assert_array_equal(app.analysis.patch, p)
    assert "uploaded patch" in app.prediction.value
    top_npy = app.analysis.top
    # the same patch stored in RAS order: array axes (L->R flipped to R, P->A flipped, I->S)
    ras = p[::-1, ::-1, ::-1].transpose(2, 1, 0)  # axes (R, A, S)
    app.load_upload("v.nii.gz", _nifti(ras, np.eye(4)))
    np.testing.assert_array_equal(app.analysis.patch, p)
    assert app.analysis.top == top_npy
    # larger than 96^3: centre crop; between the network input and 96: padded with air
    big = np.pad(p, 4, constant_values=-1024)
    app.load_upload("big.npy", _npy(big))
    np.testing.assert_array_equal(app.analysis.patch, p)
    small = p[10:80, 10:80, 10:80]
    app.load_upload("small.npy", _npy(small))
    assert app.analysis.patch.shape == (96, 96, 96)
    np.testing.assert_array_equal(app.analysis.patch[13:83, 13:83, 13:83], small)
    assert np.all(app.analysis.patch[:13] == -1024)


@pytest.mark.parametrize("name, content, message", [
    ("flat.npy", _npy(np.zeros((96, 96), np.float32)), "2D"),
    ("four.npy", _npy(np.zeros((2, 96, 96, 96), np.float32)), "4D"),
    ("tiny.npy", _npy(np.zeros((96, 40, 96), np.float32)), "smaller than the network input"),
    ("nan.npy", _npy(np.full((96, 96, 96), np.nan, np.float32)), "NaN"),
    ("scan.dcm", b"DICM", "not a NIfTI or NumPy file"),
    ("broken.nii.gz", b"\x1f\x8b\x08garbage", "cannot be read"),
    ("text.npy", b"hello", "cannot be read"),
    ("objects.npy", None, "cannot be read"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "")
def test_bad_uploads_leave_the_view_and_say_why(setup, name, content, message):
    app, data, patches = setup
    if content is None:  # a pickled object array: never unpickled
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        content = buf.getvalue()
    app.select_sample(0)
    before = (app.image.value, app.analysis.name, app.readout.value)
    app.load_upload(name, content)
    assert message in app.status_text and name in app.status_text, app.status_text
    assert 'data-level=\'error\'' in app.status.value
    assert (app.image.value, app.analysis.name, app.readout.value) == before
    # the widget path (FileUpload) says the same and is ready for the next file
    app.upload.value = ({"name": name, "content": memoryview(content), "size": len(content),
                         "type": "", "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    assert message in app.status_text
    assert app.upload.value == ()
    app.slider.value = 20  # still working
    assert parse_status(app)[2] == 20


# ---- the concept dictionary ---------------------------------------------------------------

def test_concepts_are_saved_atomically_and_reused(setup, tmp_path):
    app, data, _ = setup
    app.select_sample(1)
    k = app.unit
    app.concept_label.value = "upper endplate"
    app.concept_note.value = "fires on the cranial endplate"
    assert "not saved" in app.status_text
    assert not (tmp_path / "concepts.json").exists()
    app.concept_save.click()
    doc = json.loads((tmp_path / "concepts.json").read_text())
    assert doc["units"] == {str(k): {"label": "upper endplate", "note": "fires on the cranial endplate"}}
    assert doc["checkpoint_sha256"] == "abc123"
    assert not list(tmp_path.glob(".concepts.json*")), "no temporary files left"
    assert "upper endplate" in app.unit_select.options[0][0]
    assert ex.load_concepts(tmp_path) == {k: {"label": "upper endplate", "note": "fires on the cranial endplate"}}
    # another unit, then back: the label is there
    app.unit_select.value = app.analysis.top[1]
    assert app.concept_label.value == ""
    app.unit_select.value = k
    assert app.concept_label.value == "upper endplate"
    # a new explorer on the same run folder reads it
    data2, _ = syn.make_run_data(tmp_path)
    app2 = Explorer(data2)
    app2.select_sample(1)
    assert app2.concept_label.value == "upper endplate"
    assert "upper endplate" in app2.concept_table.value


def test_unreadable_concepts_file_is_kept(tmp_path):
    (tmp_path / "concepts.json").write_text("{not json")
    data, _ = syn.make_run_data(tmp_path)
    app = Explorer(data)
    assert "unreadable" in app.status_text
    app.select_sample(0)
    app.concept_label.value = "x"
    app.save_concepts()
    assert (tmp_path / "concepts.json.unreadable").read_text() == "{not json"
    assert json.loads((tmp_path / "concepts.json").read_text())["units"][str(app.unit)]["label"] == "x"


def test_a_failed_save_keeps_the_labels(tmp_path):
    data, _ = syn.make_run_data(tmp_path)
    (tmp_path / "concepts.json").mkdir()  # the target cannot be replaced by a file
    app = Explorer(data)
    app.select_sample(9)
    app.concept_label.value = "endplate"
    app.concept_save.click()
    assert "could not be written" in app.status_text and "kept" in app.status_text
    assert data.concepts.units == {app.unit: {"label": "endplate", "note": ""}} and data.concepts.dirty
    (tmp_path / "concepts.json").rmdir()
    app.concept_save.click()
    assert json.loads((tmp_path / "concepts.json").read_text())["units"] == {
        str(app.unit): {"label": "endplate", "note": ""}}


def test_concepts_of_another_checkpoint_warn(tmp_path):
    (tmp_path / "concepts.json").write_text(json.dumps(
        {"checkpoint_sha256": "other", "units": {"3": {"label": "a", "note": ""}}}))
    data, _ = syn.make_run_data(tmp_path)
    app = Explorer(data)
    assert "another checkpoint" in app.status_text
    assert data.concepts.units == {3: {"label": "a", "note": ""}}


def test_unknown_sample_and_unit_are_messages(setup):
    app, _, _ = setup
    app.select_sample("sub-nobody L1")
    assert "no sample named" in app.status_text
    app.select_sample(1)
    missing = next(k for k in range(syn.K) if k not in app.analysis.top)
    app.select_unit(missing)
    assert f"unit {missing} is not among" in app.status_text


# ---- the state, without widgets -------------------------------------------------------------

@pytest.fixture
def state(tmp_path, monkeypatch):
    """An ExplorerState over the synthetic run, with ipywidgets made unimportable: the state
    must not need widgets."""
    import sys

    from vfcore.explorer.state import ExplorerState

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    data, patches = syn.make_run_data(tmp_path)
    return ExplorerState(data), data, patches


def test_state_select_sample_and_unit_say_what_to_draw(state):
    st, data, patches = state
    redraw = st.select_sample(9)
    assert redraw.sample and redraw.unit and redraw.exemplars and redraw.partner and redraw.image
    maps = ref_maps(patches[9], data.thresholds)
    A, _ = syn.activations(patches[9][None])
    r = np.array([np.sum(np.where(A[0, k] > data.thresholds[k], A[0, k], 0)) for k in range(syn.K)])
    assert st.analysis.top == sorted(range(syn.K), key=lambda k: (-r[k], k))[:10]
    k = st.unit
    assert k == st.analysis.top[0] and st.index == ref_best_slice(*maps[k], "sagittal")
    check_image(vu.png_bytes(st.image()), patches[9], *maps[k], float(data.thresholds[k]), "sagittal", st.index)
    other = st.analysis.top[3]
    redraw = st.select_unit(other)
    assert (redraw.sample, redraw.unit, redraw.exemplars) == (False, True, True)
    assert (st.unit, st.index) == (other, ref_best_slice(*maps[other], "sagittal"))
    n_on = int(ref_slice(maps[other][1], "sagittal", st.index).sum())
    assert f"unit {other} (r_k #4, " in st.readout() and f"M_k: {n_on} voxels" in st.readout()


def test_state_views_slices_and_bad_input(state):
    st, data, patches = state
    st.select_sample(6)
    maps = ref_maps(patches[6], data.thresholds)
    k = st.unit
    redraw = st.set_view(view="axial")
    assert redraw.exemplars and st.letters == ("A", "P", "R", "L")
    assert st.index == ref_best_slice(*maps[k], "axial")
    assert not st.set_view(index=3).exemplars and st.index == 3
    st.set_view(mode="contour")
    check_image(vu.png_bytes(st.image()), patches[6], *maps[k], float(data.thresholds[k]), "axial", 3,
                "contour", min_on=0)
    before = (st.view, st.index, st.mode)
    for bad in ({"index": 96}, {"view": "oblique"}, {"mode": "glow"}, {"view": "coronal", "index": -1}):
        with pytest.raises(InputError):
            st.set_view(**bad)
        assert (st.view, st.index, st.mode) == before, bad
    st.keep_slice = True
    st.select_unit(st.analysis.top[1])
    assert st.index == 3


def test_state_exemplar_beside_the_sample(state):
    st, data, patches = state
    st.select_sample(2)
    k = st.unit
    assert [i for i, _, _ in st.exemplars()] == data.exemplars[k][:5]
    for pos in (0, 3):
        st.select_exemplar(pos)
        i = data.exemplars[k][pos]
        act, mask = ref_maps(patches[i], data.thresholds)[k]
        s = ref_best_slice(act, mask, "sagittal")
        check_image(vu.png_bytes(st.exemplar_image()), patches[i], act, mask, float(data.thresholds[k]),
                    "sagittal", s)
        assert st.exemplar_caption(pos).splitlines()[0] == f"sub-syn{i:03d} {data.samples.table.level[i]}"
    with pytest.raises(InputError, match="outside"):
        st.select_exemplar(5)
    st.select_unit(st.analysis.top[1])
    assert st.exemplar == 0


def test_widget_shows_the_exemplar_beside_the_sample(setup):
    app, data, patches = setup
    app.select_sample(2)
    k = app.unit
    assert [v for _, v in app.exemplar_select.options] == list(range(5))
    app.exemplar_select.value = 2
    i = data.exemplars[k][2]
    act, mask = ref_maps(patches[i], data.thresholds)[k]
    check_image(app.exemplar_image.value, patches[i], act, mask, float(data.thresholds[k]), "sagittal",
                ref_best_slice(act, mask, "sagittal"))
    assert f"exemplar 3 of 5 of unit {k}" in app.exemplar_readout.value
    app.view_select.value = "coronal"  # the exemplar follows the view
    check_image(app.exemplar_image.value, patches[i], act, mask, float(data.thresholds[k]), "coronal",
                ref_best_slice(act, mask, "coronal"))
    # the image is at least 480 px wide on screen, and a PNG of the view rides with the widget
    assert ex.SCALE * 96 >= 480 and int(app.image.width) >= 480
    bundle = app._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    import base64
    assert vu.decode_png(base64.b64decode(bundle["image/png"])).shape[1] >= 480


# ---- the unit renderer ------------------------------------------------------------------------

def test_unit_rgb_both_is_overlay_plus_outline():
    rng = np.random.default_rng(0)
    ct = rng.normal(300, 400, (12, 12))
    act = rng.random((12, 12))
    mask = np.zeros((12, 12), bool)
    mask[3:8, 2:9] = True
    both = vu.unit_rgb(ct, mask, act, 0.2, 0.9, "both").astype(float)
    grey = np.clip((ct - DISPLAY_WINDOW_HU[0]) / (DISPLAY_WINDOW_HU[1] - DISPLAY_WINDOW_HU[0]), 0, 1) * 255
    edge = np.zeros_like(mask)
    edge[3, 2:9] = edge[7, 2:9] = edge[3:8, 2] = edge[3:8, 8] = True
    assert np.all(both[edge] == [0, 255, 255])
    inner = mask & ~edge
    t = np.clip((act - 0.2) / 0.7, 0, 1)
    expected = 0.5 * grey[..., None] + 0.5 * np.stack([np.full_like(t, 255), 255 * t, 0 * t], -1)
    assert np.abs(both[inner] - expected[inner]).max() <= 0.5 + 1e-9
    assert np.abs(both[~mask] - grey[~mask][:, None]).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("n, grid", [(7, (2, 5)), (25, (5, 5)), (3, (1, 3)), (1, (1, 1)), (11, (3, 5))])
def test_collages_are_sized_to_their_exemplars(n, grid):
    import matplotlib.pyplot as plt

    from vfcore.viz import dissection as vd

    assert vd.collage_grid(n) == grid
    tile = (np.zeros((96, 96)), np.ones((96, 96)), "sub-x L1\nr_k = 1", np.ones((96, 96), bool))
    fig = vd.collage([tile] * n, 0.5, "unit 3: rank 1")
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == grid[0] * grid[1] and len(shown) == n
    assert all(ax.title.get_fontsize() >= 7 for ax in shown)
    plt.close(fig)


# --- uploads: bounded memory whatever a header claims (issue 13) ---------------------------

def _npy_header(shape, descr="<f4") -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _nii_gz_header(shape) -> bytes:
    import gzip
    import nibabel as nib
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    return gzip.compress(hdr.binaryblock + b"\0" * 4)  # header + extension flag, no voxels


@pytest.mark.parametrize("name, content, words", [
    ("bomb.npy", _npy_header((2000, 2000, 2000)), "more than the upload limit"),
    ("short.npy", _npy_header((40, 40, 40)) + b"\0" * 1000, "truncated"),
    ("bomb.nii.gz", _nii_gz_header((1200, 1200, 600)), "limit"),
    ("short.nii.gz", _nii_gz_header((40, 40, 40)), "cannot be read"),
])
def test_upload_refuses_what_a_header_claims_beyond_the_bytes(name, content, words):
    from vfcore.explorer.upload import read_upload
    with pytest.raises(InputError) as err:
        read_upload(name, content, (32, 32, 32))
    assert name in str(err.value) and words in str(err.value)


def test_draft_finding_names_measured_concepts_or_says_none(tmp_path):
    """Issue 12 item 6: the explorer shows the draft finding of the sample beside its units."""
    import re

    from vfcore.explorer import text
    data, _ = syn.make_run_data(tmp_path)
    a = data.analyse_sample(0)
    firing = [int(k) for k in np.argsort(-a.relevance, kind="stable")[:5] if a.relevance[k] > 0]
    assert firing, "the synthetic sample should have firing units"
    plain = text.findings_html(data, a)
    assert "your concept labels" in plain and "no label of yours yet" in plain
    data.measured_concepts = {firing[0]: "superior endplate"}
    measured = text.findings_html(data, a)
    assert "notebook 06" in measured
    assert re.search(rf"Evidence: superior endplate \(unit {firing[0]}\)", measured), measured


def test_measured_concepts_of_an_earlier_network_are_not_used(tmp_path):
    """Notebook 06's table names concepts only for the dissection it was made from: one older
    than dissection/meta.json (the network was retrained and dissected again) is ignored."""
    import os

    from vfcore.explorer.data import _measured_concepts
    from vfcore.run import RunFolder

    run = RunFolder(tmp_path)
    units, meta = run.path("alignment_units"), run.path("dissection_meta")
    units.parent.mkdir(parents=True)
    meta.parent.mkdir(parents=True)
    units.write_text("unit,concept,detector\n3,superior endplate,True\n4,disc above,False\n")
    meta.write_text("{}")
    os.utime(meta, (1_800_000_000, 1_800_000_000))                         # 06 ran on this dissection
    os.utime(units, (1_900_000_000, 1_900_000_000))
    assert _measured_concepts(run) == {3: "superior endplate", 4: None}
    os.utime(meta, (2_000_000_000, 2_000_000_000))                         # dissected again after 06 ran
    os.utime(units, (1_900_000_000, 1_900_000_000))
    assert _measured_concepts(run) is None
    os.utime(units, (2_000_000_100, 2_000_000_100))                        # 06 rerun on it
    assert _measured_concepts(run) == {3: "superior endplate", 4: None}


def test_snapshot_title_keeps_the_prediction_and_the_draft_finding_apart(setup):
    """The widget shows them on two lines (<br>); the snapshot's plain text must not run them together."""
    app, _, _ = setup
    app.sample_select.value = 4
    lines = app.prediction_text.split("\n")
    assert len(lines) == 2 and lines[1].startswith("Draft finding")
    assert "<" not in app.prediction_text
