"""The voxel grid a scan is drawn on, and the canvas of HU / vertebra / concept arrays.

Structures are drawn directly on the scan's voxel centres (sub-sampled along thick slices,
see :func:`~vfcore.phantom.acquisition.supersampling`), each inside its own bounding box.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .acquisition import supersampling
from .anatomy import Frame

F32 = np.float32


class Grid:
    """The scan's voxel grid in RAS order (axis 0 -> x, 1 -> y, 2 -> z), drawn with sub-samples."""

    def __init__(self, lo, hi, spacing):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.shape = tuple(int(round((h - l) / s)) for l, h, s in zip(lo, hi, spacing))
        self.f = supersampling(spacing)
        self.rshape = tuple(n * k for n, k in zip(self.shape, self.f))
        self.rspacing = self.spacing / np.asarray(self.f)
        self.axes = [self.lo[i] + (np.arange(self.rshape[i]) + 0.5) * self.rspacing[i]
                     for i in range(3)]
        self.out_axes = [self.lo[i] + (np.arange(self.shape[i]) + 0.5) * self.spacing[i]
                         for i in range(3)]

    def window(self, world_pts: np.ndarray):
        """Index slices (render grid) of the box around ``world_pts`` (n, 3); None if outside."""
        wmin, wmax = world_pts.min(axis=0), world_pts.max(axis=0)
        sl = []
        for i in range(3):
            a = int(math.floor((wmin[i] - self.lo[i]) / self.rspacing[i] - 0.5))
            b = int(math.ceil((wmax[i] - self.lo[i]) / self.rspacing[i] - 0.5)) + 1
            a, b = max(a, 0), min(b, self.rshape[i])
            if a >= b:
                return None
            sl.append(slice(a, b))
        return tuple(sl)

    def local(self, sl, frame: Frame):
        """Local coordinates (x, y, z) of the render voxels in ``sl``, float32 arrays."""
        d = [(self.axes[i][sl[i]] - frame.o[i]) for i in range(3)]
        out = []
        for e in (frame.e_l, frame.e_a, frame.e_s):
            out.append((e[0] * d[0]).astype(F32)[:, None, None]
                       + (e[1] * d[1]).astype(F32)[None, :, None]
                       + (e[2] * d[2]).astype(F32)[None, None, :])
        return out


def box(frame: Frame, lo, hi) -> np.ndarray:
    """World corners of the local box [lo, hi]."""
    c = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return frame.to_world(c)


class Canvas:
    """Render-grid arrays being drawn: HU (float32), vertebra label and concept (uint8)."""

    def __init__(self, grid: Grid, hu: np.ndarray, concept: np.ndarray, rng: np.random.Generator):
        self.grid = grid
        self.rng = rng
        self.hu = hu
        self.concept = concept
        self.vert = np.zeros(grid.rshape, dtype=np.uint8)
        #: half-size (mm) of a drawn sample, for the partial volume of thin cortices
        self.aa = 0.5 * float(max(grid.rspacing))

    def paint(self, sl, mask, hu, concept, vert=0):
        """Write ``hu`` / ``concept`` / ``vert`` (scalars or arrays over the window) where ``mask``."""
        if not mask.any():
            return
        H, C, V = self.hu[sl], self.concept[sl], self.vert[sl]
        H[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        C[mask] = concept[mask] if isinstance(concept, np.ndarray) else concept
        V[mask] = vert[mask] if isinstance(vert, np.ndarray) else vert


def noise_attenuation(sigma_vox) -> float:
    """Standard deviation of white noise after ``gaussian_filter`` with these sigmas."""
    g = 1.0
    for s in sigma_vox:
        if s > 0:
            imp = np.zeros(64)
            imp[32] = 1.0
            k = ndimage.gaussian_filter1d(imp, s)
            g *= float(np.sqrt((k ** 2).sum()))
    return g
