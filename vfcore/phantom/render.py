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

from .anatomy import SACRUM, ScanSpec
from .background import draw_background
from .bones import (body_centre, draw_body, draw_canal, draw_disc, draw_osteophytes,
                    draw_posterior, draw_rib, draw_sacrum)
from .canvas import F32, Canvas, Grid, noise_attenuation
from .concepts import disc_value


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
    att = noise_attenuation(sig)
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
        "field_of_view": acq.fov,
        "shape": [int(n) for n in shape],
        "psf_mm": round(acq.psf_mm, 3),
        "noise_hu": round(acq.noise_hu, 2),
        "contrast": acq.contrast,
        "height_positions": {"anterior": 0.4, "middle": 0.0, "posterior": -0.4},
        "vertebrae": vt,
    }
    return centroids, truth
