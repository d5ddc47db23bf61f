"""Geometry of one synthetic scan: levels, sizes, the curved spine, fractures, confounders.

Everything here is cheap (no voxels): :func:`sample_scan` draws a :class:`ScanSpec` from a
seed, and :mod:`vfcore.phantom.render` turns it into voxels.  All lengths are millimetres,
world coordinates are RAS+ (x to the patient's right, y anterior, z superior).

Each vertebra has a local frame (origin ``o``, unit axes ``e_l`` left, ``e_a`` anterior,
``e_s`` superior) that follows the spine's centre curve: ``e_s`` is the curve's tangent at the
body centre, ``e_a`` the patient's anterior direction made orthogonal to it (plus a small
axial rotation), ``e_l = e_s x e_a``.  Local coordinates are ``x`` (left), ``y`` (anterior),
``z`` (superior).

Fracture grades follow Genant's semi-quantitative method: height loss 20-25 % (grade 1),
25-40 % (grade 2), > 40 % (grade 3); shapes 1 wedge (anterior), 2 biconcave (middle),
3 crush (whole body).  Heights are measured on the mid-sagittal line of the body at
``y = +0.4 D`` (anterior), ``0`` (middle) and ``-0.4 D`` (posterior), see
:data:`HEIGHT_POSITIONS`, relative to the vertebra's nominal (unfractured) height.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Thoraco-lumbar labels in cranio-caudal order (VerSe: 8-19 T1-T12, 28 T13, 20-25 L1-L6).
THORACIC = list(range(8, 20))
LUMBAR = list(range(20, 25))
T13, L6 = 28, 25
#: Label used in the concept mask for the sacrum (VerSe's convention; never in the vert mask).
SACRUM = 26

#: Where anterior / middle / posterior heights are measured, as a fraction of the depth D
#: along the local anterior axis y (x = 0).
HEIGHT_POSITIONS = {"anterior": 0.4, "middle": 0.0, "posterior": -0.4}

#: Genant grade -> (min, max) height loss used when drawing a fracture (inside the grade's
#: bin, away from its edges so that voxelisation cannot move a vertebra to the next grade).
GRADE_LOSS = {1: (0.212, 0.238), 2: (0.27, 0.38), 3: (0.43, 0.55)}
SHAPES = {0: "none", 1: "wedge", 2: "biconcave", 3: "crush"}

# Level position q: T1..T12 -> 0..11, T13 -> 11.5, L1..L5 -> 12..16, L6 -> 16.6, sacrum 17.5.
_KNOTS = np.array([0, 3, 7, 11, 12, 14, 16, 17.5])
# Sizes at the knots (mm or degrees), from anatomical tables of adult vertebrae.
_TABLE = {
    "H": [17, 18.5, 20.5, 24, 25.5, 27, 28, 30],          # body height (posterior)
    "W": [25, 27, 31, 40, 42, 46, 50, 52],                # body width (left-right)
    "D": [17, 21, 26, 30, 31, 33, 35, 34],                # body depth (antero-posterior)
    "disc": [3.5, 4.0, 5.0, 6.5, 8.0, 10.0, 11.0, 10.0],  # disc below the vertebra
    "canal_w": [19, 16, 16, 20, 21, 22, 25, 25],
    "canal_ap": [15, 14.5, 14.5, 16, 17, 16, 17, 17],
    "ped_w": [8, 6, 5.5, 7.5, 8, 10, 14, 14],             # pedicle width (left-right)
    "ped_h": [9, 10, 12, 15, 15, 15, 14, 14],             # pedicle height
    "lam_t": [6, 6, 6.5, 7, 7.5, 8, 8, 8],                # lamina thickness
    "sp_len": [40, 44, 42, 32, 30, 30, 25, 22],           # spinous process length
    "sp_angle": [25, 45, 55, 25, 10, 5, 0, 0],            # spinous process, degrees downward
    "sp_rh": [4, 4, 4.5, 6.0, 7, 7.5, 6.5, 6],            # spinous process half-height
    "sp_rw": [3, 3, 3, 3.5, 4, 4.5, 4.5, 4],              # spinous process half-width
    "tp_len": [24, 22, 18, 12, 14, 22, 17, 14],           # transverse process length
    "tp_back": [35, 35, 35, 20, 5, 0, 5, 5],              # degrees towards posterior
    "tp_up": [10, 15, 15, 5, 0, 0, 0, 0],                 # degrees upwards
    "tp_r": [5, 5, 5, 4.5, 4, 3.5, 5, 5],
    "lumbar": [0, 0, 0, 0.2, 1, 1, 1, 1],                 # 0 thoracic shape, 1 lumbar shape
}


def level_q(label: int) -> float:
    """Level position used to interpolate sizes: T1 0 ... T12 11, T13 11.5, L1 12 ... L6 16.6."""
    if label == T13:
        return 11.5
    if label == L6:
        return 16.6
    if label == SACRUM:
        return 17.5
    return float(label - 8)


def level_size(name: str, q: float) -> float:
    """Nominal size ``name`` (a key of the anatomical table) at level position ``q``."""
    return float(np.interp(q, _KNOTS, _TABLE[name]))


@dataclass
class Frame:
    """Local frame of a vertebra or disc: origin and unit axes (left, anterior, superior), world mm."""

    o: np.ndarray
    e_l: np.ndarray
    e_a: np.ndarray
    e_s: np.ndarray

    def to_world(self, p) -> np.ndarray:
        """Local (x, y, z) -> world."""
        p = np.asarray(p, dtype=np.float64)
        return self.o + p[..., :1] * self.e_l + p[..., 1:2] * self.e_a + p[..., 2:3] * self.e_s

    def rotation(self) -> np.ndarray:
        """3x3 matrix whose columns are e_l, e_a, e_s (local -> world)."""
        return np.stack([self.e_l, self.e_a, self.e_s], axis=1)


@dataclass
class Fracture:
    """Genant grade (1-3), shape (1 wedge, 2 biconcave, 3 crush) and its drawn signs."""

    grade: int
    shape: int
    loss: float            # Genant height loss (fraction of the nominal height)
    band_hu: float         # sclerotic condensation band under the collapsed endplate(s), HU
    band_mm: float         # its thickness
    buckle_mm: float       # anterior cortical buckling (outward bulge)
    irregular_mm: float    # endplate irregularity amplitude


@dataclass
class Schmorl:
    """Schmorl node: a pit of disc material in an endplate (+1 superior, -1 inferior)."""

    side: int
    x0: float
    y0: float
    radius: float
    depth: float


@dataclass
class Osteophyte:
    """Bony spur at an endplate rim (+1 superior, -1 inferior), at angle ``theta`` (0 = anterior)."""

    side: int
    theta: float
    length: float
    height: float


@dataclass
class VertebraSpec:
    """One vertebra: nominal sizes, deformation, confounders, appearance and its frame."""

    label: int
    q: float
    H: float                 # nominal body height (mm)
    W: float                 # body width
    D: float                 # body depth
    h_ant: float             # anterior / posterior rim heights as fractions of H (the wedge)
    h_mid: float             # intended middle height (fraction of H)
    h_post: float
    dep_sup: float           # central endplate depressions (mm)
    dep_inf: float
    dep_x0: float            # depression centre (normalised x, y) and radius (normalised)
    dep_y0: float
    dep_r: float
    waist: float             # concavity of the side walls (fraction)
    concave: float           # posterior wall concavity
    fracture: Fracture | None
    schmorl: list[Schmorl]
    osteophytes: list[Osteophyte]
    wedge: float             # physiological wedging (anterior height loss, fraction; < 0.15)
    trab_hu: float           # trabecular bone HU
    cortex_hu: float
    vein: bool               # basivertebral vein notch in the posterior wall
    waves: np.ndarray        # (K, 4): endplate irregularity waves (kx, ky, phase, weight)
    post: dict[str, float]   # posterior element sizes (see _TABLE)
    frame: Frame | None = None
    s: float = 0.0           # arc length of the body centre along the spine curve
    sclerosis_sup: float = 0.0  # degenerative endplate sclerosis (HU) facing the disc above
    sclerosis_inf: float = 0.0  # ... facing the disc below
    low_density: bool = False
    heights: dict[str, float] = field(default_factory=dict)   # as drawn, see measure_heights

    @property
    def grade(self) -> int:
        return 0 if self.fracture is None else self.fracture.grade

    @property
    def shape(self) -> int:
        return 0 if self.fracture is None else self.fracture.shape

    @property
    def centre_height(self) -> float:
        """Height of the body on its frame's axis (rim level, depressions ignored)."""
        return self.H * (self.h_post + (self.h_ant - self.h_post) * 0.5)

    def measure_heights(self) -> dict[str, float]:
        """Body heights (fractions of H) of the drawn surfaces at :data:`HEIGHT_POSITIONS`."""
        y = np.array([f * self.D for f in HEIGHT_POSITIONS.values()])
        top, bot = self.top_bottom(np.zeros_like(y), y)
        return {k: float(h) / self.H for k, h in zip(HEIGHT_POSITIONS, top - bot)}

    @property
    def height_loss(self) -> float:
        """Genant height loss: 1 - the smallest of the three heights (fraction of H)."""
        return 1.0 - min(self.heights.values())

    # ---- the body as a height field over its cross-section (local mm) ----------------
    def top_bottom(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Superior and inferior endplate surfaces z(x, y) in local mm (arrays like x)."""
        a, b = self.W / 2, self.D / 2
        X, Y = x / a, y / b
        # anterior/posterior heights interpolate linearly along y (wedge), measured at +-0.4 D
        ramp = (Y + 0.8) / 1.6
        h = self.H * (self.h_post + (self.h_ant - self.h_post) * ramp)
        top, bot = 0.5 * h, -0.5 * h
        if self.dep_sup or self.dep_inf:
            r2 = ((X - self.dep_x0) ** 2 + (Y - self.dep_y0) ** 2) / self.dep_r ** 2
            bump = np.clip(1.0 - r2, 0.0, None) ** 2
            top = top - self.dep_sup * bump
            bot = bot + self.dep_inf * bump
        if self.fracture is not None and self.fracture.irregular_mm > 0:
            rough = self.roughness(x, y)
            w_sup, w_inf = self.deformation_weights(x, y)
            top = top + rough * w_sup
            bot = bot - rough * w_inf
        for node in self.schmorl:
            r2 = ((x - node.x0) ** 2 + (y - node.y0) ** 2) / node.radius ** 2
            pit = node.depth * np.sqrt(np.clip(1.0 - r2, 0.0, None))
            if node.side > 0:
                top = top - pit
            else:
                bot = bot + pit
        return top, bot

    def roughness(self, x, y):
        """Endplate irregularity (mm) of a fractured endplate: a few short random waves."""
        amp = self.fracture.irregular_mm if self.fracture else 0.0
        out = 0.0
        for kx, ky, ph, w in self.waves:
            out = out + w * np.cos(kx * x + ky * y + ph)
        return amp * out

    def deformation_weights(self, x, y):
        """0..1 weights of how much the superior / inferior endplate is collapsed at (x, y)."""
        top_nom = 0.5 * self.H
        top, bot = self._rim(x, y)
        disp_sup = top_nom - top
        disp_inf = bot + top_nom
        if self.dep_sup or self.dep_inf:
            X, Y = x / (self.W / 2), y / (self.D / 2)
            r2 = ((X - self.dep_x0) ** 2 + (Y - self.dep_y0) ** 2) / self.dep_r ** 2
            bump = np.clip(1.0 - r2, 0.0, None) ** 2
            disp_sup = disp_sup + self.dep_sup * bump
            disp_inf = disp_inf + self.dep_inf * bump
        scale = max(self.fracture.loss * self.H * 0.25, 1.0) if self.fracture else 1.0
        return np.clip(disp_sup / scale, 0, 1), np.clip(disp_inf / scale, 0, 1)

    def _rim(self, x, y):
        Y = y / (self.D / 2)
        h = self.H * (self.h_post + (self.h_ant - self.h_post) * (Y + 0.8) / 1.6)
        return 0.5 * h, -0.5 * h

    def cross_section(self, x, y, tn):
        """Cross-section function F (< 1 inside) and approximate distance to the wall (mm).

        ``tn`` in [-1, 1] is the relative height in the body (for the waist and buckling).
        In front the section is an ellipse; behind it is squarer (a squircle term) with a
        concave posterior wall.  The distance is the first-order estimate (1 - F) / |grad F|.
        """
        a, b = self.W / 2, self.D / 2
        s = 1.0 - self.waist * (1.0 - tn * tn)
        ia = 1.0 / (a * s)
        ib = 1.0 / (b * s)
        ibf = ib
        if self.fracture is not None and self.fracture.buckle_mm > 0:
            t0 = 0.35 if self.fracture.shape == 1 else 0.0
            bulge = self.fracture.buckle_mm * np.exp(-((tn - t0) / 0.35) ** 2)
            ibf = 1.0 / (b * s + bulge)
        back = y < 0
        X = x * ia
        Y = y * np.where(back, ib, ibf)
        X2, Y2 = X * X, Y * Y
        k, c = 0.45, self.concave
        g = 1.0 / (1.0 + X2 * 5.0) ** 2              # ~ a bump at the midline (x = 0)
        wb = back.astype(X.dtype)                     # 1 behind the frame origin
        F = X2 + Y2 + wb * (Y2 * c * g - k * X2 * Y2)
        # gradient in local mm
        dg = -20.0 * X / (1.0 + X2 * 5.0) ** 3
        Fx = (2 * X + wb * (Y2 * c * dg - 2 * k * X * Y2)) * ia
        Fy = (2 * Y + wb * (2 * Y * c * g - 2 * k * X2 * Y)) * np.where(back, ib, ibf)
        grad = np.sqrt(Fx * Fx + Fy * Fy) + 1e-6
        dist = (1.0 - F) / grad
        return F, np.minimum(dist, min(a, b))


@dataclass
class DiscSpec:
    """The disc between ``upper`` and ``lower`` (indices into ScanSpec.vertebrae)."""

    upper: int
    lower: int
    height: float
    degenerated: bool
    vacuum: bool
    hu: float
    frame: Frame | None = None


@dataclass
class Acquisition:
    """How the scan is sampled: spacing per world axis (x, y, z), FOV box, orientation, effects."""

    kind: str
    spacing: tuple[float, float, float]
    fov_lo: tuple[float, float, float]
    fov_hi: tuple[float, float, float]
    axcodes: str
    psf_mm: float            # Gaussian blur (sigma, mm) of the reconstruction kernel
    noise_hu: float          # noise standard deviation in the final image
    contrast: bool           # contrast-enhanced vessels
    hu_offset: float


@dataclass
class ScanSpec:
    """Everything needed to draw one scan (no voxels)."""

    case: str
    seed: int
    index: int
    vertebrae: list[VertebraSpec]
    discs: list[DiscSpec]
    sacrum: VertebraSpec
    curve_s: np.ndarray      # dense arc length samples (mm)
    curve_p: np.ndarray      # (n, 3) world points of the body-centre curve
    curve_t: np.ndarray      # (n, 3) unit tangents pointing inferior
    anterior: np.ndarray     # patient's anterior direction (world)
    acq: Acquisition
    background: dict = field(default_factory=dict)
    render_seed: int = 0

    @property
    def labels(self) -> list[int]:
        return [v.label for v in self.vertebrae]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def _level_weights(q: np.ndarray) -> np.ndarray:
    """Relative fracture frequency by level: peaks at mid-thoracic and thoraco-lumbar junction."""
    return 0.35 + np.exp(-((q - 6.5) / 2.0) ** 2) * 0.9 + np.exp(-((q - 12.0) / 1.6) ** 2) * 1.4


def _fracture(rng: np.random.Generator) -> Fracture:
    grade = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    shape = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2] if grade < 3 else [0.4, 0.25, 0.35]))
    loss = float(rng.uniform(*GRADE_LOSS[grade]))
    band = float(rng.uniform(80, 220)) if rng.random() < 0.8 else 0.0
    buckle = float(rng.uniform(0.8, 2.5)) if shape in (1, 3) and rng.random() < 0.75 else 0.0
    return Fracture(grade, shape, loss, band, float(rng.uniform(2.0, 4.5)), buckle,
                    float(rng.uniform(0.3, 0.7)))


def _vertebra(rng, label: int, scale: float, density: float, prevalence_p: float,
              confounder_rate: float) -> VertebraSpec:
    q = level_q(label)
    jit = lambda: float(rng.uniform(0.96, 1.04))  # noqa: E731
    H, W, D = (level_size(k, q) * scale * jit() for k in ("H", "W", "D"))
    # physiological wedging: thoracic bodies are a little lower in front (< 15 %),
    # L5 is higher in front (negative wedge)
    if q < 11.8:
        wedge = float(rng.uniform(0.0, 0.06) + 0.07 * math.exp(-((q - 7.0) / 2.5) ** 2)
                      * rng.uniform(0.3, 1.0))
    else:
        wedge = float(rng.uniform(-0.04, 0.04) - 0.12 * max(0.0, q - 15.0))
    fracture = _fracture(rng) if rng.random() < prevalence_p else None
    h_ant, h_mid, h_post = 1.0 - wedge, 1.0 - wedge / 2, 1.0
    dep_sup = dep_inf = 0.0
    dep_x0, dep_y0 = float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.04, 0.04))
    dep_r = float(rng.uniform(0.6, 0.72))
    if fracture is None:             # normal endplates are slightly concave
        dep_sup, dep_inf = (float(rng.uniform(0.015, 0.045)) * H for _ in range(2))
        dep_r = float(rng.uniform(0.75, 0.9))
        h_mid -= (dep_sup + dep_inf) / H
    else:
        loss = fracture.loss
        if fracture.shape == 1:      # wedge: anterior height lost, posterior intact
            h_post, h_ant = 1.0, 1.0 - loss
            h_mid = 1.0 - loss / 2
            sup = rng.uniform(0.0, 0.15) * H
            dep_sup, dep_inf = sup, 0.0
            h_mid -= sup / H
        elif fracture.shape == 2:    # biconcave: middle height lost, rims intact
            h_post = 1.0
            h_ant = 1.0 - float(rng.uniform(0.0, min(0.08, loss - 0.1)))
            h_lin = 0.5 * (h_ant + h_post)
            total = (h_lin - (1.0 - loss)) * H
            f = float(rng.uniform(0.35, 0.65))
            dep_sup, dep_inf = f * total, (1 - f) * total
            h_mid = 1.0 - loss
        else:                        # crush: all heights lost, front a bit more
            h_ant = 1.0 - loss
            h_post = 1.0 - loss * float(rng.uniform(0.75, 0.92))
            h_lin = 0.5 * (h_ant + h_post)
            extra = float(rng.uniform(0.0, 0.05)) * H
            dep_sup, dep_inf = 0.6 * extra, 0.4 * extra
            h_mid = h_lin - extra / H
    # confounders (independent of fractures; Schmorl nodes away from the height-measuring line)
    schmorl: list[Schmorl] = []
    if fracture is None and rng.random() < 0.10 * confounder_rate * (1.3 if 9 <= q <= 14 else 1.0):
        side = int(rng.choice([1, -1]))
        x0 = float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.55) * W / 2)
        y0 = float(rng.uniform(-0.35, 0.35) * D / 2)
        schmorl.append(Schmorl(side, x0, y0, float(rng.uniform(3.0, 5.5)),
                               float(rng.uniform(0.08, 0.12) * H)))
    osteophytes: list[Osteophyte] = []
    if rng.random() < 0.10 * confounder_rate * (1.6 if q >= 11 else 0.8):
        for _ in range(int(rng.integers(1, 4))):
            osteophytes.append(Osteophyte(int(rng.choice([1, -1])),
                                          float(rng.normal(0.0, 0.9)),
                                          float(rng.uniform(2.5, 6.0)),
                                          float(rng.uniform(2.0, 4.5))))
    trab = (40.0 + 165.0 * density) * float(rng.uniform(0.92, 1.08))
    post = {k: level_size(k, q) * (scale if k not in ("sp_angle", "tp_back", "tp_up", "lumbar")
                                   else 1.0) for k in _TABLE if k not in ("H", "W", "D")}
    v = VertebraSpec(
        label=label, q=q, H=H, W=W, D=D, h_ant=h_ant, h_mid=h_mid, h_post=h_post,
        dep_sup=float(dep_sup), dep_inf=float(dep_inf), dep_x0=dep_x0, dep_y0=dep_y0,
        dep_r=dep_r, waist=float(rng.uniform(0.04, 0.08)),
        concave=float(0.15 + 0.2 * min(1.0, max(0.0, (q - 8) / 6)) * rng.uniform(0.7, 1.2)),
        fracture=fracture, schmorl=schmorl, osteophytes=osteophytes, wedge=wedge,
        trab_hu=trab, cortex_hu=float(520 + 420 * math.sqrt(density) * rng.uniform(0.9, 1.1)),
        vein=bool(rng.random() < 0.7), waves=_waves(rng), post=post,
        low_density=bool(trab < 115))
    # the grade must hold for the surfaces as drawn (irregular endplates included): redraw
    # the irregularity until the measured height loss lies inside the grade's bin
    lo, hi = (0.2, 0.25) if v.grade == 1 else (0.25, 0.4) if v.grade == 2 else (0.4, 0.62)
    for attempt in range(30):
        v.heights = v.measure_heights()
        if v.fracture is None or lo + 0.006 <= v.height_loss <= hi - 0.006:
            break
        v.waves = _waves(rng)
        if attempt == 29:
            v.fracture.irregular_mm = 0.0
            v.heights = v.measure_heights()
    return v


def _waves(rng, k: int = 4) -> np.ndarray:
    """Random plane waves (kx, ky, phase, weight) of wavelength about 7 mm: endplate irregularity."""
    waves = np.stack([rng.normal(0, 1.0, k), rng.normal(0, 1.0, k), rng.uniform(0, 2 * np.pi, k),
                      rng.uniform(0.5, 1.0, k)], axis=1)
    waves[:, :2] *= 2 * np.pi / 7.0
    waves[:, 3] /= waves[:, 3].sum()
    return waves


def _curve(rng, verts: list[VertebraSpec], discs: list[float], sacrum: VertebraSpec):
    """The spine's centre curve: integrate tangent angles along the arc length.

    Sagittal angle phi (going down, positive = towards anterior): kyphosis adds to phi over
    the thoracic segments, lordosis subtracts over the lumbar ones, a wedge or crush fracture
    adds its own kyphotic angle inside the collapsed body.  Coronal angle psi: mild scoliosis.
    """
    n = len(verts)
    hc = np.array([v.centre_height for v in verts])
    seg_top = np.concatenate([[0.0], np.cumsum(hc + np.array(discs))])[:n]
    s_centre = seg_top + hc / 2
    s_sacrum_top = seg_top[-1] + hc[-1] + discs[-1]
    s_end = s_sacrum_top + sacrum.H + 10
    ds = 0.25
    s = np.arange(-20.0, s_end + ds, ds)
    kyph = float(rng.uniform(20, 50))
    lord = float(rng.uniform(35, 65))
    qs = np.array([v.q for v in verts])
    thor = qs < 11.8
    w_t = np.where(thor, np.sin(np.pi * (qs + 0.5) / 12.5).clip(0.15), 0.0)
    lum_w = np.interp(qs, [11.8, 12, 14, 16, 16.6], [0.0, 0.08, 0.18, 0.35, 0.35])
    w_l = np.where(thor, 0.0, lum_w)
    dphi = kyph * w_t / max(w_t.sum(), 1e-9) - lord * w_l / max(w_l.sum(), 1e-9)
    kappa = np.zeros_like(s)       # degrees per mm
    seg_len = hc + np.array(discs)
    for i in range(n):
        inside = (s >= seg_top[i]) & (s < seg_top[i] + seg_len[i])
        kappa[inside] += dphi[i] / seg_len[i]
        v = verts[i]
        if v.fracture is not None and v.fracture.shape in (1, 3):
            # the fracture's own kyphotic angle: the endplates tilt by atan(dh / 0.8 D)
            dh = (v.h_post - v.h_ant) * v.H
            alpha = math.degrees(math.atan2(dh, 0.8 * v.D))
            body = (s >= seg_top[i]) & (s < seg_top[i] + hc[i])
            kappa[body] += alpha / hc[i]
            # the neighbouring segments compensate (the patient still lies flat on the table)
            near = [j for j in range(i - 4, i + 5) if 0 <= j < n and j != i]
            for j in near:
                seg = (s >= seg_top[j]) & (s < seg_top[j] + seg_len[j])
                kappa[seg] -= alpha / len(near) / seg_len[j]
    sac = s >= s_sacrum_top - discs[-1]
    kappa[sac] -= float(rng.uniform(10, 20)) / max(sac.sum() * ds, 1.0)
    phi0 = -0.6 * kyph + float(rng.uniform(-4, 4))
    phi = phi0 + np.cumsum(kappa) * ds
    amp = float(rng.uniform(0, 8)) if rng.random() < 0.6 else float(rng.uniform(0, 2))
    psi = amp * np.sin(2 * np.pi * s / rng.uniform(300, 480) + rng.uniform(0, 2 * np.pi))
    t = np.stack([np.tan(np.radians(psi)), np.tan(np.radians(phi)), -np.ones_like(s)], axis=1)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    p = np.cumsum(t, axis=0) * ds
    p -= p[np.searchsorted(s, 0.0)]
    # patient positioning: small rotation of the whole spine
    ang = np.radians(rng.uniform(-4, 4, 3))
    R = _rot([1, 0, 0], ang[0]) @ _rot([0, 1, 0], ang[1]) @ _rot([0, 0, 1], ang[2])
    p = p @ R.T
    t = t @ R.T
    anterior = R @ np.array([0.0, 1.0, 0.0])
    return s, p, t, anterior, s_centre, s_sacrum_top


def _rot(axis, angle) -> np.ndarray:
    """Rotation matrix about a unit axis (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def frame_at(spec_s, spec_p, spec_t, anterior, s0: float, twist: float = 0.0) -> Frame:
    """Frame on the curve at arc length ``s0``: e_s = -tangent, e_a = anterior (Gram-Schmidt)."""
    o = np.array([np.interp(s0, spec_s, spec_p[:, i]) for i in range(3)])
    t = np.array([np.interp(s0, spec_s, spec_t[:, i]) for i in range(3)])
    e_s = -t / np.linalg.norm(t)
    e_a = anterior - np.dot(anterior, e_s) * e_s
    e_a /= np.linalg.norm(e_a)
    if twist:
        e_a = _rot(e_s, twist) @ e_a
    e_l = np.cross(e_s, e_a)
    return Frame(o, e_l, e_a, e_s)


_ACQ = [  # kind, probability
    ("iso", 0.30), ("axial_thick", 0.25), ("sagittal", 0.15), ("coarse", 0.15), ("fine", 0.15),
]
_AXCODES = ["PIR", "PIR", "RAS", "LPS", "LAS", "PSR", "ASL", "RPI", "IPL", "LIP"]


def _spacing(rng, kind: str) -> tuple[float, float, float]:
    """Voxel size (mm) along world x, y, z for an acquisition kind."""
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 3)  # noqa: E731
    if kind == "iso":
        s = u(0.8, 1.25)
        return (s, s, s)
    if kind == "axial_thick":
        s = u(0.55, 0.9)
        return (s, s, u(2.0, 3.0))
    if kind == "sagittal":
        s = u(0.55, 0.9)
        return (u(2.0, 3.0), s, s)
    if kind == "coarse":
        s = u(1.2, 1.6)
        return (s, s, u(1.5, 3.0))
    s = u(0.5, 0.7)
    return (s, s, u(0.8, 1.25))


def supersampling(spacing) -> tuple[int, int, int]:
    """Sub-samples per voxel along each axis: slices of 2 mm or more are drawn at about 1 mm
    and averaged (partial volume); the masks are taken at the central sub-sample."""
    return tuple(1 if s < 2.0 else (3 if s <= 3.3 else 5) for s in spacing)


def scan_cost(spacing, size_mm, n_vertebrae: int) -> float:
    """Rough drawing + writing time (CPU s, one core) of a scan, to size its field of view."""
    f = supersampling(spacing)
    n_out = float(np.prod(size_mm) / np.prod(spacing))
    density = float(np.prod(f) / np.prod(spacing))        # drawn sub-samples per mm^3
    return 0.25 + 0.13e-6 * n_out + 0.02 * n_vertebrae * density


def sample_scan(seed: int, index: int, prevalence: float = 0.12, confounders: float = 1.0,
                budget_s: float = 1.6) -> ScanSpec:
    """Draw the geometry of scan ``index`` of the data set with ``seed`` (cheap: no voxels).

    ``prevalence`` is the expected fraction of fractured vertebrae; ``confounders`` scales
    the rate of Schmorl nodes, osteophytes and degenerated discs; ``budget_s`` bounds the
    estimated drawing time (:func:`scan_cost`) by covering fewer vertebrae at fine spacing.
    """
    ss = np.random.SeedSequence([int(seed), int(index)])
    rng = np.random.default_rng(ss)
    render_seed = int(ss.spawn(1)[0].generate_state(1)[0])
    thoracic = THORACIC + ([T13] if rng.random() < 0.06 else [])
    lumbar = LUMBAR + ([L6] if rng.random() < 0.06 else [])
    labels = thoracic + lumbar
    scale = float(rng.uniform(0.9, 1.1))
    osteoporotic = rng.random() < 0.18
    density = float(rng.uniform(0.3, 0.55) if osteoporotic else rng.uniform(0.6, 1.25))
    # patient-level fracture risk (fractures cluster in patients), level-weighted
    risk = float(rng.gamma(0.7, 1 / 0.7))
    qs = np.array([level_q(lab) for lab in labels])
    w = _level_weights(qs)
    p = np.clip(prevalence * risk * w / w.mean(), 0, 0.85)
    verts = [_vertebra(rng, lab, scale, density, float(pi), confounders)
             for lab, pi in zip(labels, p)]
    sacrum = _vertebra(rng, SACRUM, scale, density, 0.0, 0.0)
    sacrum.fracture, sacrum.schmorl, sacrum.osteophytes = None, [], []
    # discs; degenerated ones (narrow, darker, sometimes gas) mostly in the lower lumbar spine
    disc_specs = []
    heights = []
    for i in range(len(verts)):
        q = verts[i].q
        h = level_size("disc", q) * scale * float(rng.uniform(0.9, 1.1))
        pdeg = 0.05 + 0.25 * max(0.0, (q - 12) / 4) + 0.05 * (8 <= q <= 12)
        deg = bool(rng.random() < pdeg * confounders)
        if deg:
            h *= float(rng.uniform(0.35, 0.65))
        heights.append(h)
        disc_specs.append(DiscSpec(i, i + 1, h, deg, deg and rng.random() < 0.3,
                                   float(rng.uniform(40, 65) if deg else rng.uniform(70, 95))))
    for d in disc_specs:    # endplate sclerosis next to degenerated discs (a confounder)
        if d.degenerated and rng.random() < 0.6:
            up = verts[d.upper]
            up.sclerosis_inf = float(rng.uniform(80, 220))
            if d.lower < len(verts):
                verts[d.lower].sclerosis_sup = float(rng.uniform(80, 220))
    s, pts, tan, anterior, s_centre, s_sacrum_top = _curve(rng, verts, heights, sacrum)
    for v, sc in zip(verts, s_centre):
        v.s = float(sc)
        v.frame = frame_at(s, pts, tan, anterior, sc, twist=float(np.radians(rng.normal(0, 1.5))))
    sacrum.s = float(s_sacrum_top + sacrum.H / 2)
    sacrum.frame = frame_at(s, pts, tan, anterior, sacrum.s)
    for d in disc_specs:
        up = verts[d.upper]
        s_mid = up.s + up.centre_height / 2 + d.height / 2
        d.frame = frame_at(s, pts, tan, anterior, s_mid)

    kind = str(rng.choice([k for k, _ in _ACQ], p=[p for _, p in _ACQ]))
    spacing = _spacing(rng, kind)
    if kind == "sagittal":
        axcodes = str(rng.choice(["PIR", "PSR", "ASL", "PIL"]))
    else:
        axcodes = str(rng.choice(_AXCODES))
    fov_lo, fov_hi = _field_of_view(rng, verts, spacing, budget_s, pts)
    acq = Acquisition(kind=kind, spacing=spacing, fov_lo=fov_lo, fov_hi=fov_hi, axcodes=axcodes,
                      psf_mm=float(rng.uniform(0.45, 0.9)), noise_hu=float(rng.uniform(10, 40)),
                      contrast=bool(rng.random() < 0.4), hu_offset=float(rng.normal(0, 6)))
    background = {
        "fat_back": float(rng.uniform(6, 30)),         # subcutaneous fat at the back
        "lung_limit": float(rng.uniform(10.2, 11.2)),  # level where the lungs end (posterior)
        "psoas": float(rng.uniform(0.8, 1.2)),
        "aorta_x": float(rng.uniform(-18, -6)),
        "torso_y": float(rng.uniform(40, 90)),          # torso centre anterior of the spine
        "waves": rng.normal(0, 1, (6, 4)).tolist(),      # smooth texture of the viscera
    }
    return ScanSpec(case=f"sub-phantom{index:03d}", seed=int(seed), index=int(index),
                    vertebrae=verts, discs=disc_specs, sacrum=sacrum, curve_s=s, curve_p=pts,
                    curve_t=tan, anterior=anterior, acq=acq, background=background,
                    render_seed=render_seed)


def _field_of_view(rng, verts, spacing, budget_s, pts):
    """A box around a run of 5-14 consecutive vertebrae whose drawing fits ``budget_s``."""
    width = float(rng.uniform(110, 125) if min(spacing) < 0.72 and max(spacing) < 1.5
                  else rng.uniform(120, 150))
    n = len(verts)
    want = int(rng.integers(8, 15))
    seg = float(np.mean([v.centre_height + level_size("disc", v.q) for v in verts]))
    while want > 5 and scan_cost(spacing, (width, 150.0, want * seg), want) > budget_s:
        want -= 1
    want = min(want, n)
    first = int(rng.integers(0, n - want + 1))
    run = verts[first:first + want]
    top_v, bot_v = run[0], run[-1]
    # cut the end vertebrae at random: sometimes through the body, sometimes in the disc
    z_top = top_v.frame.o[2] + top_v.H * float(rng.uniform(-0.3, 0.75))
    if first == 0:
        z_top = min(z_top, top_v.frame.o[2] + 0.5 * top_v.H * top_v.frame.e_s[2] - 2.0)
    if first + want < n:
        z_bot = bot_v.frame.o[2] - bot_v.H * float(rng.uniform(-0.3, 0.75))
    else:
        z_bot = bot_v.frame.o[2] - bot_v.H * float(rng.uniform(0.3, 1.5))
    inside = (pts[:, 2] <= z_top + 10) & (pts[:, 2] >= z_bot - 10)
    cx = float(pts[inside, 0].mean()) + float(rng.uniform(-6, 6))
    # antero-posterior: from in front of the bodies to about the spinous process tips
    behind = max(0.5 * v.D + v.post["canal_ap"] + v.post["lam_t"]
                 + v.post["sp_len"] * math.cos(math.radians(v.post["sp_angle"])) for v in run)
    y_front = float(pts[inside, 1].max()) + 0.5 * max(v.D for v in run) + float(rng.uniform(15, 40))
    y_back = float(pts[inside, 1].min()) - behind - float(rng.uniform(-3, 15))
    lo = (cx - width / 2, y_back, z_bot)
    hi = (cx + width / 2, y_front, z_top)
    # snap the box to whole voxels
    shape = [max(8, int(round((h - l) / sp))) for l, h, sp in zip(lo, hi, spacing)]
    hi = tuple(float(l + n_ * sp) for l, n_, sp in zip(lo, shape, spacing))
    return tuple(float(x) for x in lo), hi
