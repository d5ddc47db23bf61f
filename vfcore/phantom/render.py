"""Draw a :class:`~vfcore.phantom.anatomy.ScanSpec` into voxels: CT (HU), vertebra and concept masks.

Every structure is an implicit shape in its vertebra's local frame (see ``anatomy``),
evaluated with vectorised numpy directly on the scan's voxel centres inside a bounding box,
never on a supersampled copy of the whole scan.  Thick slices (> 1.6 mm) are drawn at about
1 mm and averaged, which gives the partial-volume look of real thick-slice CT; the masks are
taken at the true voxel centres.  Order of drawing (later wins): background (air, fat,
muscle, lungs, vessels, organs), spinal canal, ribs, discs, vertebral bodies, posterior
elements, osteophytes.  Then the reconstruction kernel (Gaussian blur), noise and the
scanner's HU offset, and finally the array is laid out in the scan's orientation code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from .anatomy import SACRUM, Frame, ScanSpec, VertebraSpec, supersampling
from .concepts import disc_value

F32 = np.float32
# background tissue classes -> (HU, concept)
_AIR, _FAT, _MUSCLE, _LUNG, _VISCERA, _AORTA, _VEIN, _KIDNEY, _PSOAS, _SKIN = range(10)
_TISSUE_CONCEPT = np.array([27, 23, 20, 22, 25, 24, 24, 25, 21, 25], dtype=np.uint8)


@dataclass
class Scan:
    """A drawn scan in its final orientation: arrays, affine, body centroids and truth."""

    case: str
    ct: np.ndarray           # int16 HU
    vert: np.ndarray         # uint8 VerSe labels
    concept: np.ndarray      # uint8 concept labels (see vfcore.phantom.concepts)
    affine: np.ndarray
    centroids: dict[int, np.ndarray]   # label -> continuous voxel index (body centre in FOV)
    truth: dict


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


def _box(frame: Frame, lo, hi) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Background: body outline, fat, muscles, lungs, vessels, kidneys (per axial slice)
# ---------------------------------------------------------------------------------------------

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
    # torso outline: a wide ellipse whose back lies behind the spinous processes; skin and a
    # layer of subcutaneous fat at the back (evaluated only on the rows near the back)
    y_skin = -(ps["back"] + 8.0 + bg["fat_back"])
    yc = bg["torso_y"]
    B = yc - y_skin
    A = 175.0
    Ex = (((xo[:, None] - ps["cx"][None, :]) / A) ** 2).astype(F32)        # (nx, nz)
    Ey = (((yo[:, None] - ps["cy"][None, :] - yc) / B[None, :]) ** 2).astype(F32)   # (ny, nz)
    thr = ((1.0 - (bg["fat_back"] + 1.0) / B) ** 2).astype(F32)           # E above this: fat
    rows = np.flatnonzero((Ey + Ex.min(axis=0)[None, :] > thr[None, :]).any(axis=1))
    if rows.size:
        j = slice(rows[0], rows[-1] + 1)
        depth = (F32(1.0) - np.sqrt(Ex[:, None, :] + Ey[None, j, :])) * B.astype(F32)[None, None, :]
        view = cls[:, j, :]
        view[depth < bg["fat_back"]] = _FAT
        view[depth < 2.0] = _SKIN
        view[depth < 0] = _AIR
        del depth
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


# ---------------------------------------------------------------------------------------------
# Vertebral body
# ---------------------------------------------------------------------------------------------

def body_fields(v: VertebraSpec, x, y, z):
    """Inside-mask and distances (mm) to the endplates and the side wall of body ``v``."""
    top, bot = v.top_bottom(x, y)
    d_top = top - z
    d_bot = z - bot
    half = np.maximum(0.5 * (top - bot), 0.5)
    tn = np.clip((z - 0.5 * (top + bot)) / half, -1.0, 1.0)
    F, d_cs = v.cross_section(x, y, tn)
    inside = (d_top > 0) & (d_bot > 0) & (F < 1)
    return inside, d_top, d_bot, d_cs, tn


def _body_box(v: VertebraSpec):
    a, b = v.W / 2, v.D / 2
    hmax = v.H * max(v.h_ant, v.h_post, 1.0) * 0.5 * 1.15 + 1.0
    grow = 1.0 + (0.15 * v.fracture.loss if v.fracture else 0.0)
    bk = v.fracture.buckle_mm if v.fracture else 0.0
    return (-a * grow - 1, -b * grow - 1, -hmax), (a * grow + 1, b * grow + 1 + bk, hmax)


def body_centre(v: VertebraSpec, step: float = 1.0) -> np.ndarray:
    """Centre of mass (local mm) of the body, integrated on a local grid with soft edges.

    The occupancy of a grid cell is ``clip(0.5 + d / step, 0, 1)`` with ``d`` the signed
    distance to the surface; this is accurate to about 0.01 mm at ``step = 1``.
    """
    lo, hi = _body_box(v)
    ax = [np.arange(lo[i] + step / 2, hi[i], step, dtype=F32) for i in range(3)]
    x, y, z = np.broadcast_arrays(*np.meshgrid(*ax, indexing="ij", sparse=True))
    _, d_top, d_bot, d_cs, _ = body_fields(v, x, y, z)
    d = np.minimum(np.minimum(d_top, d_bot), d_cs)
    w = np.clip(0.5 + d / step, 0, 1).astype(np.float64)
    return np.array([float((c * w).sum() / w.sum()) for c in (x, y, z)])


def draw_body(cv: Canvas, v: VertebraSpec, label: int, concept_value: int | None = None):
    """Cortical shell, endplates, trabecular core and the fracture / confounder signs."""
    lo, hi = _body_box(v)
    sl = cv.grid.window(_box(v.frame, lo, hi))
    if sl is None:
        return
    x, y, z = cv.grid.local(sl, v.frame)
    inside, d_top, d_bot, d_cs, tn = body_fields(v, x, y, z)
    if not inside.any():
        return
    a, b = v.W / 2, v.D / 2
    fr = v.fracture
    hu = np.full(x.shape, v.trab_hu, dtype=F32)
    con = np.full(x.shape, 6, dtype=np.uint8)
    con[(d_cs < 3.0) & (y <= 0.25 * b)] = 5
    con[(d_cs < 3.0) & (y > 0.25 * b)] = 3
    con[y < -b / 3] = 4
    # the signs below lie beneath the endplate layer (EP mm), which keeps its own label
    EP = 2.5
    # degenerative endplate sclerosis next to a degenerated disc (a confounder)
    central = np.clip(1.0 - ((x / a) ** 2 + (y / b) ** 2) / 0.8, 0, 1)
    for amp, d in ((v.sclerosis_sup, d_top), (v.sclerosis_inf, d_bot)):
        if amp:
            w = central * np.exp(-((d / 3.5) ** 2))
            hu += F32(amp) * w
            con[(w > 0.3) & (d < EP + 3.0)] = 11
    # fracture signs: deformation zone, sclerotic condensation band, anterior buckling
    if fr is not None:
        w_sup, w_inf = v.deformation_weights(x, y)
        if fr.buckle_mm:
            t0 = 0.35 if fr.shape == 1 else 0.0
            con[(y > 0.5 * b) & (np.abs(tn - t0) < 0.5) & (d_cs < 4.0)] = 7
        for w, d in ((w_sup, d_top), (w_inf, d_bot)):
            con[(w > 0.25) & (d < EP + 5.0)] = 7
            if fr.band_hu:
                band = (w > 0.3) & (d > 1.2) & (d < fr.band_mm + 1.2)
                hu += np.where(band, F32(fr.band_hu) * w, F32(0))
                con[band & (d >= EP)] = 8
    con[d_top < EP] = 1
    con[d_bot < EP] = 2
    # Schmorl nodes: sclerotic rim around the pit
    for node in v.schmorl:
        r2 = (x - node.x0) ** 2 + (y - node.y0) ** 2
        d = d_top if node.side > 0 else d_bot
        rim = (r2 < (node.radius + 1.5) ** 2) & (d < node.depth + 1.5)
        hu += np.where(rim, F32(260.0), F32(0))
        con[rim] = 9
    # cortex: thin shell and endplates (thicker at a buckled anterior wall)
    t_c = 0.9 + (0.5 if fr is not None and fr.buckle_mm else 0.0) * (y > 0.5 * b)
    # trabecular texture: smooth random field, coarser along the body's axis (vertical trabeculae)
    sig = np.array([0.7, 0.7, 2.2]) / cv.grid.rspacing
    tex = ndimage.gaussian_filter(cv.rng.standard_normal(x.shape, dtype=F32), sig, truncate=2.5)
    tex *= F32(1.0 / _noise_attenuation(sig))
    hu += tex * F32(35.0 + 0.25 * v.trab_hu)
    h = F32(cv.aa)
    shell = np.maximum(np.maximum(_shell(d_top, F32(1.1), h), _shell(d_bot, F32(1.1), h)),
                       _shell(d_cs, F32(t_c), h))
    hu += (F32(v.cortex_hu) - hu) * shell
    if v.vein:  # basivertebral vein: a notch in the middle of the posterior wall
        vein = (np.abs(x) < 2.5) & (y < -0.55 * b) & (np.abs(tn) < 0.12)
        hu = np.where(vein, F32(35.0), hu)
    if concept_value is not None:
        con[:] = concept_value
    cv.paint(sl, inside, hu, con, label)


# ---------------------------------------------------------------------------------------------
# Discs
# ---------------------------------------------------------------------------------------------

def draw_disc(cv: Canvas, spec: ScanSpec, i: int):
    """The disc fills exactly the space between the two endplate surfaces around it."""
    d = spec.discs[i]
    up = spec.vertebrae[d.upper]
    lower_is_sacrum = d.lower >= len(spec.vertebrae)
    low = spec.sacrum if lower_is_sacrum else spec.vertebrae[d.lower]
    a = max(up.W, low.W) / 2 + 3
    b = max(up.D, low.D) / 2 + 3
    # how far the endplates can bulge/tilt away from the disc's own mid-plane
    slack = 2.0 + d.height * 0.5
    for v, dep in ((up, up.dep_inf), (low, low.dep_sup)):
        tilt = math.sqrt(max(0.0, 1.0 - float(v.frame.e_s @ d.frame.e_s) ** 2))
        pits = max([n.depth for n in v.schmorl], default=0.0)
        slack = max(slack, 2.0 + d.height * 0.5 + 0.65 * abs(v.h_ant - v.h_post) * v.H
                    + dep + pits + b * tilt + abs(v.centre_height - v.H) * 0.5)
    sl = cv.grid.window(_box(d.frame, (-a, -b, -slack), (a, b, slack)))
    if sl is None:
        return
    xu, yu, zu = cv.grid.local(sl, up.frame)
    xl, yl, zl = cv.grid.local(sl, low.frame)
    bot_u = up.top_bottom(xu, yu)[1]
    top_l = low.top_bottom(xl, yl)[0]
    between = (zu < bot_u) & (zl > top_l)
    one = np.ones((1, 1, 1), dtype=F32)
    F = np.minimum(up.cross_section(xu, yu, one)[0], low.cross_section(xl, yl, one)[0])
    disc = between & (F < 1.08)
    # the disc must not reach far beyond the endplates (guards the far side of tilted frames)
    disc &= (zu > bot_u - d.height - 8.0) & (zl < top_l + d.height + 8.0)
    if not disc.any():
        return
    hu = np.where(F < 0.36, F32(d.hu - 12.0), F32(d.hu + 12.0))
    if d.vacuum:
        xd, yd, zd = cv.grid.local(sl, d.frame)
        gas = (xd / 7.0) ** 2 + ((yd - 0.2 * b) / 5.0) ** 2 + (zd / max(d.height * 0.3, 0.8)) ** 2 < 1
        hu = np.where(gas, F32(-650.0), hu)
    lower_label = SACRUM if lower_is_sacrum else low.label
    con = np.full(xu.shape, disc_value(lower_label, d.degenerated), dtype=np.uint8)
    # Schmorl pits of either endplate are filled with disc material: concept 9
    for v, xx, yy, zz, side in ((up, xu, yu, zu, -1), (low, xl, yl, zl, 1)):
        for node in v.schmorl:
            if node.side != side:
                continue
            r2 = (xx - node.x0) ** 2 + (yy - node.y0) ** 2
            rim_top, rim_bot = v._rim(xx, yy)
            pit = (r2 < node.radius ** 2) & ((zz > rim_bot) if side < 0 else (zz < rim_top))
            con[pit] = 9
    cv.paint(sl, disc, hu, con, 0)


# ---------------------------------------------------------------------------------------------
# Posterior elements, canal, ribs
# ---------------------------------------------------------------------------------------------

def _capsule(x, y, z, p0, p1, r0, r1):
    """Inside mask and depth (mm) of a tapered round capsule from p0 to p1 (local mm)."""
    d = np.asarray(p1, dtype=np.float64) - np.asarray(p0, dtype=np.float64)
    L2 = float(d @ d)
    px, py, pz = x - F32(p0[0]), y - F32(p0[1]), z - F32(p0[2])
    t = np.clip((px * F32(d[0]) + py * F32(d[1]) + pz * F32(d[2])) / F32(L2), 0, 1)
    dist = np.sqrt((px - t * F32(d[0])) ** 2 + (py - t * F32(d[1])) ** 2 + (pz - t * F32(d[2])) ** 2)
    r = F32(r0) + F32(r1 - r0) * t
    return dist < r, r - dist


def _capsule_box(p0, p1, r):
    p = np.array([p0, p1], dtype=np.float64)
    return p.min(axis=0) - r - 1, p.max(axis=0) + r + 1


def _shell(depth, t, h):
    """Fraction of a voxel (half-size ``h`` mm along the normal) inside a shell 0 <= depth <= t.

    The analytic partial volume of a thin cortex: without it a 1 mm cortex sampled every
    1.2 mm shows up as a dashed line.
    """
    return np.clip((np.minimum(depth + h, t) - np.maximum(depth - h, 0)) / (2 * h), 0, 1)


def _bone_hu(depth, cortex_mm, cortex_hu, marrow_hu, h):
    """HU of bone with a cortex of ``cortex_mm`` around marrow, partial volume included."""
    return F32(marrow_hu) + F32(cortex_hu - marrow_hu) * _shell(depth, F32(cortex_mm), F32(h))


def _canal_geometry(v: VertebraSpec):
    P = v.post
    b = v.D / 2
    y_c = -b - P["canal_ap"] / 2 + 1.0
    return y_c, P["canal_w"] / 2, P["canal_ap"] / 2


def draw_canal(cv: Canvas, v: VertebraSpec, above_h: float, below_h: float):
    """Spinal canal segment of vertebra ``v``: epidural fat, dural sac (CSF), cord above L1/2."""
    y_c, ax, by = _canal_geometry(v)
    z0, z1 = -(v.H / 2 + below_h / 2 + 1.0), v.H / 2 + above_h / 2 + 1.0
    sl = cv.grid.window(_box(v.frame, (-ax - 1, y_c - by - 1, z0), (ax + 1, y_c + by + 1, z1)))
    if sl is None:
        return
    x, y, z = cv.grid.local(sl, v.frame)
    F = (x / ax) ** 2 + ((y - y_c) / by) ** 2
    canal = (F <= 1) & (z >= z0) & (z <= z1)
    hu = np.full(x.shape, -60.0 if v.q > 11 else -10.0, dtype=F32)
    sac = (x / (0.88 * ax)) ** 2 + ((y - y_c - 0.05 * by) / (0.85 * by)) ** 2 <= 1
    hu = np.where(sac, F32(12.0), hu)
    if v.q < 12.6:
        cord = (x / 4.8) ** 2 + ((y - y_c - 0.1 * by) / 4.0) ** 2 <= 1
        hu = np.where(cord, F32(36.0), hu)
    cv.paint(sl, canal, hu, 18, 0)


def draw_posterior(cv: Canvas, v: VertebraSpec, label: int, below_h: float):
    """Pedicles, laminae, articular, spinous and transverse processes of vertebra ``v``."""
    P = v.post
    H, b = v.H, v.D / 2
    y_c, ax_c, by_c = _canal_geometry(v)
    pw, lam = P["ped_w"], P["lam_t"]
    ax_o, by_o = ax_c + pw, by_c + lam
    lum = P["lumbar"]
    z_ped = 0.12 * H
    cort, marrow, cortex_hu = 1.3, 200.0 + 1.0 * v.trab_hu, v.cortex_hu * 1.05
    z_lo = -(0.5 * H + 0.35 * below_h + 2.0)
    # --- neural arch (pedicles + laminae) and articular processes -------------------------
    lo = (-ax_o - 8, y_c - by_o - 2, z_lo - 0.6 * below_h - 8)
    hi = (ax_o + 8, -b + 4, 0.5 * H + 12)
    sl = cv.grid.window(_box(v.frame, lo, hi))
    if sl is not None:
        x, y, z = cv.grid.local(sl, v.frame)
        Fc = (x / ax_c) ** 2 + ((y - y_c) / by_c) ** 2
        Fo = (x / ax_o) ** 2 + ((y - y_c) / by_o) ** 2
        tau = np.clip((y_c - y) / by_c, 0, 1)        # 0 at the pedicles, 1 at the laminae
        zl = (z_ped - P["ped_h"] / 2) * (1 - tau) + z_lo * tau
        zh = (z_ped + P["ped_h"] / 2) * (1 - tau) + 0.3 * H * tau
        ring = (Fc > 1) & (Fo <= 1) & (y < -b + 3.0) & (z > zl) & (z < zh)
        ring &= ~((np.abs(x) < 0.8 * ax_c) & (y > y_c))
        depth = np.minimum.reduce([(np.sqrt(Fc) - 1) * min(ax_c, by_c),
                                   (1 - np.sqrt(Fo)) * min(ax_o, by_o), z - zl, zh - z])
        hu = _bone_hu(depth, cort, cortex_hu, marrow, cv.aa)
        con = np.where(y > y_c - 0.3 * by_c, np.uint8(13), np.uint8(14))
        # articular processes: superior ones rise above the pedicles, inferior ones hang below
        # the laminae; lumbar facets are side by side (sagittal), thoracic ones front/back
        xs = ax_c + pw * (0.45 + 0.35 * lum)
        xi = ax_c + pw * (0.45 - 0.25 * lum)
        ys = y_c - by_c * (0.1 + 0.25 * lum)
        yi = y_c - by_c * (0.55 + 0.2 * lum) - 3.0 * (1 - lum)
        for sx in (-1, 1):
            for (cx, cy, cz, rz) in ((sx * xs, ys, z_ped + P["ped_h"] / 2 + 3.0, 6.0 + 2 * lum),
                                     (sx * xi, yi, z_lo - 2.0, 6.0 + 2 * lum)):
                Fa = ((x - cx) / 3.8) ** 2 + ((y - cy) / 5.0) ** 2 + ((z - cz) / rz) ** 2
                facet = (Fa <= 1) & ~ring
                hu = np.where(facet, _bone_hu((1 - np.sqrt(Fa)) * 3.8, cort, cortex_hu, marrow, cv.aa), hu)
                con = np.where(facet, np.uint8(17), con)
                ring |= facet
        cv.paint(sl, ring, hu, con, label)
    # --- spinous process: a rounded plate, slender and sloping down in the thoracic spine,
    # a horizontal "hatchet" in the lumbar spine -----------------------------------------
    th = math.radians(P["sp_angle"])
    p0 = np.array([0.0, y_c - by_c - 0.5 * lam, 0.5 * (z_lo + 0.3 * H)])
    axis = np.array([0.0, -math.cos(th), -math.sin(th)])
    normal = np.array([0.0, -axis[2], axis[1]])          # in the sagittal plane, "up"
    L, rh, rw = P["sp_len"], P["sp_rh"], P["sp_rw"]
    pc = p0 + 0.5 * L * axis
    lo, hi = _capsule_box(p0, p0 + L * axis, max(rh, rw) * 1.6)
    sl = cv.grid.window(_box(v.frame, lo, hi))
    if sl is not None:
        x, y, z = cv.grid.local(sl, v.frame)
        u = (y - F32(pc[1])) * F32(axis[1]) + (z - F32(pc[2])) * F32(axis[2])   # along
        h = (y - F32(pc[1])) * F32(normal[1]) + (z - F32(pc[2])) * F32(normal[2])
        t = np.clip(u / F32(L) + F32(0.5), 0, 1)                                   # 0 root, 1 tip
        r_h = F32(rh) * (F32(1.2 - 0.45 * (1 - lum)) + F32(0.25 * (1 - lum)) * t * t)
        r_w = F32(rw) * (F32(0.85) + F32(0.3) * t)
        U, Hh, X = u / F32(0.5 * L + 0.5 * rh), h / r_h, x / r_w
        U2, H2, X2 = U * U, Hh * Hh, X * X
        # a rounded box: |u|^4 along the process, |h|^4 (lumbar plate) or h^2 (thoracic bar)
        Fs = U2 * U2 + X2 + (H2 * H2 if lum > 0.5 else H2)
        sp = Fs <= 1
        depth = (F32(1) - Fs) * F32(0.5) * np.minimum(r_w, r_h)
        cv.paint(sl, sp, _bone_hu(depth, cort, cortex_hu, marrow, cv.aa), 15, label)
    # --- transverse processes -----------------------------------------------------------
    back, up = math.radians(P["tp_back"]), math.radians(P["tp_up"])
    L = P["tp_len"] + 0.5 * pw
    for sx in (-1, 1):
        q0 = np.array([sx * (ax_c + 0.5 * pw), y_c - 2.0 + 3.0 * lum, z_ped])
        q1 = q0 + L * np.array([sx * math.cos(back) * math.cos(up), -math.sin(back), math.sin(up)])
        r = P["tp_r"]
        lo, hi = _capsule_box(q0, q1, r * 1.4)
        sl = cv.grid.window(_box(v.frame, lo, hi))
        if sl is None:
            continue
        x, y, z = cv.grid.local(sl, v.frame)
        inside, depth = _capsule(x, y, z, q0, q1, r, r * (1.35 - 0.4 * lum))
        cv.paint(sl, inside, _bone_hu(depth, cort, cortex_hu, marrow, cv.aa), 16, label)


def rib_points(v: VertebraSpec, above_h: float) -> list[np.ndarray]:
    """Polylines (local mm) of the left and right rib: head at the disc above, neck, angle, shaft."""
    P = v.post
    a, b = v.W / 2, v.D / 2
    y_c, ax_c, by_c = _canal_geometry(v)
    back, up = math.radians(P["tp_back"]), math.radians(P["tp_up"])
    L = P["tp_len"] + 0.5 * P["ped_w"]
    out = []
    for sx in (-1, 1):
        head = np.array([sx * 0.8 * a, -0.55 * b, 0.5 * v.H + 0.3 * above_h])
        tp0 = np.array([sx * (ax_c + 0.5 * P["ped_w"]), y_c - 2.0, 0.12 * v.H])
        tip = tp0 + L * np.array([sx * math.cos(back) * math.cos(up), -math.sin(back), math.sin(up)])
        tub = tip + np.array([0.0, 5.0, -3.0])
        p2 = tub + np.array([sx * 24.0, -3.0, -8.0])
        p3 = p2 + np.array([sx * 28.0, 20.0, -14.0])
        p4 = p3 + np.array([sx * 18.0, 45.0, -16.0])
        out.append(np.array([head, tub, p2, p3, p4]))
    return out


def draw_rib(cv: Canvas, v: VertebraSpec, above_h: float, cortex_shift: float):
    """Left and right rib of a thoracic vertebra: tapered round tubes along :func:`rib_points`."""
    r = 4.2 + 0.05 * v.q
    for pts in rib_points(v, above_h):
        for p0, p1 in zip(pts[:-1], pts[1:]):
            lo, hi = _capsule_box(p0, p1, r)
            sl = cv.grid.window(_box(v.frame, lo, hi))
            if sl is None:
                continue
            x, y, z = cv.grid.local(sl, v.frame)
            inside, depth = _capsule(x, y, z, p0, p1, r * 0.9, r)
            inside &= cv.vert[sl] == 0
            cv.paint(sl, inside, _bone_hu(depth, 1.2, 700.0 + cortex_shift, 180.0 + 0.3 * v.trab_hu, cv.aa), 19, 0)


def draw_osteophytes(cv: Canvas, v: VertebraSpec, label: int):
    """Bony spurs (a lip along the endplate rim) reaching outwards and towards the disc."""
    a, b = v.W / 2, v.D / 2
    for o in v.osteophytes:
        ang = o.theta
        out = np.array([math.sin(ang), math.cos(ang), 0.0])        # 0 = anterior, + = left
        rim = np.array([a * math.sin(ang), b * math.cos(ang), 0.0]) * 0.97
        top, bot = v._rim(rim[0:1], rim[1:2])
        zr = float(top[0]) if o.side > 0 else float(bot[0])
        c = rim + out * (0.3 * o.length)
        c[2] = zr + o.side * 0.15 * o.height
        rad = np.array([0.6 * o.length, 2.2 * o.length, o.height])  # outward, along the rim, up
        lo, hi = c - rad.max() - 1, c + rad.max() + 1
        sl = cv.grid.window(_box(v.frame, lo, hi))
        if sl is None:
            continue
        x, y, z = cv.grid.local(sl, v.frame)
        xr = (x - F32(c[0])) * F32(out[0]) + (y - F32(c[1])) * F32(out[1])
        xt = -(x - F32(c[0])) * F32(out[1]) + (y - F32(c[1])) * F32(out[0])
        zz = (z - F32(c[2])) * F32(o.side)                 # > 0 towards the disc
        # the spur bends towards the disc: its outer part is shifted vertically
        zz = zz - F32(0.5 * o.height) * np.clip(xr / F32(rad[0]), 0, 1)
        Fo = (xr / rad[0]) ** 2 + (xt / rad[1]) ** 2 + (zz / rad[2]) ** 2
        spur = (Fo <= 1) & (cv.vert[sl] != label)
        hu = np.where(Fo > 0.45, F32(v.cortex_hu * 0.9), F32(v.trab_hu + 120))
        cv.paint(sl, spur, hu, 10, label)


def draw_sacrum(cv: Canvas, spec: ScanSpec):
    """S1 body (unlabelled, concept 26), the alae and the posterior sacral wall."""
    v = spec.sacrum
    draw_body(cv, v, 0, concept_value=26)
    a, b = v.W / 2, v.D / 2
    y_c, ax_c, by_c = _canal_geometry(v)
    for c, rad in (((-a - 16, -0.35 * b, -6.0), (24, 17, 20)), ((a + 16, -0.35 * b, -6.0), (24, 17, 20)),
                   ((0.0, y_c - by_c - 3.0, -4.0), (ax_c + 10, 7.0, 18.0))):
        c, rad = np.array(c), np.array(rad, dtype=np.float64)
        sl = cv.grid.window(_box(v.frame, c - rad - 1, c + rad + 1))
        if sl is None:
            continue
        x, y, z = cv.grid.local(sl, v.frame)
        F = ((x - F32(c[0])) / rad[0]) ** 2 + ((y - F32(c[1])) / rad[1]) ** 2 + ((z - F32(c[2])) / rad[2]) ** 2
        m = (F <= 1) & (cv.vert[sl] == 0) & (cv.concept[sl] != 26)
        hu = _bone_hu((1 - np.sqrt(F)) * rad.min(), 1.3, v.cortex_hu, v.trab_hu + 30, cv.aa)
        cv.paint(sl, m, hu, 26, 0)


# ---------------------------------------------------------------------------------------------
# The whole scan
# ---------------------------------------------------------------------------------------------

def _noise_attenuation(sigma_vox) -> float:
    """Standard deviation of white noise after ``gaussian_filter`` with these sigmas."""
    g = 1.0
    for s in sigma_vox:
        if s > 0:
            imp = np.zeros(64)
            imp[32] = 1.0
            k = ndimage.gaussian_filter1d(imp, s)
            g *= float(np.sqrt((k ** 2).sum()))
    return g


def render_scan(spec: ScanSpec) -> Scan:
    """Draw ``spec`` and return the scan in its orientation, with centroids and truth."""
    acq = spec.acq
    rng = np.random.default_rng(spec.render_seed)
    grid = Grid(acq.fov_lo, acq.fov_hi, acq.spacing)
    hu_bg, con_bg = draw_background(spec, grid, rng)
    for axis, k in enumerate(grid.f):
        if k > 1:
            hu_bg = np.repeat(hu_bg, k, axis=axis)
            con_bg = np.repeat(con_bg, k, axis=axis)
    cv = Canvas(grid, hu_bg, con_bg, rng)
    verts = spec.vertebrae
    disc_h = [d.height for d in spec.discs]
    for i, v in enumerate(verts):
        draw_canal(cv, v, disc_h[i - 1] if i else disc_h[0], disc_h[i])
    for i, v in enumerate(verts):
        if v.q < 12.0:
            draw_rib(cv, v, disc_h[i - 1] if i else disc_h[0], 80.0 * (v.trab_hu - 150) / 150)
    for i in range(len(spec.discs)):
        draw_disc(cv, spec, i)
    draw_sacrum(cv, spec)
    for v in verts:
        draw_body(cv, v, v.label)
    for i, v in enumerate(verts):
        draw_posterior(cv, v, v.label, disc_h[i])
    for v in verts:
        draw_osteophytes(cv, v, v.label)

    # partial volume: average the sub-samples; masks at the voxel centres
    f = grid.f
    hu = cv.hu
    if any(k > 1 for k in f):
        n = grid.shape
        hu = hu.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5), dtype=F32)
    centre = tuple(slice(k // 2, None, k) for k in f)
    vert = np.ascontiguousarray(cv.vert[centre])
    concept = np.ascontiguousarray(cv.concept[centre])
    # reconstruction kernel, noise (stronger texture inside trabecular bone), HU offset
    sig = [acq.psf_mm / s if acq.psf_mm / s > 0.25 else 0.0 for s in grid.spacing]
    att = _noise_attenuation(sig)
    sd = np.where(concept == 6, F32(math.hypot(acq.noise_hu, 45.0) / att), F32(acq.noise_hu / att))
    hu += rng.standard_normal(hu.shape, dtype=F32) * sd
    hu = ndimage.gaussian_filter(hu, sig, mode="nearest", truncate=2.5)
    hu += F32(acq.hu_offset)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    # orientation: RAS arrays -> the scan's axis codes
    affine = np.diag([*grid.spacing, 1.0])
    affine[:3, 3] = grid.lo + 0.5 * grid.spacing
    tr = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(acq.axcodes)))
    affine = affine @ inv_ornt_aff(tr, grid.shape)
    ct = np.ascontiguousarray(apply_orientation(ct, tr))
    vert = np.ascontiguousarray(apply_orientation(vert, tr))
    concept = np.ascontiguousarray(apply_orientation(concept, tr))
    assert tuple(nib.aff2axcodes(affine)) == tuple(acq.axcodes)
    centroids, truth = _truth(spec, affine, ct.shape, vert)
    return Scan(spec.case, ct, vert, concept, affine, centroids, truth)


def _truth(spec: ScanSpec, affine: np.ndarray, shape, vert: np.ndarray):
    """Body centroids (voxel) of the vertebrae whose body centre lies in the FOV, and the truth."""
    counts = {v.label: int(np.count_nonzero(vert == v.label)) for v in spec.vertebrae}
    inv = np.linalg.inv(affine)
    labels = spec.labels
    centroids: dict[int, np.ndarray] = {}
    vt = []
    for i, v in enumerate(spec.vertebrae):
        if counts[v.label] == 0:
            continue
        c_world = v.frame.to_world(body_centre(v))
        vox = inv[:3, :3] @ c_world + inv[:3, 3]
        in_fov = bool(np.all(vox >= -0.5) and np.all(vox <= np.array(shape) - 0.5))
        if in_fov:
            centroids[v.label] = vox
        above = labels[i - 1] if i > 0 else None
        below = labels[i + 1] if i + 1 < len(labels) else SACRUM
        conf = []
        if v.wedge >= 0.08:
            conf.append("physiological wedging")
        if v.low_density:
            conf.append("low density")
        conf += [f"Schmorl node ({'superior' if n.side > 0 else 'inferior'})" for n in v.schmorl]
        if v.osteophytes:
            conf.append("osteophyte")
        if i > 0 and spec.discs[i - 1].degenerated:
            conf.append("degenerated disc above")
        if spec.discs[i].degenerated:
            conf.append("degenerated disc below")
        if v.sclerosis_sup or v.sclerosis_inf:
            conf.append("degenerative endplate sclerosis")
        fr = v.fracture
        vt.append({
            "label": v.label,
            "body_centre": [round(float(c), 4) for c in c_world],
            "superior": [round(float(c), 6) for c in v.frame.e_s],
            "anterior": [round(float(c), 6) for c in v.frame.e_a],
            "left": [round(float(c), 6) for c in v.frame.e_l],
            "frame_origin": [round(float(c), 4) for c in v.frame.o],
            "grade": v.grade,
            "shape": v.shape,
            "height_loss": round(v.height_loss, 4),
            "heights": {k: round(h, 4) for k, h in v.heights.items()},
            "nominal_height_mm": round(v.H, 3),
            "width_mm": round(v.W, 3),
            "depth_mm": round(v.D, 3),
            "physiological_wedge": round(v.wedge, 4),
            "trabecular_hu": round(v.trab_hu, 1),
            "fracture_signs": None if fr is None else {
                "condensation_band_hu": round(fr.band_hu, 1),
                "anterior_buckling_mm": round(fr.buckle_mm, 2),
                "endplate_irregularity_mm": round(fr.irregular_mm, 2)},
            "confounders": conf,
            "centroid_in_fov": in_fov,
            "voxels": int(counts[v.label]),
            "neighbours": {"above": above, "below": below},
            "disc_above": disc_value(v.label, spec.discs[i - 1].degenerated) if i > 0 else None,
            "disc_below": disc_value(below, spec.discs[i].degenerated),
        })
    acq = spec.acq
    truth = {
        "case": spec.case,
        "generator": "vfcore.phantom",
        "seed": spec.seed,
        "index": spec.index,
        "spacing": list(acq.spacing),
        "axcodes": acq.axcodes,
        "acquisition": acq.kind,
        "shape": [int(n) for n in shape],
        "psf_mm": round(acq.psf_mm, 3),
        "noise_hu": round(acq.noise_hu, 2),
        "contrast": acq.contrast,
        "height_positions": {"anterior": 0.4, "middle": 0.0, "posterior": -0.4},
        "vertebrae": vt,
    }
    return centroids, truth
