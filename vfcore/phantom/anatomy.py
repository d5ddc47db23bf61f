"""Geometry of one synthetic scan: levels, sizes, the curved spine, fractures, confounders.

Everything here is cheap (no voxels): the anatomical tables and the dataclasses of a
:class:`ScanSpec`.  :func:`vfcore.phantom.sampling.sample_scan` draws one from a seed, and
:mod:`vfcore.phantom.render` turns it into voxels.  All lengths are millimetres,
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
    #: local box ((lo), (hi), mm) the body is drawn in; None: from its own shape. A healed
    #: twin keeps its fractured original's box, so that the body's texture draws the same
    #: random numbers (vfcore.phantom.twins)
    body_box: tuple | None = None

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
    fov: str = "spine"       # field of view: "spine" (spine-centred) or "trunk" (whole body)


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
