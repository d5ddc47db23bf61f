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


def field_of_view(rng, verts, spacing, budget_s, pts):
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
