"""Bone and disc structures of the spine, each an implicit shape in its vertebra's local frame:
vertebral bodies (with fracture and confounder signs), discs, canal, posterior elements, ribs,
osteophytes and the sacrum."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .anatomy import SACRUM, ScanSpec, VertebraSpec
from .canvas import F32, Canvas, box, noise_attenuation
from .concepts import disc_value


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
    """Local box (lo, hi) around the body: its own extent, or ``v.body_box`` when set."""
    if v.body_box is not None:
        return v.body_box
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
    sl = cv.grid.window(box(v.frame, lo, hi))
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
    tex *= F32(1.0 / noise_attenuation(sig))
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
    sl = cv.grid.window(box(d.frame, (-a, -b, -slack), (a, b, slack)))
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
    sl = cv.grid.window(box(v.frame, (-ax - 1, y_c - by - 1, z0), (ax + 1, y_c + by + 1, z1)))
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
    sl = cv.grid.window(box(v.frame, lo, hi))
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
    sl = cv.grid.window(box(v.frame, lo, hi))
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
        sl = cv.grid.window(box(v.frame, lo, hi))
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
            sl = cv.grid.window(box(v.frame, lo, hi))
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
        sl = cv.grid.window(box(v.frame, lo, hi))
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
        sl = cv.grid.window(box(v.frame, c - rad - 1, c + rad + 1))
        if sl is None:
            continue
        x, y, z = cv.grid.local(sl, v.frame)
        F = ((x - F32(c[0])) / rad[0]) ** 2 + ((y - F32(c[1])) / rad[1]) ** 2 + ((z - F32(c[2])) / rad[2]) ** 2
        m = (F <= 1) & (cv.vert[sl] == 0) & (cv.concept[sl] != 26)
        hu = _bone_hu((1 - np.sqrt(F)) * rad.min(), 1.3, v.cortex_hu, v.trab_hu + 30, cv.aa)
        cv.paint(sl, m, hu, 26, 0)
