"""The smooth tissues around the spine, drawn per axial slice: body outline, fat, muscles, lungs,
vessels, kidneys and the viscera (see :func:`draw_background`)."""
from __future__ import annotations

import math

import numpy as np

from .anatomy import ScanSpec
from .canvas import F32, Grid

# background tissue classes -> (HU, concept)
_AIR, _FAT, _MUSCLE, _LUNG, _VISCERA, _AORTA, _VEIN, _KIDNEY, _PSOAS, _SKIN = range(10)
_TISSUE_CONCEPT = np.array([27, 23, 20, 22, 25, 24, 24, 25, 21, 25], dtype=np.uint8)


def _per_slice(spec: ScanSpec, z: np.ndarray):
    """Spine centre (x, y) and interpolated level sizes at each axial position z."""
    s_curve, p = spec.curve_s, spec.curve_p
    order = np.argsort(-p[:, 2])
    s = np.interp(-z, -p[order, 2], s_curve[order])
    cx = np.interp(s, s_curve, p[:, 0])
    cy = np.interp(s, s_curve, p[:, 1])
    verts = spec.vertebrae + [spec.sacrum]
    sv = np.array([v.s for v in verts])
    get = lambda f: np.interp(s, sv, [f(v) for v in verts])  # noqa: E731
    return {
        "cx": cx, "cy": cy, "q": get(lambda v: v.q), "W": get(lambda v: v.W),
        "D": get(lambda v: v.D), "canal": get(lambda v: v.post["canal_ap"]),
        "back": get(lambda v: 0.5 * v.D + v.post["canal_ap"] + v.post["lam_t"]
                    + v.post["sp_len"] * math.cos(math.radians(v.post["sp_angle"]))),
    }


class _Slices:
    """Per-slice ellipses around the spine, evaluated only inside their bounding box."""

    def __init__(self, grid: Grid, cx: np.ndarray, cy: np.ndarray):
        self.xo, self.yo, self.zo = grid.out_axes
        self.cx, self.cy = cx, cy

    def _params(self, x0, y0, ax, by, zmask):
        nz = len(self.zo)
        x0, y0, ax, by = (np.broadcast_to(np.asarray(v, dtype=np.float64), (nz,)) for v in (x0, y0, ax, by))
        valid = (ax > 0) & (by > 0)
        if zmask is not None:
            valid = valid & zmask
        return x0, y0, ax, by, valid

    def ellipse(self, x0, y0, ax, by, zmask=None):
        """(slices, mask) of {((x - cx - x0) / ax)^2 + ((y - cy - y0) / by)^2 <= 1}, or None."""
        x0, y0, ax, by, valid = self._params(x0, y0, ax, by, zmask)
        if not valid.any():
            return None
        ks = np.flatnonzero(valid)
        k = slice(ks[0], ks[-1] + 1)
        xc, yc = (self.cx + x0)[k], (self.cy + y0)[k]
        i0, i1 = np.searchsorted(self.xo, [(xc - ax[k]).min(), (xc + ax[k]).max()])
        j0, j1 = np.searchsorted(self.yo, [(yc - by[k]).min(), (yc + by[k]).max()])
        if i0 >= i1 or j0 >= j1:
            return None
        sl = (slice(i0, i1), slice(j0, j1), k)
        return sl, self.inside(sl, x0, y0, ax, by, zmask)

    def inside(self, sl, x0, y0, ax, by, zmask=None):
        """The ellipse's mask on the window ``sl`` (any window)."""
        x0, y0, ax, by, valid = self._params(x0, y0, ax, by, zmask)
        k = sl[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            A = ((self.xo[sl[0], None] - (self.cx + x0)[None, k]) / ax[None, k]) ** 2
            B = ((self.yo[sl[1], None] - (self.cy + y0)[None, k]) / by[None, k]) ** 2
        m = (A.astype(F32)[:, None, :] + B.astype(F32)[None, :, :]) <= 1
        m &= valid[k][None, None, :]
        return m


def _fill(cls, region, value, only=None):
    """Set ``cls`` to ``value`` inside an ellipse region (where it is ``only``, if given)."""
    if region is None:
        return
    sl, m = region
    view = cls[sl]
    if only is not None:
        m &= view == only
    view[m] = value


def draw_background(spec: ScanSpec, grid: Grid, rng: np.random.Generator):
    """HU and concept arrays on the output grid (the smooth tissues around the spine)."""
    bg = spec.background
    xo, yo, zo = grid.out_axes
    ps = _per_slice(spec, zo)
    el = _Slices(grid, ps["cx"], ps["cy"])
    q, W, D, canal = ps["q"], ps["W"], ps["D"], ps["canal"]
    cls = np.full(grid.shape, _VISCERA, dtype=np.uint8)
    # torso outline: an ellipse (half-width torso_a) whose back lies behind the spinous
    # processes; inwards from the skin: subcutaneous fat, then the muscle of the back, chest
    # and abdominal wall (evaluated only on the rows that reach this shell).  The depth below
    # the skin is measured along the ray from the torso's centre: |d| (1 / rho - 1).
    y_skin = -(ps["back"] + 8.0 + bg["fat_back"])
    yc = bg["torso_y"]
    B = yc - y_skin
    A = bg["torso_a"]
    dx2 = ((xo[:, None] - ps["cx"][None, :]) ** 2).astype(F32)                # (nx, nz)
    dy2 = ((yo[:, None] - ps["cy"][None, :] - yc) ** 2).astype(F32)           # (ny, nz)
    Ex, Ey = dx2 / F32(A * A), dy2 / (B * B).astype(F32)[None, :]
    shell = bg["fat_back"] + bg["wall"] + 1.0
    thr = ((1.0 - shell / np.maximum(B, A)) ** 2).astype(F32)                 # rho^2 above: shell
    rows = np.flatnonzero((Ey + Ex.max(axis=0)[None, :] > thr[None, :]).any(axis=1))
    if rows.size:
        j = slice(rows[0], rows[-1] + 1)
        rho = np.sqrt(Ex[:, None, :] + Ey[None, j, :])
        depth = np.sqrt(dx2[:, None, :] + dy2[None, j, :]) * (F32(1.0) / np.maximum(rho, F32(1e-3)) - F32(1.0))
        depth[rho > 1] = -1.0
        view = cls[:, j, :]
        view[depth < shell - 1.0] = _MUSCLE
        view[depth < bg["fat_back"]] = _FAT
        view[depth < 2.0] = _SKIN
        view[depth < 0] = _AIR
        del depth, rho
    # paraspinal muscles behind the laminae and transverse processes
    y_c = -(0.5 * D + 0.5 * canal)
    for side in (-1, 1):
        _fill(cls, el.ellipse(side * (0.25 * W + 14.0), y_c - 20.0, 0.25 * W + 24.0, canal + 14.0),
              _MUSCLE, _VISCERA)
    # kidneys and psoas in the lumbar region
    k = np.sqrt(np.clip(1 - ((q - 12.3) / 1.6) ** 2, 0, None))
    for side in (-1, 1):
        _fill(cls, el.ellipse(side * (0.5 * W + 52.0), -0.05 * D, 26 * k, 34 * k), _KIDNEY, _VISCERA)
    r = bg["psoas"] * np.interp(q, [11.3, 12.0, 16.6], [0.0, 9.0, 23.0])
    for side in (-1, 1):
        _fill(cls, el.ellipse(side * (0.5 * W + 0.65 * r), -0.1 * D, r, 1.15 * r), _PSOAS, _VISCERA)
    # lungs in the thoracic cavity beside the spine and the mediastinum, down to the
    # diaphragm, which is lower at the back and at the sides (costophrenic recesses)
    thorax = q < bg["lung_limit"] + 0.8
    for side in (-1, 1):
        region = el.ellipse(side * (0.5 * W + 52.0), 0.1 * D, 58.0, 0.5 * D + 58.0, thorax)
        if region is None:
            continue
        sl, m = region
        m &= ~el.inside(sl, 0.0, 0.5 * D + 40.0, 0.5 * W + 12.0, 58.0)           # mediastinum
        m &= ~el.inside(sl, 0.0, -0.1 * D, 0.5 * W + 7.0, 0.6 * D + 12.0)       # spine
        kz = sl[2]
        ly = bg["lung_limit"] - 1.3 * np.clip(
            (yo[sl[1], None] - ps["cy"][None, kz] + 0.3 * D[None, kz]) / 50.0, 0, 1)
        lx = 0.7 * np.clip((np.abs(xo[sl[0], None] - ps["cx"][None, kz]) - 0.5 * W[None, kz] - 10.0)
                           / 60.0, 0, 1)
        m &= q[kz].astype(F32)[None, None, :] < ly.astype(F32)[None, :, :] + lx.astype(F32)[:, None, :]
        view = cls[sl]
        m &= view == _VISCERA
        view[m] = _LUNG
    # great vessels in front of the spine
    aorta = q < 15.3
    _fill(cls, el.ellipse(bg["aorta_x"] - 6.0 * (q < 11.5), 0.5 * D + 13.0, 11.5, 11.5, aorta), _AORTA)
    for side in (-1, 1):
        _fill(cls, el.ellipse(side * 14.0, 0.5 * D + 12.0, 6.5, 6.5, ~aorta), _AORTA)
    _fill(cls, el.ellipse(20.0, 0.5 * D + 10.0, 11.0, 9.0, (q > 11.0) & (q < 15.5)), _VEIN)
    # HU by tissue; the viscera are a smooth patchwork of fat and soft tissue: a sum of plane
    # waves cos(k.x + phase), written as one matrix product of (x, y) and z factors
    c = spec.acq.contrast
    lut = np.array([-1000, -105, 48, -860, 0, 220 if c else 42, 160 if c else 40,
                    170 if c else 32, 50, 30], dtype=F32)
    hu = lut[cls]
    cols_xy, rows_z = [], []
    for i, (kx, ky, kz, ph) in enumerate(bg["waves"]):
        kv = np.array([kx, ky, kz]) / (np.linalg.norm([kx, ky, kz]) + 1e-9)
        kv *= 2 * np.pi / (22.0 + 9.0 * i)          # wavelengths 22-67 mm
        pxy = kv[0] * xo[:, None] + kv[1] * yo[None, :]
        pz = kv[2] * zo + ph
        cols_xy += [np.cos(pxy), -np.sin(pxy)]
        rows_z += [np.cos(pz), np.sin(pz)]
    # chest: mostly soft tissue (heart, vessels, oesophagus); abdomen: fat and bowel
    cols_xy.append(np.ones((len(xo), len(yo))))
    rows_z.append(np.where(q < bg["lung_limit"], 1.6, 0.2))
    M = np.stack(cols_xy, axis=-1).reshape(-1, len(cols_xy)).astype(F32)
    field = (M @ np.stack(rows_z).astype(F32)).reshape(grid.shape)
    vis = cls == _VISCERA
    hu[vis] = (-105.0 + 150.0 / (1.0 + np.exp(-1.8 * field[vis]))).astype(F32)
    del field
    lung = cls == _LUNG
    if lung.any():   # pulmonary vessels: sparse bright dots, spread by the blur later
        dots = rng.random(int(lung.sum()), dtype=F32) > 0.994
        hu[lung] += dots * F32(700.0)
    concept = _TISSUE_CONCEPT[cls]
    return hu, concept
