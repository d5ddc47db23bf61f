"""One unit's map over a CT slice: the one renderer of the collages, galleries and the explorer.

A unit k on a sample x is shown as its mask M_k(x) = A_k(x) > T_k (upsampled onto the patch,
:func:`vfcore.dissect.patch_mask`) over the CT slice:

* ``overlay``: inside the mask a colour blended half and half over the CT, red where the
  upsampled activation is lowest inside the mask and yellow where it is highest
  (``(255, 255 t, 0)``, t = (A_k - low) / (high - low): matplotlib's ``autumn``);
* ``contour``: the mask's outline in cyan; ``both``: the two; ``off``: the CT alone.

:func:`unit_rgb` makes the picture as an RGB array (numpy only: the explorer sends it as a
PNG, and a test can check every pixel); :func:`draw_unit` puts the same picture on a
matplotlib axis with the view's orientation letters and, on request, a colourbar.

Slices of a patch (axes I, P, L) are taken without transposing (:func:`take_slice`), as
radiology viewers show them: sagittal = head up, anterior left; coronal = head up, patient
right on the left; axial = anterior up, patient right on the left (:data:`ORIENTATION`).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vfcore.constants import DISPLAY_WINDOW_HU
from vfcore.dissect import VIEWS
from vfcore.errors import InvalidParameterError

#: How the mask is drawn (see the module docstring).
MODES = ("overlay", "contour", "both", "off")
OVERLAY_ALPHA = 0.5
CONTOUR_RGB = np.array([0.0, 255.0, 255.0])
#: The colour map of the overlay: red (lowest activation inside the mask) to yellow (highest).
UNIT_CMAP = "autumn"
#: The target vertebra's outline over a unit overlay: not a colour of the red-to-yellow map
#: (yellow was the map's top: an outline and a strong activation looked the same).
OVERLAY_TARGET_COLOUR = "lime"
#: The patient direction each edge of a view's slice faces: (top, bottom, left, right).
ORIENTATION: dict[str, tuple[str, str, str, str]] = {
    "sagittal": ("S", "I", "A", "P"),
    "coronal": ("S", "I", "R", "L"),
    "axial": ("A", "P", "R", "L"),
}


def take_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """The 2-D slice ``index`` of a (I, P, L) volume in a view (``vfcore.dissect.VIEWS``):
    sagittal = rows I, columns P; coronal = rows I, columns L; axial = rows P, columns L."""
    if view not in VIEWS:
        raise InvalidParameterError("view", f"one of {list(VIEWS)}", view)
    return np.take(volume, int(index), axis=VIEWS[view])


def window_hu(hu: np.ndarray, window: tuple[float, float] = DISPLAY_WINDOW_HU) -> np.ndarray:
    """HU -> grey levels 0..255 (float), linear inside ``window``, clipped outside."""
    lo, hi = window
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask with at least one 4-neighbour outside it (the image border counts
    as outside)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~interior


def colour_range(activation: np.ndarray | None, mask: np.ndarray | None) -> tuple[float, float]:
    """(low, high): the smallest and largest activation inside the mask, the ends of the
    overlay's colour scale; (0, 0) without a mask or activation."""
    if activation is None or mask is None or not np.any(mask):
        return 0.0, 0.0
    inside = np.asarray(activation)[np.asarray(mask, dtype=bool)]
    return float(inside.min()), float(inside.max())


def unit_rgb(ct: np.ndarray, mask: np.ndarray | None = None, activation: np.ndarray | None = None,
             low: float = 0.0, high: float | None = None, mode: str = "overlay", scale: int = 1,
             window: tuple[float, float] = DISPLAY_WINDOW_HU) -> np.ndarray:
    """One unit on one CT slice as an RGB uint8 image [H * scale, W * scale, 3].

    ``ct``, ``mask`` (M_k on this slice), ``activation`` (the upsampled A_k on this slice):
    2-D arrays of one shape. The CT is shown in ``window``; ``mode`` as in :data:`MODES`;
    the overlay is yellow everywhere when ``high`` is None or not above ``low``. Each pixel
    becomes a ``scale x scale`` block (nearest neighbour).
    """
    if mode not in MODES:
        raise InvalidParameterError("mode", f"one of {MODES}", mode)
    rgb = np.repeat(window_hu(ct, window)[..., None], 3, axis=-1)
    if mask is not None and mode != "off":
        mask = np.asarray(mask, dtype=bool)
        if mode in ("overlay", "both"):
            t = np.ones(int(mask.sum()), dtype=np.float32)
            if activation is not None and high is not None and high > low:
                t = np.clip((np.asarray(activation)[mask] - low) / (high - low), 0.0, 1.0)
            colour = np.stack([np.full_like(t, 255.0), 255.0 * t, np.zeros_like(t)], axis=-1)
            rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colour
        if mode in ("contour", "both"):
            rgb[mask_outline(mask)] = CONTOUR_RGB
    out = np.rint(rgb).astype(np.uint8)
    if scale != 1:
        out = np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)
    return out


def orientation_letters(ax, view: str, fontsize: float = 8, colour: str = "#7fdbff") -> None:
    """Write the patient directions of ``view`` (:data:`ORIENTATION`) inside the edges of ``ax``."""
    top, bottom, left, right = ORIENTATION[view]
    style = dict(transform=ax.transAxes, fontsize=fontsize, color=colour, weight="bold")
    ax.text(0.5, 0.985, top, ha="center", va="top", **style)
    ax.text(0.5, 0.015, bottom, ha="center", va="bottom", **style)
    ax.text(0.015, 0.5, left, ha="left", va="center", **style)
    ax.text(0.985, 0.5, right, ha="right", va="center", **style)


def unit_colorbar(ax, low: float, high: float, label: str = "A_k inside M_k (upsampled)", fontsize: float = 7):
    """A colourbar beside ``ax`` (one axis, or a list of axes that share it) for the overlay's
    scale: red = ``low``, yellow = ``high``."""
    import matplotlib as mpl   # heavy: only the figures load it, the explorer's PNG path never does

    high = high if high > low else low + 1e-6
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(low, high), cmap=UNIT_CMAP)
    bar = np.ravel(ax)[0].figure.colorbar(sm, ax=ax, fraction=0.046, pad=0.03)   # colorbar takes one or many
    bar.set_label(label, fontsize=fontsize)
    bar.ax.tick_params(labelsize=fontsize - 1)
    return bar


def draw_unit(ax, ct: np.ndarray, mask: np.ndarray | None = None, activation: np.ndarray | None = None,
              low: float | None = None, high: float | None = None, mode: str = "overlay",
              view: str | None = None, title: str | None = None, fontsize: float = 8,
              colorbar: bool = False, letters: bool = True):
    """Draw one unit on one CT slice on a matplotlib axis (the picture of :func:`unit_rgb`).

    ``low`` / ``high`` default to the activation's range inside this slice's mask
    (:func:`colour_range`; the explorer passes the range over the whole 3-D mask).
    ``view``: write its orientation letters (``letters``). ``colorbar``: add the overlay's
    colour scale beside the axis. Returns the image artist.
    """
    if low is None or high is None:
        lo, hi = colour_range(activation, mask)
        low = lo if low is None else low
        high = hi if high is None else high
    art = ax.imshow(unit_rgb(ct, mask, activation, low, high, mode), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if view is not None and letters:
        orientation_letters(ax, view, fontsize=max(fontsize - 1, 5))
    if title:
        ax.set_title(title, fontsize=fontsize)
    if colorbar and mask is not None and np.any(mask) and mode in ("overlay", "both"):
        unit_colorbar(ax, low, high, fontsize=max(fontsize - 1, 5))
    return art


def png_bytes(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode an RGB uint8 image as PNG (lossless, so a test can decode the exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> RGB uint8 array (the inverse of :func:`png_bytes`)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def figure_png(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes (for an embedded picture of a widget)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
