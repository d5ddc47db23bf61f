"""CT slices in millimetres: reorient to RAS, cut a plane, show it with a CT window, draw mask contours.

Display conventions (radiological): sagittal = rows superior -> inferior, columns anterior ->
posterior; coronal = rows superior -> inferior, columns patient right -> left; axial = rows
anterior -> posterior, columns right -> left.  Images are shown with ``extent`` in mm, so
anisotropic voxels keep their true proportions.
"""
from __future__ import annotations

import numpy as np
from nibabel.orientations import (apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation,
                                  ornt_transform)

from vfcore.errors import InvalidParameterError

from .units import orientation_letters

#: CT windows as (low, high) HU.
WINDOWS = {
    "bone": (-450.0, 1350.0),
    "spine": (-300.0, 1100.0),
    "soft": (-160.0, 240.0),
    "network": (-1000.0, 1000.0),   # the paper's input clip
}
PLANES = ("sagittal", "coronal", "axial")


def hu_colorbar(ax, window: tuple[float, float], label: str = "CT (HU)", fontsize: float = 8):
    """A grey colourbar of the CT window (HU) beside ``ax`` (one axis or a list of axes that
    share it): black = ``window[0]``, white = ``window[1]``."""
    import matplotlib as mpl   # heavy: only the figures load it (as vfcore.viz.units)

    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(*window), cmap="gray")
    bar = np.ravel(ax)[0].figure.colorbar(sm, ax=ax, fraction=0.046, pad=0.03)   # colorbar takes one or many
    bar.set_label(label, fontsize=fontsize)
    bar.ax.tick_params(labelsize=fontsize)
    return bar


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder/flip array axes to RAS; returns (array, spacing (3,), world of voxel (0, 0, 0)).

    Only the axis order and flips change (no resampling); for oblique affines the nearest
    axis is used, as radiology viewers do.
    """
    ornt = io_orientation(affine)
    tr = ornt_transform(ornt, axcodes2ornt(("R", "A", "S")))
    out = apply_orientation(data, tr)
    ras_affine = affine @ inv_ornt_aff(tr, data.shape[:3])
    spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    return out, spacing, ras_affine[:3, 3]


def world_to_ras_index(point, affine: np.ndarray, data_shape) -> np.ndarray:
    """Continuous index in the RAS-ordered array of a world point (mm)."""
    _, spacing, origin = to_ras(np.zeros(data_shape[:3], dtype=np.uint8), affine)
    return (np.asarray(point, dtype=np.float64) - origin) / spacing


def cut(ras: np.ndarray, spacing, plane: str, index: int | None = None):
    """2-D display image and its ``extent`` (mm) of a RAS-ordered volume at ``index``."""
    if plane not in PLANES:
        raise InvalidParameterError("plane", f"one of {PLANES}", plane)
    ax = PLANES.index(plane)   # sagittal cuts x, coronal y, axial z
    n = ras.shape[ax]
    i = n // 2 if index is None else int(np.clip(round(index), 0, n - 1))
    sx, sy, sz = (float(s) for s in spacing)
    if plane == "sagittal":
        img = ras[i, ::-1, ::-1].T
        extent = (0, ras.shape[1] * sy, ras.shape[2] * sz, 0)
    elif plane == "coronal":
        img = ras[::-1, i, ::-1].T
        extent = (0, ras.shape[0] * sx, ras.shape[2] * sz, 0)
    else:
        img = ras[::-1, ::-1, i].T
        extent = (0, ras.shape[0] * sx, ras.shape[1] * sy, 0)
    return img, extent


def show_slice(ax, data: np.ndarray, affine: np.ndarray, plane: str = "sagittal",
               at=None, window="spine", title: str | None = None, axes_mm: bool = True,
               letters: bool = True, colorbar: bool = False):
    """Show a CT plane of ``data`` (any orientation) in mm aspect with a CT window.

    ``at`` is a world point (mm) the plane passes through (default: the volume centre);
    ``window`` a name of :data:`WINDOWS` or a (low, high) HU pair; ``letters``: the patient
    directions at the edges (:func:`vfcore.viz.units.orientation_letters`); ``colorbar``: the
    window's HU scale beside the axis.  Returns the image artist.
    """
    ras, spacing, origin = to_ras(data, affine)
    index = None
    if at is not None:
        index = ((np.asarray(at, dtype=np.float64) - origin) / spacing)[PLANES.index(plane)]
    img, extent = cut(ras, spacing, plane, index)
    lo, hi = WINDOWS[window] if isinstance(window, str) else window
    art = ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="bilinear")
    ax.set_aspect("equal")
    if letters:
        orientation_letters(ax, plane, fontsize=8)
    if colorbar:
        hu_colorbar(ax, (lo, hi))
    if title:
        ax.set_title(title, fontsize=9)
    if axes_mm:
        ax.tick_params(labelsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return art


def show_contours(ax, mask: np.ndarray, affine: np.ndarray, plane: str = "sagittal", at=None,
                  labels=None, colors="r", linewidths: float = 0.8):
    """Draw the outline of ``mask == label`` (each of ``labels``; default: mask > 0) on ``ax``.

    Uses the same cut as :func:`show_slice`, so contours sit on the CT of the same plane.
    """
    ras, spacing, origin = to_ras(np.asarray(mask), affine)
    index = None
    if at is not None:
        index = ((np.asarray(at, dtype=np.float64) - origin) / spacing)[PLANES.index(plane)]
    img, extent = cut(ras, spacing, plane, index)
    ny, nx = img.shape
    # pixel centres in the extent's mm coordinates
    xs = extent[0] + (np.arange(nx) + 0.5) * (extent[1] - extent[0]) / nx
    ys = extent[3] + (np.arange(ny) + 0.5) * (extent[2] - extent[3]) / ny
    if labels is None:
        layers = [img > 0]
    else:
        layers = [img == lab for lab in labels]
    colors = [colors] * len(layers) if isinstance(colors, str) else list(colors)
    for layer, color in zip(layers, colors):
        if layer.any():
            ax.contour(xs, ys, layer.astype(np.float32), levels=[0.5], colors=[color],
                       linewidths=linewidths)
