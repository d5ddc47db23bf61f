"""Independent references for the explorer's picture, shared by the kernel-side and browser
tests: the slice of a (I, P, L) volume written out per view; the mask M_k = A_k > T_k on the
network grid with each feature voxel repeated into its block of the patch; the best slice as
a plain loop; and the expected colour of every pixel (HU window; inside M_k a red-to-yellow
colour by the activation, lowest to highest inside the mask, blended half and half; a cyan
outline) checked against the PNG the widget sends."""
from __future__ import annotations

import re

import numpy as np
import scipy.ndimage as ndi

from vfcore.constants import DISPLAY_WINDOW_HU
from vfcore.explorer import SCALE
from vfcore.viz.units import decode_png

LO, HI = DISPLAY_WINDOW_HU


def ref_unit(A_k: np.ndarray, T: float, field_start: int = 16, field_size: int = 64,
             patch: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(activation, mask) of one unit on the patch: A_k [g, g, g] upsampled linearly with
    scipy (grid mode, = trilinear with align_corners=False) into the centre field, and
    M_k = A_k > T repeated into blocks of field_size / g voxels; zero/False outside."""
    g = A_k.shape[0]
    block = field_size // g
    act = np.zeros((patch,) * 3, dtype=np.float32)
    mask = np.zeros((patch,) * 3, dtype=bool)
    f = slice(field_start, field_start + field_size)
    act[f, f, f] = ndi.zoom(A_k.astype(np.float32), block, order=1, grid_mode=True, mode="nearest")
    m = A_k > T
    mask[f, f, f] = m.repeat(block, 0).repeat(block, 1).repeat(block, 2)
    return act, mask


def ref_slice(vol: np.ndarray, view: str, s: int) -> np.ndarray:
    return {"sagittal": vol[:, :, s], "coronal": vol[:, s, :], "axial": vol[s, :, :]}[view]


def ref_best_slice(act: np.ndarray, mask: np.ndarray, view: str) -> int:
    """The slice with the largest activation sum inside the mask (no mask anywhere: the
    largest activation sum; all zero: the middle)."""
    axis = {"sagittal": 2, "coronal": 1, "axial": 0}[view]
    n = act.shape[axis]
    for vol in (np.where(mask, np.maximum(act, 0), 0.0), mask.astype(float), np.abs(act)):
        score = [float(ref_slice(vol, view, s).sum()) for s in range(n)]
        if max(score) > 0:
            return int(np.argmax(score))
    return n // 2


def check_image(png: bytes, patch: np.ndarray, act: np.ndarray, mask: np.ndarray, T: float,
                view: str, s: int, mode: str = "overlay", min_on: int = 1) -> None:
    """Decode the widget's PNG and compare each voxel's pixel block with the expected colour."""
    rgb = decode_png(png).astype(np.float64)
    assert rgb.shape == (96 * SCALE, 96 * SCALE, 3)
    blocks = rgb.reshape(96, SCALE, 96, SCALE, 3)
    assert np.all(blocks == blocks[:, :1, :, :1]), "each voxel must be a uniform SCALE x SCALE block"
    img = blocks[:, 0, :, 0]
    ct, a, m = ref_slice(patch, view, s).astype(np.float64), ref_slice(act, view, s), ref_slice(mask, view, s)
    grey = np.clip((ct - LO) / (HI - LO), 0, 1) * 255
    assert m.sum() >= min_on, "the test slice must show some of the mask"
    off = ~m
    if mode == "overlay":
        low, high = (float(act[mask].min()), float(act[mask].max())) if mask.any() else (T, T)
        t = np.clip((a - low) / (high - low), 0, 1) if high > low else np.ones_like(a)
        colour = np.stack([np.full_like(t, 255.0), 255.0 * t, np.zeros_like(t)], axis=-1)
        expected = 0.5 * grey[..., None] + 0.5 * colour
        bad_on = np.abs(img - expected).max(axis=-1) > 1.0
        bad_off = np.abs(img - grey[..., None]).max(axis=-1) > 0.5 + 1e-9
        assert not (bad_on & m).any(), (f"{int((bad_on & m).sum())} of {int(m.sum())} mask pixels have the "
                                        f"wrong colour, e.g. {img[bad_on & m][:3]} vs {expected[bad_on & m][:3]}")
        assert not (bad_off & off).any(), (f"{int((bad_off & off).sum())} pixels outside the mask are not "
                                           f"plain CT, e.g. {img[bad_off & off][:3]} vs {grey[bad_off & off][:3]}")
    elif mode == "contour":
        # a mask pixel is on the outline when one of its 4 neighbours is outside the mask
        p = np.pad(m, 1)
        edge = m & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
        assert np.all(img[edge] == [0, 255, 255])
        rest = ~edge
        assert np.abs(img[rest] - grey[rest][:, None]).max(initial=0) <= 0.5 + 1e-9
    else:
        assert np.abs(img - grey[..., None]).max() <= 0.5 + 1e-9


def parse_readout(text) -> tuple[int, str, int]:
    """(unit, view, slice) from the readout line (an Explorer or its text)."""
    text = getattr(text, "readout_text", text)
    m = re.search(r"unit (\d+) .*?(sagittal|coronal|axial) slice (\d+)", text)
    assert m, text
    return int(m[1]), m[2], int(m[3])


def parse_status(text) -> tuple[int, str, int]:
    """(unit, view, slice) from the status line (an Explorer or its text)."""
    text = getattr(text, "status_text", text)
    m = re.search(r"unit (\d+), (sagittal|coronal|axial) slice (\d+)", text)
    assert m, text
    return int(m[1]), m[2], int(m[3])
