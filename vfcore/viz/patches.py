"""Figures for notebook 01: the curved spine and its spline, straightening, patch galleries.

Every function draws with matplotlib and returns the figure (or draws into ``ax``), so the
notebook keeps a static picture. Images follow the radiological habit: sagittal views with
the head up and anterior on the left, coronal views with the head up and the patient's left
on the right (patch columns run towards L); every slice carries its orientation letters
(:func:`vfcore.viz.units.orientation_letters`) and a colourbar of the CT window in HU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.ndimage import map_coordinates

from vfcore.errors import DataValueError
from vfcore.patches import Patch, Spine
from vfcore.verse import Volume, craniocaudal, level_name

from .slices import hu_colorbar
from .units import orientation_letters

#: CT window for bone in the figures (HU).
WINDOW = (-400, 1200)
FRACTURE_COLOUR, HEALTHY_COLOUR, TARGET_COLOUR = "tab:red", "tab:green", "tab:red"


def resample_plane(volume: Volume, origin: np.ndarray, u: np.ndarray, v: np.ndarray,
                   shape: tuple[int, int], order: int = 1, fill: float = -1024) -> np.ndarray:
    """Sample ``volume`` on the plane world(r, c) = origin + r u + c v (u, v in mm per pixel)."""
    r, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    world = origin[:, None, None] + u[:, None, None] * r + v[:, None, None] * c
    inv = np.linalg.inv(volume.affine)
    vox = np.einsum("ij,jrc->irc", inv[:3, :3], world) + inv[:3, 3][:, None, None]
    return map_coordinates(volume.data, vox, order=order, mode="constant", cval=fill,
                           output=np.float32 if order else volume.data.dtype)


def _sagittal_reformat(volume: Volume, spine: Spine, margin: float = 40.0, order: int = 1,
                       fill: float = -1024):
    """A curved sagittal reformat that follows the spine's left-right course.

    Rows: world z from head to feet (1 mm); columns: world y from anterior to posterior (1 mm);
    each row is sampled at the spline's x for that height, so a scoliotic spine stays in view.
    Returns the image and the (z, y) of its first pixel.
    """
    pts = spine.points
    z_top, z_bot = pts[:, 2].max() + margin, pts[:, 2].min() - margin
    y_ant, y_post = pts[:, 1].max() + margin + 20, pts[:, 1].min() - margin - 30
    n_rows, n_cols = int(z_top - z_bot) + 1, int(y_ant - y_post) + 1
    z = z_top - np.arange(n_rows)
    order_z = np.argsort(pts[:, 2])
    x = np.interp(z, pts[order_z, 2], pts[order_z, 0])  # spine's x at each height (ends flat)
    y = y_ant - np.arange(n_cols)
    world = np.stack([np.broadcast_to(x[:, None], (n_rows, n_cols)),
                      np.broadcast_to(y[None, :], (n_rows, n_cols)),
                      np.broadcast_to(z[:, None], (n_rows, n_cols))])
    inv = np.linalg.inv(volume.affine)
    vox = np.einsum("ij,jrc->irc", inv[:3, :3], world) + inv[:3, 3][:, None, None]
    img = map_coordinates(volume.data, vox, order=order, mode="constant", cval=fill,
                          output=np.float32 if order else volume.data.dtype)
    return img, (z_top, y_ant)


def show_spine(ct: Volume | None, mask: Volume | None, spine: Spine, ax=None, title: str = ""):
    """The curved spine on a sagittal reformat, its body centroids and the fitted spline."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 9))
    (z0, y0) = (None, None)
    if ct is not None:
        img, (z0, y0) = _sagittal_reformat(ct, spine)
        ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="none")
        hu_colorbar(ax, WINDOW)
    if mask is not None:
        lab, (z0, y0) = _sagittal_reformat(mask, spine, order=0, fill=0)
        if ct is None:
            ax.imshow(lab > 0, cmap="gray", interpolation="none")
        ax.contour(lab, levels=np.unique(lab)[1:] - 0.5, colors="gold", linewidths=0.5)
    to_px = lambda p: (y0 - p[..., 1], z0 - p[..., 0 + 2])  # noqa: E731  (column, row)
    if spine.spline is not None:
        t = np.linspace(spine.t[0] - 15, spine.t[-1] + 15, 300)
        col, row = to_px(spine.spline(t))
        ax.plot(col, row, "-", color="tab:cyan", lw=1.5, label="cubic spline")
    col, row = to_px(spine.points)
    ax.plot(col, row, "o", color="tab:red", ms=4, label="body centroids")
    for lb, cc, rr in zip(spine.labels, col, row):
        ax.text(cc - 8, rr, level_name(lb), color="white", fontsize=7, ha="right", va="center")
    orientation_letters(ax, "sagittal", fontsize=9)
    ax.set_title(title or "sagittal reformat (anterior left)", fontsize=10)
    ax.set_xlabel("anterior  <-  y (mm)  ->  posterior", fontsize=9)
    ax.set_ylabel("head  <-  z (mm)  ->  feet", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(loc="lower right", bbox_to_anchor=(0.97, 0.03), fontsize=8)
    return ax.figure


def show_straightening(ct: Volume, mask: Volume | None, spine: Spine, patch: Patch,
                       size: int = 96):
    """One vertebra before (scanner-aligned sagittal plane through c, patch outline) and after
    straightening (the patch's mid-sagittal and mid-coronal slices, target contour)."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.3), layout="constrained")
    f = patch.frame
    half = size / 2 + 20
    # before: plane through c spanned by world -z (rows) and -y (columns): head up, anterior left
    origin = f.c + np.array([0.0, half, half])
    img = resample_plane(ct, origin, np.array([0, 0, -1.0]), np.array([0, -1.0, 0]),
                         (int(2 * half), int(2 * half)))
    ax = axes[0]
    ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
    if mask is not None:
        lab = resample_plane(mask, origin, np.array([0, 0, -1.0]), np.array([0, -1.0, 0]),
                             (int(2 * half), int(2 * half)), order=0, fill=0)
        ax.contour(lab == patch.label, [0.5], colors=TARGET_COLOUR, linewidths=0.8)
    corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1], [-1, -1]]) * (size - 1) / 2
    world = f.c + corners[:, :1] * -f.e_S + corners[:, 1:] * -f.e_A
    ax.plot(origin[1] - world[:, 1], origin[2] - world[:, 2], "-", color="tab:cyan", lw=1.2)
    axis = f.c + np.outer([-40, 40], f.e_S)
    ax.plot(origin[1] - axis[:, 1], origin[2] - axis[:, 2], "--", color="tab:cyan", lw=1)
    ax.set_title(f"{patch.level} in the scanner frame\n(cyan: patch outline, spline tangent)",
                 fontsize=10)
    mid = size // 2
    views = ((axes[1], (slice(None), slice(None), mid), "sagittal", "rows I, cols P"),
             (axes[2], (slice(None), mid, slice(None)), "coronal", "rows I, cols L"))
    for ax, sl, name, axes_ipl in views:
        ax.imshow(patch.ct[sl], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        if patch.mask is not None:
            ax.contour(patch.mask[sl] == patch.label, [0.5], colors=TARGET_COLOUR, linewidths=0.8)
        ax.axhline((size - 1) / 2, color="tab:cyan", lw=0.5)
        ax.axvline((size - 1) / 2, color="tab:cyan", lw=0.5)
        ax.set_title(f"straightened patch, {name}\n({axes_ipl})", fontsize=10)
    for ax, view in zip(axes, ("sagittal", "sagittal", "coronal")):
        ax.set_xticks([])
        ax.set_yticks([])
        orientation_letters(ax, view, fontsize=9)
    hu_colorbar(list(axes), WINDOW)
    return fig


def load_patch(patches_dir: str | os.PathLike, row) -> dict[str, np.ndarray | None]:
    """The arrays of one manifest row (``ct``, ``mask``, ``concepts``; None where absent)."""
    patches_dir = Path(patches_dir)
    get = lambda p: np.load(patches_dir / p) if isinstance(p, str) and p else None  # noqa: E731
    return {"ct": get(row["ct_path"]), "mask": get(row["mask_path"]),
            "concepts": get(row["concept_path"])}


def _caption(row) -> str:
    grade = row["grade"]
    g = "" if pd.isna(grade) else f" G{int(grade)}"
    shape = {1: " wedge", 2: " biconcave", 3: " crush"}.get(
        None if pd.isna(row["shape"]) else int(row["shape"]), "")
    return f"{row['case'][-10:]} {row['level']}{g}{shape if g and int(grade) else ''}"


def patch_gallery(manifest: pd.DataFrame, patches_dir: str | os.PathLike, n: int = 4,
                  seed: int = 0, size: int = 96):
    """Fractured patches above healthy ones: sagittal + coronal, target contour, grade,
    orientation letters and the CT window's HU colourbar.

    Picks up to ``n`` fractured vertebrae (mostly inside the scan; grades 3, 2, 1 in turn,
    random within a grade) and as many healthy ones of the same levels.
    """
    rng = np.random.default_rng(seed)
    labelled = manifest[manifest["fracture"].notna()]
    inside = labelled[labelled["out_of_field"] < 0.25]
    if inside["fracture"].eq(1).any() and inside["fracture"].eq(0).any():
        labelled = inside  # show whole vertebrae when there are some
    fx = labelled[labelled["fracture"] == 1]
    ok = labelled[labelled["fracture"] == 0]
    # one of each grade in turn (3, 2, 1, 3, ...), random within a grade
    by_grade = {g: list(rng.permutation(fx.index[fx["grade"] == g])) for g in (3, 2, 1)}
    chosen = []
    while len(chosen) < n and any(by_grade.values()):
        for g in (3, 2, 1):
            if by_grade[g] and len(chosen) < n:
                chosen.append(by_grade[g].pop(0))
    fx = fx.loc[chosen]
    picks = []
    for _, row in fx.iterrows():
        same = ok[(ok["level"] == row["level"]) & ~ok.index.isin([p.name for p in picks])]
        pool = same if len(same) else ok[~ok.index.isin([p.name for p in picks])]
        if len(pool):
            picks.append(pool.iloc[int(rng.integers(len(pool)))])
    while len(picks) < min(n, len(ok)):
        pool = ok[~ok.index.isin([p.name for p in picks])]
        picks.append(pool.iloc[int(rng.integers(len(pool)))])
    groups = [(kind, rows) for kind, rows in (("fractured", [r for _, r in fx.iterrows()]),
                                              ("healthy", picks)) if rows]
    if not groups:
        raise DataValueError(None, "the manifest has no labelled vertebrae to show")
    n_cols = max(len(rows) for _, rows in groups)
    # two rows (sagittal, coronal) per group, the healthy vertebra of a level under the
    # fractured one; 2.2 inches a tile keeps 8-pt captions readable when shown at full width
    fig, axes = plt.subplots(2 * len(groups), n_cols, figsize=(2.2 * n_cols + 1.0, 2.25 * 2 * len(groups)),
                             squeeze=False, layout="constrained")
    mid = size // 2
    cuts = (("sagittal", (slice(None), slice(None), mid)), ("coronal", (slice(None), mid, slice(None))))
    for g, (kind, rows) in enumerate(groups):
        colour = FRACTURE_COLOUR if kind == "fractured" else HEALTHY_COLOUR
        for c in range(n_cols):
            for r, (view, sl) in enumerate(cuts):
                ax = axes[2 * g + r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(rows):
                    ax.set_axis_off()
                    continue
                arrays = load_patch(patches_dir, rows[c])
                if arrays["ct"] is not None:
                    ax.imshow(arrays["ct"][sl], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
                if arrays["mask"] is not None:
                    ax.contour(arrays["mask"][sl] == rows[c]["label"], [0.5], colors=colour,
                               linewidths=0.7)
                orientation_letters(ax, view, fontsize=8)
            if c < len(rows):
                axes[2 * g, c].set_title(_caption(rows[c]), fontsize=9, color=colour)
        axes[2 * g, 0].set_ylabel(f"{kind}\nsagittal (I x P)", fontsize=9, color=colour)
        axes[2 * g + 1, 0].set_ylabel(f"{kind}\ncoronal (I x L)", fontsize=9, color=colour)
    hu_colorbar(axes, WINDOW)
    fig.suptitle("red: fractured (Genant grade G1-G3), green: healthy (G0), same levels column by column",
                 fontsize=10)
    return fig


def class_balance(manifest: pd.DataFrame, ax=None):
    """Vertebrae per level (cranio-caudal): healthy, fractured, and excluded (no label)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.2))
    labels = craniocaudal(sorted(set(manifest["label"])))
    names = [level_name(lb) for lb in labels]
    by = manifest.groupby("label")
    healthy = [int((by.get_group(lb)["fracture"] == 0).sum()) for lb in labels]
    fract = [int((by.get_group(lb)["fracture"] == 1).sum()) for lb in labels]
    excl = [int(by.get_group(lb)["fracture"].isna().sum()) for lb in labels]
    x = np.arange(len(labels))
    ax.bar(x, healthy, color=HEALTHY_COLOUR, label="healthy")
    ax.bar(x, fract, bottom=healthy, color=FRACTURE_COLOUR, label="fractured")
    ax.bar(x, excl, bottom=np.add(healthy, fract), color="lightgrey", label="excluded")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("vertebrae")
    total = sum(healthy) + sum(fract)
    share = f"{100 * sum(fract) / total:.1f} %" if total else "n/a"
    ax.set_title(f"class balance per level: {sum(fract)} fractured of {total} labelled ({share})")
    ax.legend(fontsize=8)
    return ax.figure


def split_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Patients, vertebrae and fractures per split (a table for the notebook)."""
    rows = []
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split]
        lab = part[part["fracture"].notna()]
        rows.append({"split": split, "patients": part["patient"].nunique(),
                     "scans": part["case"].nunique(), "vertebrae": len(part),
                     "labelled": len(lab), "fractured": int((lab["fracture"] == 1).sum())})
    return pd.DataFrame(rows).set_index("split")


def wrong_calls(rows: pd.DataFrame, patches_dir: str | os.PathLike, captions: Sequence[str],
                cols: int = 6, size: int = 96, title: str = ""):
    """The wrong calls as pictures (fast.ai's "top losses"): for each row (with ``ct_path``,
    ``mask_path``, ``label``, ``outcome``), the mid-sagittal slice with the target vertebra
    outlined (red: a missed fracture, FN; orange: a healthy vertebra called fractured, FP), its
    caption below, orientation letters and the CT window's colour bar. At most ``cols`` a row,
    2.1 inches a tile, so 8-pt captions stay readable at notebook width."""
    rows = rows.reset_index(drop=True)
    if rows.empty:
        raise DataValueError(None, "no wrong call to show")
    n = len(rows)
    cols = min(cols, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.1 * cols + 0.9, 3.1 * nrows), squeeze=False,
                             layout="constrained")
    mid = size // 2
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, (_, row), cap in zip(axes.ravel(), rows.iterrows(), captions):
        arrays = load_patch(patches_dir, row)
        colour = FRACTURE_COLOUR if row["outcome"] == "FN" else "orange"
        if arrays["ct"] is not None:
            ax.imshow(arrays["ct"][:, :, mid], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        if arrays["mask"] is not None:
            ax.contour(arrays["mask"][:, :, mid] == row["label"], [0.5], colors=colour, linewidths=0.8)
        orientation_letters(ax, "sagittal", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(cap, fontsize=8, color=colour)
    hu_colorbar(axes, WINDOW)
    fig.suptitle(title or "wrong calls, mid-sagittal (red outline: missed fracture FN; orange: false positive FP)",
                 fontsize=10)
    return fig
