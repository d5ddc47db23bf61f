"""Sampling the geometry of one scan from a seed: vertebrae, fractures, confounders, the curve.

:func:`sample_scan` draws a :class:`~vfcore.phantom.anatomy.ScanSpec` (cheap: no voxels);
the acquisition (spacing, orientation, field of view) comes from
:mod:`vfcore.phantom.acquisition`, the voxels from :mod:`vfcore.phantom.render`.
"""
from __future__ import annotations

import math

import numpy as np

from .acquisition import ACQ_KINDS, AXCODES, field_of_view, voxel_spacing
from .anatomy import (GRADE_LOSS, L6, LUMBAR, SACRUM, T13, THORACIC, _TABLE, Acquisition,
                      DiscSpec, Fracture, Frame, Osteophyte, ScanSpec, Schmorl, VertebraSpec,
                      level_q, level_size)


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


#: Share of non-fractured thoracic and thoraco-lumbar vertebrae given a strong physiological
#: wedge per unit of confounder rate above 1 (none at the default rate 1: those scans keep
#: their random streams).
WEDGE_MIMIC = 0.15
#: The largest measured height loss of a vertebra without a fracture (Genant grade 0: < 20 %).
MIMIC_MAX_LOSS = 0.19


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
    if fracture is None and confounder_rate > 1.0 and q < 13.0 \
            and rng.random() < WEDGE_MIMIC * (confounder_rate - 1.0):
        # the main fracture mimic, enriched above the rate 1: a strong physiological wedge
        # (16-19 % lower in front; the measured height loss stays short of grade 1's 20 %)
        wedge = max(wedge, float(rng.uniform(0.16, 0.19)))
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
    while v.fracture is None and v.wedge > 0.0 and v.height_loss > MIMIC_MAX_LOSS:
        step = min(0.005, v.wedge)    # a wedge too strong to be called normal: flatten it
        v.wedge -= step
        v.h_ant += step
        v.h_mid += step / 2
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


#: Shape of the gamma-distributed patient risk (mean 1): fractures cluster in patients.
RISK_SHAPE = 0.7


def fracture_probability(prevalence: float, hazard: np.ndarray) -> np.ndarray:
    """P(fracture) of each vertebra: ``1 - exp(-lambda * hazard)``, at most 0.9.

    ``hazard`` is the patient's risk times the level weight (mean 1 over patients and
    levels); ``lambda`` solves ``1 - E[exp(-lambda * risk)] = prevalence`` for the gamma
    risk, ``E[exp(-lambda R)] = (1 + lambda / k)^-k``, so the expected fraction of
    fractured vertebrae is ``prevalence`` at any rate, not only at small ones (a linear
    ``prevalence * hazard`` saturates: 0.36 realised for 0.5 asked).
    """
    k = RISK_SHAPE
    lam = k * ((1.0 - prevalence) ** (-1.0 / k) - 1.0)
    return np.minimum(1.0 - np.exp(-lam * np.asarray(hazard, dtype=np.float64)), 0.9)


def sample_scan(seed: int, index: int, prevalence: float = 0.12, confounders: float = 1.0,
                budget_s: float = 1.6) -> ScanSpec:
    """Draw the geometry of scan ``index`` of the data set with ``seed`` (cheap: no voxels).

    ``prevalence`` is the expected fraction of fractured vertebrae, at any rate
    (:func:`fracture_probability`); ``confounders`` scales the rate of Schmorl nodes,
    osteophytes and degenerated discs, and above 1 adds strong physiological wedges
    (:data:`WEDGE_MIMIC`); ``budget_s`` bounds the estimated drawing time
    (:func:`~vfcore.phantom.acquisition.scan_cost`) by covering fewer vertebrae in a large
    or finely sampled field of view.
    """
    ss = np.random.SeedSequence([int(seed), int(index)])
    rng = np.random.default_rng(ss)
    # the voxels' noise and the acquisition have streams of their own, so that another
    # prevalence changes the fractures, not how the scan was acquired
    render_ss, acq_ss = ss.spawn(2)
    render_seed = int(render_ss.generate_state(1)[0])
    arng = np.random.default_rng(acq_ss)
    thoracic = THORACIC + ([T13] if rng.random() < 0.06 else [])
    lumbar = LUMBAR + ([L6] if rng.random() < 0.06 else [])
    labels = thoracic + lumbar
    scale = float(rng.uniform(0.9, 1.1))
    osteoporotic = rng.random() < 0.18
    density = float(rng.uniform(0.3, 0.55) if osteoporotic else rng.uniform(0.6, 1.25))
    # patient-level fracture risk (fractures cluster in patients), level-weighted
    risk = float(rng.gamma(RISK_SHAPE, 1 / RISK_SHAPE))
    qs = np.array([level_q(lab) for lab in labels])
    w = _level_weights(qs)
    p = fracture_probability(prevalence, risk * w / w.mean())
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

    kind = str(arng.choice([k for k, _ in ACQ_KINDS], p=[p for _, p in ACQ_KINDS]))
    spacing = voxel_spacing(arng, kind)
    if kind == "sagittal":
        axcodes = str(arng.choice(["PIR", "PSR", "ASL", "PIL"]))
    else:
        axcodes = str(arng.choice(AXCODES))
    background = {
        "fat_back": float(rng.uniform(6, 30)),         # subcutaneous fat (back, flanks, front)
        "lung_limit": float(rng.uniform(10.2, 11.2)),  # level where the lungs end (posterior)
        "psoas": float(rng.uniform(0.8, 1.2)),
        "aorta_x": float(rng.uniform(-18, -6)),
        "torso_y": float(rng.uniform(15, 50)),          # torso centre anterior of the spine
        "torso_a": float(rng.uniform(145, 175)),        # half the torso's width
        "wall": float(rng.uniform(7, 14)),              # muscle of the chest / abdominal wall
        "waves": rng.normal(0, 1, (6, 4)).tolist(),      # smooth texture of the viscera
    }
    fov_lo, fov_hi, spacing, fov = field_of_view(arng, verts, spacing, budget_s, pts, kind,
                                                 background)
    acq = Acquisition(kind=kind, spacing=spacing, fov_lo=fov_lo, fov_hi=fov_hi, axcodes=axcodes,
                      psf_mm=float(arng.uniform(0.45, 0.9)), noise_hu=float(arng.uniform(10, 40)),
                      contrast=bool(arng.random() < 0.4), hu_offset=float(arng.normal(0, 6)),
                      fov=fov)
    return ScanSpec(case=f"sub-phantom{index:03d}", seed=int(seed), index=int(index),
                    vertebrae=verts, discs=disc_specs, sacrum=sacrum, curve_s=s, curve_p=pts,
                    curve_t=tan, anterior=anterior, acq=acq, background=background,
                    render_seed=render_seed)
