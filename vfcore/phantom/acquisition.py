"""How a scan is acquired: voxel spacing, orientation code, field of view, drawing cost.

All lengths in millimetres, world coordinates RAS+ (see :mod:`vfcore.phantom.anatomy`).
"""
from __future__ import annotations

import math

import numpy as np

from .anatomy import level_size

ACQ_KINDS = [  # kind, probability
    ("iso", 0.30), ("axial_thick", 0.25), ("sagittal", 0.15), ("coarse", 0.15), ("fine", 0.15),
]
AXCODES = ["PIR", "PIR", "RAS", "LPS", "LAS", "PSR", "ASL", "RPI", "IPL", "LIP"]


def voxel_spacing(rng, kind: str) -> tuple[float, float, float]:
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


#: Kinds whose in-plane sampling allows a reconstruction over the whole trunk, and how often
#: they get one (a 512-voxel matrix over the body outline); every other scan is a
#: spine-centred reconstruction.
TRUNK_KINDS = ("iso", "coarse")
TRUNK_SHARE = 0.15
#: Half the edge of a vertebra patch (96 mm at 1 mm) plus a margin for the spline's frame.
PATCH_REACH_MM = 48.0 + 4.0


def patch_reach(run) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) bounds of the 96 mm cubes around the bodies of ``run``, in their frames."""
    corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)],
                       dtype=np.float64) * PATCH_REACH_MM
    pts = np.concatenate([v.frame.to_world(corners) for v in run])
    return pts[:, :2].min(axis=0), pts[:, :2].max(axis=0)


#: The most of a non-end vertebra's 96 mm patch that a cranio-caudal cut may leave outside
#: the scan (issue 11 counts patches more than 10 % outside; the spline frame of the patch
#: tilts by a few degrees from the true one, hence the margin).
INNER_OUTSIDE = 0.06
_CUBE = (np.stack(np.meshgrid(*[(np.arange(12) + 0.5) / 12 * 96.0 - 48.0] * 3, indexing="ij"),
                  -1).reshape(-1, 3))


def patch_height(v, side: int) -> float:
    """How far (world z, mm) the scan must reach beyond the centre of ``v`` (up for ``side``
    +1, down for -1) to keep all but :data:`INNER_OUTSIDE` of its 96 mm patch cube: the
    ``1 - INNER_OUTSIDE`` quantile of the cube's points' heights in the vertebra's (tilted)
    frame, on a 12^3 grid."""
    dz = side * (v.frame.to_world(_CUBE)[:, 2] - v.frame.o[2])
    return float(np.quantile(dz, 1.0 - INNER_OUTSIDE))


def _reach(end, beyond, inner) -> tuple[float, float, float]:
    """(need, seg, side) of a scan end at ``end``: the distance beyond ``end``'s centre the
    field must reach for ``inner`` to keep its patch, the distance to ``beyond``'s centre,
    and the direction (+1 up, -1 down)."""
    side = 1 if beyond.frame.o[2] > end.frame.o[2] else -1
    seg = abs(float(beyond.frame.o[2] - end.frame.o[2]))
    need = patch_height(inner, side) - side * float(end.frame.o[2] - inner.frame.o[2])
    return need, seg, side


def _fits(end, beyond, inner) -> bool:
    """A scan can end at ``end`` (short of ``beyond``'s centre by 2.5 mm) and keep ``inner``'s
    patch: not so in the upper thorax, whose short, tilted segments put two vertebrae inside
    one patch half-height, unless the run goes on (real chest scans start in the neck)."""
    need, seg, _ = _reach(end, beyond, inner)
    return need <= seg - 2.5


def _cut(rng, end, beyond, inner) -> float:
    """Distance (world z, mm) from the centre of the ``end`` vertebra to the scan's end,
    short of the centre of the vertebra ``beyond`` it (which then has no centroid), and far
    enough for the ``inner`` neighbour of ``end`` to keep its patch (:func:`patch_height`)."""
    need, seg, _ = _reach(end, beyond, inner)
    lo = min(max(0.35 * end.H, need), seg - 2.5)
    return float(rng.uniform(lo, seg - 2.0))


def field_of_view(rng, verts, spacing, budget_s, pts, kind: str, background: dict):
    """A box around a run of 5-14 consecutive vertebrae whose drawing fits ``budget_s``.

    Cranio-caudally the box ends at random between the centres of an end vertebra and of the
    next one (:func:`_cut`), as real scans do: only the end vertebrae lose much of their
    patch, their inner neighbours at most :data:`INNER_OUTSIDE` (where the short segments
    of the upper thorax do not allow that, the run goes on; from T1 the field reaches into
    the neck, where no cervical spine is drawn).  In the
    axial plane it never cuts a vertebra's 96 mm patch: a
    spine-centred reconstruction reaches from behind the skin of the back (the body outline)
    to 30-50 mm in front of the bodies and 110-140 mm across (wider where a patch
    reaches further); a trunk reconstruction
    (``TRUNK_SHARE`` of the ``TRUNK_KINDS``) holds the whole body outline, with the in-plane
    voxel size of a 512 matrix when that is coarser.  Returns ``(lo, hi, spacing, field)``.
    """
    trunk = kind in TRUNK_KINDS and rng.random() < TRUNK_SHARE
    n = len(verts)
    back_skin = max(0.5 * v.D + v.post["canal_ap"] + v.post["lam_t"]
                    + v.post["sp_len"] * math.cos(math.radians(v.post["sp_angle"])) for v in verts)
    back_skin += 8.0 + background["fat_back"]             # spine centre -> skin of the back
    front_skin = 2.0 * background["torso_y"] + back_skin   # the torso ellipse's front
    if trunk:
        width = 2.0 * background["torso_a"] + 2.0 * float(rng.uniform(8, 30))
        depth = back_skin + front_skin + float(rng.uniform(20, 60))
        s_xy = max(width, depth) / 512.0
        spacing = tuple(round(max(s, s_xy), 3) if i < 2 else s for i, s in enumerate(spacing))
    else:
        width = float(rng.uniform(110, 140))
        depth = back_skin + float(rng.uniform(2, 10)) + float(rng.uniform(30, 50))
    want = int(rng.integers(8, 15))
    seg = float(np.mean([v.centre_height + level_size("disc", v.q) for v in verts]))
    while want > 5 and scan_cost(spacing, (width, depth, want * seg), want) > budget_s:
        want -= 1
    want = min(want, n)
    first = int(rng.integers(0, n - want + 1))
    last = first + want - 1
    # the scan ends between an end vertebra's centre and the next one's: the end vertebra's
    # patch is cut, the next-inner one's by at most INNER_OUTSIDE; where the segments are too
    # short for that (upper thorax), the run goes on to the next vertebra
    while first > 0 and not _fits(verts[first], verts[first - 1], verts[first + 1]):
        first -= 1
    while last < n - 1 and not _fits(verts[last], verts[last + 1], verts[last - 1]):
        last += 1
    # ... and gives back at its other end what it gained, to keep the drawing within budget
    while last - first + 1 > want and _fits(verts[last - 1], verts[last], verts[last - 2]):
        last -= 1
    top_v, bot_v = verts[first], verts[last]
    if first > 0:
        z_top = top_v.frame.o[2] + _cut(rng, top_v, verts[first - 1], verts[first + 1])
    else:       # T1: into the neck (no cervical spine drawn), far enough for T2's patch
        z_top = max(min(top_v.frame.o[2] + top_v.H * float(rng.uniform(0.3, 0.75)),
                        top_v.frame.o[2] + 0.5 * top_v.H * top_v.frame.e_s[2] - 2.0),
                    verts[1].frame.o[2] + patch_height(verts[1], 1))
    if last < n - 1:
        z_bot = bot_v.frame.o[2] - _cut(rng, bot_v, verts[last + 1], verts[last - 1])
    else:       # into the sacrum (drawn), far enough for the inner neighbour's patch
        z_bot = min(bot_v.frame.o[2] - bot_v.H * float(rng.uniform(0.3, 1.5)),
                    verts[last - 1].frame.o[2] - patch_height(verts[last - 1], -1))
    inside = (pts[:, 2] <= z_top + 10) & (pts[:, 2] >= z_bot - 10)
    cx = float(pts[inside, 0].mean())
    reach_lo, reach_hi = patch_reach([v for v in verts
                                      if z_bot - 50 <= v.frame.o[2] <= z_top + 50])
    if trunk:
        x_lo, x_hi = cx - width / 2, cx + width / 2
        y_back = float(pts[inside, 1].min()) - back_skin - float(rng.uniform(10, 30))
        y_front = float(pts[inside, 1].max()) + front_skin + float(rng.uniform(8, 30))
    else:
        cx += float(rng.uniform(-6, 6))
        x_lo, x_hi = cx - width / 2, cx + width / 2
        y_back = float(pts[inside, 1].min()) - back_skin - float(rng.uniform(2, 10))
        y_front = float(pts[inside, 1].max()) + float(rng.uniform(30, 50))
    lo = (min(x_lo, reach_lo[0]), min(y_back, reach_lo[1]), z_bot)
    hi = (max(x_hi, reach_hi[0]), max(y_front, reach_hi[1]), z_top)
    # snap the box to whole voxels
    shape = [max(8, int(round((h - l) / sp))) for l, h, sp in zip(lo, hi, spacing)]
    hi = tuple(float(l + n_ * sp) for l, n_, sp in zip(lo, shape, spacing))
    return tuple(float(x) for x in lo), hi, spacing, "trunk" if trunk else "spine"
