"""The course's figures (issue 14, "Figures"): orientation letters that match the anatomy,
colourbars (HU beside grey CT, A_k beside a unit's map), labelled axes, legends off the data
and text readable at the figure's size. Figures are inspected as matplotlib objects (texts,
colourbar axes, legend boxes, image arrays), never compared pixel by pixel."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

#: Letters at the edges of each view, (top, bottom, left, right), written out by hand from the
#: patch axes (I, P, L) and the radiological display of RAS scans.
EXPECTED = {"sagittal": ("S", "I", "A", "P"), "coronal": ("S", "I", "R", "L"), "axial": ("A", "P", "R", "L")}
#: Widest figure (inches) that a notebook shows at full size, and the smallest readable font.
MAX_WIDTH_IN, MIN_PT = 11.5, 8.0


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def letters_of(ax) -> dict[str, tuple[float, float]]:
    """Single capital letters written on ``ax`` in axes coordinates -> their position."""
    return {t.get_text(): t.get_position() for t in ax.texts
            if len(t.get_text()) == 1 and t.get_text().isupper() and t.get_transform() == ax.transAxes}


def assert_letters(ax, view: str) -> None:
    top, bottom, left, right = EXPECTED[view]
    found = letters_of(ax)
    assert set(found) == {top, bottom, left, right}, (view, found)
    assert found[top][1] > 0.9 and found[bottom][1] < 0.1
    assert found[left][0] < 0.1 and found[right][0] > 0.9


def colorbars(fig) -> list:
    """The colourbar axes of a figure (matplotlib labels them '<colorbar>')."""
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def colorbar_of(fig, cmap: str):
    bars = [ax for ax in colorbars(fig) if ax._colorbar.cmap.name == cmap]
    assert bars, f"no {cmap} colourbar; found {[ax._colorbar.cmap.name for ax in colorbars(fig)]}"
    return bars[0]._colorbar


def image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]


def visible_texts(fig) -> list[Text]:
    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def assert_readable(fig, max_width: float = MAX_WIDTH_IN) -> None:
    assert fig.get_size_inches()[0] <= max_width
    small = [(t.get_text(), t.get_fontsize()) for t in visible_texts(fig) if t.get_fontsize() < MIN_PT]
    assert not small, small


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def legend_box(fig):
    fig.canvas.draw()
    legends = [lg for ax in fig.axes if (lg := ax.get_legend()) is not None] + list(fig.legends)
    assert len(legends) == 1
    return legends[0].get_window_extent()


def bright_argmax(img: np.ndarray) -> tuple[float, float]:
    """(row, column) of the brightest pixels as fractions of the image's height and width."""
    img = np.asarray(img, dtype=np.float64)
    r, c = np.argwhere(img >= img.max() - 1e-6).mean(axis=0)
    return r / img.shape[0], c / img.shape[1]


# --------------------------------------------------------------------------------------------
# Notebook 01: the spine, straightening, the patch gallery
# --------------------------------------------------------------------------------------------

def _phantom_spine():
    """A 1-mm RAS scan with four body centroids on a straight vertical line and two bright
    markers next to L2: 8 mm anterior and superior, and 8 mm to the patient's left and
    superior (RAS+: left is -x)."""
    from vfcore.patches import fit_spine
    from vfcore.verse import Volume

    data = np.full((64, 64, 140), -1000, dtype=np.int16)
    world = {20 + i: np.array([32.0, 32.0, 110.0 - 30 * i]) for i in range(4)}   # L1..L4, head first
    x, y, z = world[21].astype(int)
    data[x - 2:x + 3, y + 6:y + 11, z + 6:z + 11] = 1000        # anterior-superior
    data[x - 10:x - 5, y - 2:y + 3, z + 6:z + 11] = 1000        # left-superior
    return Volume(data, np.eye(4)), world, fit_spine(world)


def test_straightening_letters_match_the_anatomy_and_share_a_hu_colorbar():
    from vfcore.patches import straighten
    from vfcore.viz import patches as vp

    ct, world, spine = _phantom_spine()
    patch = straighten(ct, None, world, 21, size=32, spine=spine)
    fig = vp.show_straightening(ct, None, spine, patch, size=32)
    axes = image_axes(fig)
    assert len(axes) == 3
    for ax, view in zip(axes, ("sagittal", "sagittal", "coronal")):
        assert_letters(ax, view)
    # the anterior-superior marker sits top left (S, A) of the sagittal panels; the
    # left-superior marker top right (S, L) of the coronal panel
    for ax in axes[:2]:
        row, col = bright_argmax(ax.get_images()[0].get_array())
        assert row < 0.5 and col < 0.5
    row, col = bright_argmax(axes[2].get_images()[0].get_array())
    assert row < 0.5 and col > 0.5
    bar = colorbar_of(fig, "gray")
    assert "HU" in bar.ax.get_ylabel() and (bar.vmin, bar.vmax) == vp.WINDOW
    assert len(colorbars(fig)) == 1                     # one scale for the three panels
    assert_readable(fig)


def test_spine_figure_has_letters_and_a_hu_colorbar():
    from vfcore.viz import patches as vp

    ct, _, spine = _phantom_spine()
    fig = vp.show_spine(ct, None, spine)
    assert_letters(fig.axes[0], "sagittal")
    bar = colorbar_of(fig, "gray")
    assert "HU" in bar.ax.get_ylabel()
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()


def _gallery_store(tmp_path, size=16):
    rows = []
    for i, (level, fracture, grade) in enumerate([("L1", 1, 3), ("L2", 1, 2), ("L1", 0, 0), ("L2", 0, 0),
                                                  ("L3", 0, 0)]):
        case = f"sub-case{i:03d}"
        (tmp_path / case).mkdir()
        ct = np.full((size,) * 3, -1000, dtype=np.int16)
        ct[4:12, 4:12, 4:12] = 300
        mask = np.zeros((size,) * 3, dtype=np.uint8)
        mask[4:12, 4:12, 4:12] = 20 + int(level[1]) - 1
        np.save(tmp_path / case / f"{level}_ct.npy", ct)
        np.save(tmp_path / case / f"{level}_mask.npy", mask)
        rows.append({"case": case, "patient": case, "label": 20 + int(level[1]) - 1, "level": level,
                     "fracture": fracture, "grade": grade, "shape": 1 if fracture else 0, "split": "train",
                     "ct_path": f"{case}/{level}_ct.npy", "mask_path": f"{case}/{level}_mask.npy",
                     "concept_path": "", "out_of_field": 0.0, "reason": ""})
    return pd.DataFrame(rows)


def test_patch_gallery_letters_colorbar_and_readable_captions(tmp_path):
    from vfcore.viz import patches as vp

    manifest = _gallery_store(tmp_path)
    fig = vp.patch_gallery(manifest, tmp_path, n=4, seed=0, size=16)
    tiles = image_axes(fig)
    assert len(tiles) == 2 * 2 + 2 * 3                  # 2 fractured, 3 healthy; sagittal + coronal each
    for ax in tiles:
        assert_letters(ax, "sagittal" if "A" in letters_of(ax) else "coronal")
    views = ["sagittal" if "A" in letters_of(ax) else "coronal" for ax in tiles]
    assert views.count("sagittal") == views.count("coronal") == 5
    captions = [ax.get_title() for ax in tiles if ax.get_title()]
    assert len(captions) == 5
    assert sum("G3" in c for c in captions) == 1 and sum("G0" in c for c in captions) == 3
    bar = colorbar_of(fig, "gray")
    assert "HU" in bar.ax.get_ylabel()
    assert_readable(fig)


def test_wrong_calls_letters_colorbar_captions_and_target_outline(tmp_path):
    """Issue 26: the wrong calls as pictures: one tile each, letters, HU colour bar, caption."""
    from vfcore.viz import patches as vp

    manifest = _gallery_store(tmp_path)
    rows = manifest.head(3).assign(outcome=["FP", "FN", "FP"])
    fig = vp.wrong_calls(rows, tmp_path, ["a\nb", "c", "d"], cols=2, size=16)
    tiles = image_axes(fig)
    assert len(tiles) == 3
    for ax in tiles:
        assert_letters(ax, "sagittal")
        assert ax.get_xlabel() in ("a\nb", "c", "d")
    assert "HU" in colorbar_of(fig, "gray").ax.get_ylabel()
    assert_readable(fig)
    with pytest.raises(Exception):
        vp.wrong_calls(rows.head(0), tmp_path, [])


# --------------------------------------------------------------------------------------------
# CT slices of scans (RAS): viz.slices
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plane", ["sagittal", "coronal", "axial"])
def test_show_slice_letters_match_a_marker_in_an_lps_scan(plane):
    from vfcore.viz.slices import show_slice

    # an LPS-stored scan (x grows to the patient's left, y to posterior), 1 x 1 x 2 mm voxels
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    data = np.full((40, 40, 20), -1000, dtype=np.int16)
    # the marker: patient right (small LPS x = large RAS x), anterior (small LPS y), superior
    data[2:6, 2:6, 16:19] = 1000
    at = affine[:3, :3] @ np.array([3.5, 3.5, 17.0]) + affine[:3, 3]
    fig, ax = plt.subplots()
    art = show_slice(ax, data, affine, plane, at=at, window=(-1000, 1000), colorbar=True)
    assert_letters(ax, plane)
    # top-left corner faces (S, A), (S, R) and (A, R): the marker is there in every plane
    row, col = bright_argmax(art.get_array())
    assert row < 0.5 and col < 0.5
    bar = colorbar_of(fig, "gray")
    assert (bar.vmin, bar.vmax) == (-1000, 1000) and "HU" in bar.ax.get_ylabel()


# --------------------------------------------------------------------------------------------
# Notebook 02: training curves
# --------------------------------------------------------------------------------------------

def test_training_curves_labelled_legend_off_the_curves_best_epoch_named():
    from vfcore.viz import training as vt

    h = pd.DataFrame({"epoch": range(6), "loss": [0.9, 0.7, 0.5, 0.45, 0.4, 0.38],
                      "val_f1": [0.2, 0.5, 0.7, 0.65, 0.7, 0.6], "val_auc": [0.6, 0.7, 0.8, 0.85, 0.8, 0.75]})
    ax = vt.training_curves(h)
    fig, right = ax.figure, ax.figure.axes[1]
    assert ax.get_xlabel() == "epoch" and "loss" in ax.get_ylabel()
    assert "F1" in right.get_ylabel() and "AUC" in right.get_ylabel()
    box = legend_box(fig)
    for a in (ax, right):
        assert not overlaps(box, a.get_window_extent())        # the legend covers no curve
    labels = [t.get_text() for t in (ax.get_legend() or fig.legends[0]).get_texts()]
    # best: highest F1 (0.7 at epochs 2 and 4 counted from 0), tie broken by AUC (0.8 both), then
    # the earliest; plotted and named counted from 1: epoch 3
    assert any("best checkpoint (epoch 3)" in s for s in labels)
    assert [ln.get_xdata()[0] for ln in right.lines if ln.get_linestyle() == ":"] == [3]
    assert list(right.lines[0].get_xdata()) == [1, 2, 3, 4, 5, 6]   # x axis from 1


def test_augmentation_gallery_letters_and_hu_colorbar():
    from vfcore.viz import training as vt

    hu = np.random.default_rng(0).integers(-1000, 1000, (96, 96, 96)).astype(np.int16)
    fig = vt.augmentation_gallery(hu, "small", n=3, seed=0)
    tiles = image_axes(fig)
    assert len(tiles) == 8
    assert_letters(tiles[0], "sagittal")                     # row 0, column 0
    assert_letters(tiles[4], "coronal")                      # row 1, column 0
    bar = colorbar_of(fig, "gray")
    # the grey scale shows 0.2 .. 0.9 of the network's [0, 1] = -1000 .. 1000 HU
    assert (bar.vmin, bar.vmax) == pytest.approx((-600.0, 800.0)) and "HU" in bar.ax.get_ylabel()
    assert_readable(fig)


# --------------------------------------------------------------------------------------------
# Notebook 03: thresholds, histograms, masks for q, exact vs sampled
# --------------------------------------------------------------------------------------------

def _dissection(K=60, q=0.01, seed=0):
    rng = np.random.default_rng(seed)
    T = np.sort(rng.lognormal(0, 1.5, K))[::-1].astype(np.float32)
    dead = np.zeros(K, bool)
    dead[-5:] = True
    T[dead] = 0.0
    tail = np.where(dead, 0.0, q * (1 + rng.uniform(-0.01, 0.0, K)))
    tail[10] = 0.4 * q                                            # a unit with ties at T_k
    return SimpleNamespace(T=T, unit_max=T * 3, n_units=K, realised_tail=tail, flags={"degenerate": dead})


def test_threshold_overview_realised_tail_is_a_sorted_curve_not_a_block():
    from vfcore.viz import dissection as vd

    d, q = _dissection(), 0.01
    fig = vd.threshold_overview(d, q)
    right = fig.axes[1]
    assert not right.patches                                     # no bars: no solid block
    curves = [ln for ln in right.lines if len(ln.get_ydata()) == d.n_units]
    assert len(curves) == 1
    np.testing.assert_allclose(curves[0].get_ydata(), np.sort(d.realised_tail)[::-1])
    assert any(np.allclose(ln.get_ydata(), q) and len(ln.get_ydata()) == 2 for ln in right.lines)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    # the legend of the right panel covers none of its points
    fig.canvas.draw()
    box = right.get_legend().get_window_extent()
    pts = right.transData.transform(np.c_[curves[0].get_xdata(), curves[0].get_ydata()])
    assert not any(box.contains(x, y) for x, y in pts)
    assert_readable(fig)


def test_exact_vs_sampled_readable_curves_with_q_marked():
    from vfcore.viz import dissection as vd

    q, K = 0.005, 400
    rng = np.random.default_rng(1)
    realised = {"exact": np.full(K, q), "sketch": q * (1 + rng.normal(0, 0.08, K)),
                "sketch, first 500": q * (1 + rng.normal(0.1, 0.2, K))}
    fig = vd.exact_vs_sampled(q, realised)
    left, right = fig.axes[:2]
    for name, values in realised.items():
        lines = [ln for ln in left.lines if ln.get_label().startswith(name + " (")]
        assert len(lines) == 1
        np.testing.assert_allclose(lines[0].get_ydata(), np.sort(values)[::-1])
    assert len({ln.get_linestyle() for ln in left.lines if len(ln.get_ydata()) == K}) == 3
    assert any(np.allclose(ln.get_ydata(), q) and len(ln.get_ydata()) == 2 for ln in left.lines)
    # outlined histograms (they cannot hide one another), each counting every unit
    assert right.patches and not any(p.get_fill() for p in right.patches)
    for ax in (left, right):
        assert ax.get_xlabel() and ax.get_ylabel()
    box = legend_box(fig)
    assert not any(overlaps(box, ax.get_window_extent()) for ax in (left, right))
    assert_readable(fig)


def test_unit_histograms_and_correlation_curve_readable():
    from vfcore.viz import dissection as vd

    rng = np.random.default_rng(0)
    values = np.maximum(rng.normal(0, 1, (4, 2000)), 0)
    T = [float(np.quantile(v, 0.995)) for v in values]
    assert_readable(vd.unit_histograms(values, [3, 7, 11, 19], T, 0.005))
    ranking = pd.DataFrame({"unit": range(50), "c_k": np.linspace(1, 0, 50),
                            "c_positive": np.linspace(0.9, 0.1, 50)})
    fig = vd.correlation_curve(ranking)
    assert_readable(fig)
    box = legend_box(fig)
    assert not overlaps(box, fig.axes[0].get_window_extent())


@pytest.mark.parametrize("view", ["sagittal", "coronal", "axial"])
def test_masks_for_q_letters_hu_and_shared_activation_colorbar(view):
    from vfcore.viz import dissection as vd

    size, grid = 16, 4
    ct = np.full((size,) * 3, -500, dtype=np.int16)
    fmap = np.zeros((grid,) * 3, dtype=np.float32)
    fmap[1, 1, 1], fmap[1, 1, 2], fmap[1, 2, 1] = 3.0, 2.0, 1.0
    thresholds = {0.05: 0.5, 0.01: 1.5, 0.001: 2.5}
    field = (slice(0, size),) * 3
    fig = vd.masks_for_q(ct, fmap, thresholds, field, view=view, title="unit 3 on sub-x L1")
    panels = image_axes(fig)
    assert len(panels) == 1 + len(thresholds)
    for ax in panels:
        assert_letters(ax, view)
    hu = colorbar_of(fig, "gray")
    assert "HU" in hu.ax.get_ylabel()
    act = colorbar_of(fig, "autumn")
    assert len(colorbars(fig)) == 2                              # one A_k scale for every q
    # the scale spans A_k inside the largest mask (q = 0.05) on the shown slice: it reaches
    # the unit's peak (3.0 before trilinear upsampling, so at most 3) and starts below T(0.01)
    assert 0.0 < act.vmin < 1.5 < act.vmax <= 3.0 + 1e-6
    titles = [ax.get_title() for ax in panels[1:]]
    assert [t.split(":")[0] for t in titles] == ["q = 0.05", "q = 0.01", "q = 0.001"]
    assert_readable(fig)


def test_relevance_row_one_colour_scale_and_slice_numbers():
    """Two units on different scales share one colour bar (smallest T_k shown .. largest
    activation shown); each tile names the slice it shows, where its unit fires."""
    import re

    from vfcore.viz import dissection as vd

    ct = np.zeros((16, 16, 16), dtype=np.int16)
    a, b = np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.float32)
    a[:2, :2, :2] = 3.0                   # unit 2 fires in the cells that cover voxels 0..7
    b[2:, 2:, 2:] = 10.0                  # unit 5: voxels 8..15, on a larger scale
    fig = vd.relevance_row(ct, {2: a, 5: b}, {2: 0.5, 5: 2.0}, [2, 5], {2: 1, 5: 2}, {2: 1.0, 5: 9.0},
                           (slice(0, 16),) * 3, title="sub-x L1")
    bars = {ax.get_ylabel(): ax.get_ylim() for ax in fig.axes if ax.get_ylabel()}
    np.testing.assert_allclose(bars["A_k inside M_k (all units)"], (0.5, 10.0))
    assert "CT (HU)" in bars
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("relevance")]
    slices = [int(re.search(r"slice (\d+)", t).group(1)) for t in titles]
    assert slices[0] <= 7 and slices[1] >= 8, titles
    assert_readable(fig)


def test_collage_gallery_and_relevance_row_still_draw():
    """Signatures kept: collage, relevance_row and draw_overlay as notebook 04 calls them."""
    from vfcore.viz import dissection as vd

    tile = (np.zeros((16, 16)), np.ones((16, 16)), "sub-x L1", np.ones((16, 16), bool))
    vd.collage([tile] * 3, 0.5, "unit 3")
    ct = np.zeros((16, 16, 16), dtype=np.int16)
    fm = {2: np.ones((4, 4, 4), np.float32)}
    vd.relevance_row(ct, fm, {2: 0.5}, [2], {2: 1}, {2: 1.0}, (slice(0, 16),) * 3)
    fig, ax = plt.subplots()
    vd.draw_overlay(ax, np.zeros((8, 8)), np.ones((8, 8)), 0.5, "contour", view="axial", colorbar=True)
    assert_letters(ax, "axial")
