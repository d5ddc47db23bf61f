"""Healed twins: the same scan with one fracture healed (Genant grade 0), everything else equal.

A counterfactual pair for the network: :func:`heal` copies a :class:`ScanSpec` and gives one
fractured vertebra back the shape it had before the fracture (its physiological wedge kept,
normal concave endplates); :func:`render_twin` draws that copy.  What stays the same:

* the frames (positions) of every vertebra and disc: the neighbours do not move, the discs
  next to the healed body fill the (smaller) space between the endplates, so they get thinner;
* its confounders (osteophytes, endplate sclerosis, low density), sizes and intensities;
* the noise: ``render_scan`` draws from one random stream (background dots, then each body's
  trabecular texture over the body's bounding box, then the image noise).  The healed body is
  drawn in its fractured original's box (``VertebraSpec.body_box``; the box grows with a
  fracture, never shrinks, so the healed body fits), so every later draw sees the same
  numbers: outside the healed body, its two discs and the blur's reach, the twin's CT, vertebra
  and concept masks are bit-identical to the original's.

Healing must not push the body into a neighbour: the fractured vertebra was placed on the
spine with its collapsed height, so a full restoration can close a thin (degenerated or upper
thoracic) disc.  Then the restored part of the rim heights is cut back (bisection on the
fraction ``restored``) until each adjacent disc keeps :data:`MIN_DISC_MM` at its thinnest, and
the twin's truth says so (``truth["twin"]``).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from vfcore.errors import DataValueError, InvalidParameterError

from .anatomy import ScanSpec, VertebraSpec
from .bones import _body_box, body_fields
from .canvas import Grid, box
from .render import Scan, render_scan
from .sampling import MIMIC_MAX_LOSS

#: Normal central endplate concavity (fraction of H): the midpoint of the range
#: ``sample_scan`` draws for a vertebra without a fracture, uniform(0.015, 0.045).
NORMAL_DEPRESSION = 0.03
#: Radius (normalised) of that concavity: the midpoint of uniform(0.75, 0.9).
NORMAL_DEPRESSION_R = 0.825
#: The thinnest an adjacent disc may get when a body is healed (mm).
MIN_DISC_MM = 1.0
#: Genant: a height loss below 20 % is grade 0; a twin whose restoration was limited may
#: keep more (``truth["twin"]["grade0"]`` is False then).
GRADE1_LOSS = 0.20


def _index(spec: ScanSpec, label: int) -> int:
    labels = spec.labels
    if label not in labels:
        raise InvalidParameterError("label", f"a vertebra of {spec.case} ({labels})", label)
    k = labels.index(label)
    if spec.vertebrae[k].fracture is None:
        raise DataValueError(spec.case, f"vertebra {label} has no fracture to heal")
    return k


def _surface_points(v: VertebraSpec, side: int, step: float = 1.0) -> np.ndarray:
    """World points [n, 3] on the superior (side +1) or inferior (-1) endplate of ``v``."""
    a, b = v.W / 2, v.D / 2
    x, y = np.meshgrid(np.arange(-a, a + step, step), np.arange(-b, b + step, step),
                       indexing="ij")
    F, _ = v.cross_section(x, y, np.full_like(x, float(side)))
    x, y = x[F < 0.95], y[F < 0.95]
    top, bot = v.top_bottom(x, y)
    return v.frame.to_world(np.stack([x, y, top if side > 0 else bot], axis=1))


def _gap_into(points: np.ndarray, v: VertebraSpec, side: int) -> float:
    """Smallest distance (mm, along ``v``'s axis) from ``points`` to ``v``'s endplate ``side``
    (+1 superior: the points lie above it; -1 inferior: below it), over the points above
    ``v``'s cross-section; +inf when none is."""
    R = v.frame.rotation()
    local = (points - v.frame.o) @ R
    x, y, z = local[:, 0], local[:, 1], local[:, 2]
    F, _ = v.cross_section(x, y, np.full_like(x, float(side)))
    inside = F < 0.95
    if not inside.any():
        return float("inf")
    top, bot = v.top_bottom(x[inside], y[inside])
    gap = z[inside] - top if side > 0 else bot - z[inside]
    return float(gap.min())


def disc_gap(spec: ScanSpec, i: int) -> float:
    """Thinnest height (mm) of disc ``i``: the smallest distance between the two endplates
    around it, measured both ways (each endplate sampled on a 1 mm grid of its
    cross-section); negative where the bodies overlap."""
    d = spec.discs[i]
    up = spec.vertebrae[d.upper]
    low = spec.sacrum if d.lower >= len(spec.vertebrae) else spec.vertebrae[d.lower]
    return min(_gap_into(_surface_points(up, -1), low, +1),
               _gap_into(_surface_points(low, +1), up, -1))


def _healed_vertebra(v: VertebraSpec, restored: float) -> VertebraSpec:
    """A copy of ``v`` without its fracture; ``restored`` in [0, 1] of the lost rim height
    given back (1: the pre-fracture profile, 1 - wedge in front, 1 behind)."""
    h = copy.deepcopy(v)
    h.fracture = None
    h.body_box = _body_box(v)
    h.h_ant = v.h_ant + restored * ((1.0 - v.wedge) - v.h_ant)
    h.h_post = v.h_post + restored * (1.0 - v.h_post)
    h.dep_sup = h.dep_inf = NORMAL_DEPRESSION * v.H
    h.dep_r = NORMAL_DEPRESSION_R
    h.h_mid = 0.5 * (h.h_ant + h.h_post) - 2 * NORMAL_DEPRESSION
    h.heights = h.measure_heights()
    # as sample_scan does: a wedge too strong to be called normal is flattened
    while h.wedge > 0.0 and h.height_loss > MIMIC_MAX_LOSS and restored == 1.0:
        step = min(0.005, h.wedge)
        h.wedge -= step
        h.h_ant += step
        h.h_mid += step / 2
        h.heights = h.measure_heights()
    return h


def _with(spec: ScanSpec, k: int, v: VertebraSpec) -> ScanSpec:
    verts = list(spec.vertebrae)
    verts[k] = v
    return dataclasses.replace(spec, vertebrae=verts)


def _adjacent_discs(spec: ScanSpec, k: int) -> dict[str, int]:
    return {"above": k - 1, "below": k} if k > 0 else {"below": k}


def _box_overflow(v: VertebraSpec, step: float = 0.5) -> float:
    """How far (mm) the body of ``v`` reaches beyond ``v.body_box`` along its axis (0: fits)."""
    lo, hi = _body_box(v)
    a, b = v.W / 2, v.D / 2
    x, y = np.meshgrid(np.arange(-a, a + step, step), np.arange(-b, b + step, step),
                       indexing="ij")
    top, bot = v.top_bottom(x, y)
    inside = v.cross_section(x, y, np.zeros_like(x))[0] < 1
    return float(max(0.0, top[inside].max() - hi[2], lo[2] - bot[inside].min()))


def heal(spec: ScanSpec, label: int, min_disc_mm: float = MIN_DISC_MM) -> tuple[ScanSpec, dict]:
    """A copy of ``spec`` whose vertebra ``label`` is healed, and what was done (a dict).

    The healed vertebra: no fracture (grade 0, no signs), rim heights 1 - wedge in front and 1
    behind (fractions of H, the physiological wedge kept), endplate concavity
    :data:`NORMAL_DEPRESSION` * H, drawn in the original's box.  If that closes an adjacent
    disc below ``min_disc_mm`` (or below its original height,
    where that was thinner), only the fraction ``restored`` < 1 of the lost rim heights
    is given back (bisection, 20 steps); the dict records ``restored``, ``limited``, the
    healed ``height_loss`` and whether it is below Genant grade 1's 20 % (``grade0``), the
    thinnest disc heights before and after (``disc_gap_mm``) and ``box_overflow_mm``.
    ``spec`` is not changed.
    """
    k = _index(spec, label)
    v = spec.vertebrae[k]
    discs = _adjacent_discs(spec, k)

    def gaps(s: ScanSpec) -> dict[str, float]:
        return {side: disc_gap(s, i) for side, i in discs.items()}

    before = gaps(spec)
    # a disc already thinner than min_disc_mm (two collapsed neighbours) must not get thinner
    floor = {side: min(min_disc_mm, g) for side, g in before.items()}

    def fits(t: float) -> bool:
        after = gaps(_with(spec, k, _healed_vertebra(v, t)))
        return all(after[side] >= floor[side] for side in discs)

    restored = 1.0
    if not fits(1.0):
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        restored = lo
    healed = _healed_vertebra(v, restored)
    out = _with(spec, k, healed)
    after = gaps(out)
    info = {
        "healed_label": int(label),
        "original": {"grade": v.grade, "shape": v.shape, "height_loss": round(v.height_loss, 4),
                     "heights": {n: round(x, 4) for n, x in v.heights.items()}},
        "restored": round(restored, 4),
        "limited": restored < 1.0,
        "height_loss": round(healed.height_loss, 4),
        "grade0": healed.height_loss < GRADE1_LOSS,
        "disc_gap_mm": {side: {"original": round(before[side], 3), "healed": round(after[side], 3)}
                        for side in discs},
        "box_overflow_mm": round(_box_overflow(healed), 3),
    }
    return out, info


def _body_drawn(spec: ScanSpec, v: VertebraSpec) -> bool:
    """Whether ``render_scan`` draws the body of ``v`` (and so draws its texture's numbers)."""
    acq = spec.acq
    grid = Grid(acq.fov_lo, acq.fov_hi, acq.spacing)
    lo, hi = _body_box(v)
    sl = grid.window(box(v.frame, lo, hi))
    if sl is None:
        return False
    return bool(body_fields(v, *grid.local(sl, v.frame))[0].any())


def render_twin(spec: ScanSpec, label: int, min_disc_mm: float = MIN_DISC_MM) -> Scan:
    """The healed twin of ``spec`` for vertebra ``label`` (:func:`heal`), drawn.

    ``truth["twin"]`` holds :func:`heal`'s record.  :class:`DataValueError` when the original
    or the twin would not draw the body in the field of view (their random streams would
    part: only a vertebra whose body is in the scan can be healed).
    """
    twin, info = heal(spec, label, min_disc_mm)
    k = spec.labels.index(label)
    if not (_body_drawn(spec, spec.vertebrae[k]) and _body_drawn(twin, twin.vertebrae[k])):
        raise DataValueError(spec.case, f"the body of vertebra {label} is not in the field of "
                             "view: its healed twin would draw other random numbers")
    scan = render_scan(twin)
    scan.truth["twin"] = info
    return scan
