"""Phantom next to real CT: mid-sagittal and mid-coronal planes, world-mm aspect, one CT window."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from vfcore.verse import read_centroids, read_ct, read_mask

from .slices import WINDOWS, hu_colorbar, show_contours, show_slice, to_ras


def _load(ct_path, mask_path=None, centroids_path=None):
    ct = read_ct(ct_path)
    mask = read_mask(mask_path) if mask_path else None
    centre = None
    if centroids_path:
        pts = list(read_centroids(centroids_path).world(ct.affine).values())
        if pts:
            centre = np.median(np.array(pts), axis=0)
    if centre is None:
        ras, spacing, origin = to_ras(mask.data if mask is not None else ct.data, ct.affine)
        if mask is not None and (ras > 0).any():
            centre = origin + np.argwhere(ras > 0).mean(axis=0) * spacing
        else:
            centre = origin + (np.array(ras.shape) - 1) / 2 * spacing
    return ct, mask, centre


def phantom_vs_real(phantom_ct: str | os.PathLike, real_ct: str | os.PathLike, *,
                    phantom_mask=None, real_mask=None, phantom_centroids=None,
                    real_centroids=None, window="spine", contours: bool = False,
                    si_mm: float | None = 180.0, height: float = 5.0) -> Figure:
    """Mid-sagittal and mid-coronal planes of a phantom scan beside a real CT.

    Planes pass through the median body centroid (centroid JSON) or else the centre of the
    vertebra mask.  Every panel is drawn in millimetres with equal aspect and the same CT
    window, so a reader can compare sizes and contrast directly.  ``contours=True`` outlines
    the vertebra masks; ``si_mm`` crops every panel to that many millimetres of height around
    the centre (``None``: the whole scan), so scans of different length share one scale.
    ``height`` (inches) is lowered where the figure would be wider than 11.5 inches. Every
    panel has its orientation letters; one HU colourbar serves all four.
    """
    panels = []
    for name, ct_path, mask_path, ctd in (("phantom", phantom_ct, phantom_mask, phantom_centroids),
                                          ("real CT", real_ct, real_mask, real_centroids)):
        ct, mask, centre = _load(ct_path, mask_path, ctd)
        for plane in ("sagittal", "coronal"):
            panels.append((name, plane, ct, mask, centre))
    # equal height panels whose widths follow each image's mm aspect
    ratios = []
    for _, plane, ct, _, _ in panels:
        ras, spacing, _ = to_ras(np.zeros(ct.data.shape, dtype=np.uint8), ct.affine)
        w = ras.shape[1] * spacing[1] if plane == "sagittal" else ras.shape[0] * spacing[0]
        h = ras.shape[2] * spacing[2]
        ratios.append(w / (min(h, si_mm) if si_mm else h))
    # at most 11.5 inches wide, so the 8-pt labels stay readable where the notebook shows it
    height = min(height, (11.5 - 1.8) / sum(ratios))
    fig, axes = plt.subplots(1, 4, figsize=(height * sum(ratios) + 1.8, height + 0.6),
                             gridspec_kw={"width_ratios": ratios}, layout="constrained")
    for ax, (name, plane, ct, mask, centre) in zip(axes, panels):
        zooms = "x".join(f"{z:.2g}" for z in ct.zooms)
        show_slice(ax, ct.data, ct.affine, plane, at=centre, window=window,
                   title=f"{name}: {plane}\n{zooms} mm, {''.join(ct.axcodes)}")
        if contours and mask is not None:
            show_contours(ax, mask.data, ct.affine, plane, at=centre, linewidths=0.5)
        if si_mm:
            # rows are mm from the top of the scan; keep si_mm around the centre
            ras, spacing, origin = to_ras(np.zeros(ct.data.shape, dtype=np.uint8), ct.affine)
            h = ras.shape[2] * spacing[2]
            mid = h - (centre[2] - origin[2] + 0.5 * spacing[2])
            top = float(np.clip(mid - si_mm / 2, 0, max(h - si_mm, 0)))
            ax.set_ylim(min(top + si_mm, h), top)
        ax.set_xlabel("mm", fontsize=8)
    lo, hi = WINDOWS[window] if isinstance(window, str) else window
    hu_colorbar(list(axes), (lo, hi))
    fig.suptitle(f"Synthetic phantom vs real CT (window {lo:.0f} to {hi:.0f} HU)", fontsize=10)
    return fig
