"""Independent references for the explorer's picture, shared by the kernel-side and browser
tests: the slice of a (I, P, L) volume written out per view, the best slice as a plain loop,
and the expected colour of every pixel (HU window, orange blend inside M_k = A_k > T_k, yellow
outline) checked against the PNG the widget sends."""
from __future__ import annotations

import re

import numpy as np

from vfcore.explorer import DISPLAY_WINDOW_HU, SCALE, decode_png

LO, HI = DISPLAY_WINDOW_HU


def ref_slice(vol: np.ndarray, view: str, s: int) -> np.ndarray:
    return {"sagittal": vol[:, :, s], "coronal": vol[:, s, :], "axial": vol[s, :, :]}[view]


def ref_best_slice(amap: np.ndarray, T: float, view: str) -> int:
    """The slice with the largest sum of the activation above T (none above T: the largest
    activation sum; all zero: the middle)."""
    axis = {"sagittal": 2, "coronal": 1, "axial": 0}[view]
    m = np.where(amap > T, amap, 0.0)
    if not m.any():
        m = amap
        if not m.any():
            return amap.shape[axis] // 2
    return int(np.argmax([ref_slice(m, view, s).sum() for s in range(amap.shape[axis])]))


def check_image(png: bytes, patch: np.ndarray, amap: np.ndarray, T: float, view: str, s: int,
                mode: str = "overlay", min_on: int = 1) -> None:
    """Decode the widget's PNG and compare each voxel's pixel block with the expected colour."""
    rgb = decode_png(png).astype(np.float64)
    assert rgb.shape == (96 * SCALE, 96 * SCALE, 3)
    blocks = rgb.reshape(96, SCALE, 96, SCALE, 3)
    assert np.all(blocks == blocks[:, :1, :, :1]), "each voxel must be a uniform SCALE x SCALE block"
    img = blocks[:, 0, :, 0]
    ct, act = ref_slice(patch, view, s).astype(np.float64), ref_slice(amap, view, s)
    grey = np.clip((ct - LO) / (HI - LO), 0, 1) * 255
    sure_on, sure_off = act > T + 1e-4 * max(1.0, abs(T)), act < T - 1e-4 * max(1.0, abs(T))
    assert sure_on.sum() >= min_on, "the test slice must show some of the mask"
    if mode == "overlay":
        expected_on = 0.55 * grey[..., None] + 0.45 * np.array([255, 64, 0])
        assert np.abs(img[sure_on] - expected_on[sure_on]).max(initial=0) <= 0.5 + 1e-9
        assert np.abs(img[sure_off] - grey[sure_off][:, None]).max(initial=0) <= 0.5 + 1e-9
    elif mode == "contour":
        # a mask pixel is on the outline when one of its 4 neighbours is outside the mask
        m = np.pad(act > T, 1)
        edge = (act > T) & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])
        yellow = np.all(img == [255, 230, 0], axis=-1)
        inner = sure_on & ~edge
        assert np.all(np.abs(img[inner] - grey[inner][:, None]) <= 0.5)
        assert np.all(np.abs(img[sure_off] - grey[sure_off][:, None]) <= 0.5)
        assert yellow[edge & sure_on].mean() > 0.95
    else:
        assert np.abs(img - grey[..., None]).max() <= 0.5


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
