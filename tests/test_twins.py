"""Healed twins (issue 22): the phantom's healed copy of a fractured vertebra, its patches and
the ranking of units by how much they drop when the fracture heals.

Scans are small crops around one vertebra (a few hundred thousand voxels, under a second)."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import scipy
import pandas as pd
import pytest
import torch
from scipy import ndimage
from scipy.stats import binom

from vfcore.analysis import twins as TW
from vfcore.errors import DataValueError, InvalidParameterError
from vfcore.patches.geometry import straighten
from vfcore.phantom import render_scan, sample_scan
from vfcore.phantom.bones import _body_box
from vfcore.phantom.concepts import BODY
from vfcore.phantom.twins import GRADE1_LOSS, MIN_DISC_MM, disc_gap, heal, render_twin
from vfcore.verse import Volume

#: sample_scan(7, 0): L3 (22) is a grade 3 wedge fracture that heals fully; T7 (14) a grade 2
#: crush whose healing is limited by the thin disc above it (2.6 mm).
SEED, INDEX, HEALS, LIMITED = 7, 0, 22, 14
#: sha256 of ct, vert, concept and affine of ``_crop(sample_scan(7, 0), 22)`` rendered by
#: vfcore before the twins existed (main branch, PHANTOM_VERSION 4): drawing in a fixed body
#: box must not change a single voxel of an ordinary scan.
CROP_SHA256 = "0f8b835ac1ff1e6e1248d48fb0f8fe99d4003142a51843eb52f4600b4a98ff41"


def _crop(spec, label, spacing=(1.0, 1.0, 2.0), margin=(30.0, 30.0, 25.0)):
    """``spec`` with a small field of view around vertebra ``label`` and its discs."""
    v = spec.vertebrae[spec.labels.index(label)]
    half = np.array([max(v.W, v.D) / 2 + margin[0], max(v.W, v.D) / 2 + margin[1],
                     v.H + margin[2]])
    acq = dataclasses.replace(spec.acq, spacing=spacing, fov_lo=tuple(v.frame.o - half),
                              fov_hi=tuple(v.frame.o + half), axcodes="LPS")
    return dataclasses.replace(spec, acq=acq)


def _sha(scan) -> str:
    h = hashlib.sha256()
    for a in (scan.ct, scan.vert, scan.concept, scan.affine):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def spec():
    return _crop(sample_scan(SEED, INDEX), HEALS)


@pytest.fixture(scope="module")
def pair(spec):
    return render_scan(spec), render_twin(spec, HEALS)


def _local(scan, mask, frame):
    """Local (x, y, z) mm in ``frame`` of the voxels where ``mask``."""
    ijk = np.argwhere(mask).astype(np.float64)
    world = ijk @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    return (world - frame.o) @ frame.rotation()


# ------------------------------------------------------------------------------------------
# The phantom: healing, the twin's voxels, the unchanged renders
# ------------------------------------------------------------------------------------------

#: numpy and scipy versions with which CROP_SHA256 was checked (Colab's numpy 2.0.2 / scipy 1.13.1 and
#: 2.4.6 / 1.17.1): the oldest supported (numpy 1.24, scipy 1.10) draw the scan a little differently
#: (floating-point rounding), so there the checksum cannot say whether the twins changed a render.
CHECKSUM_VERSIONS = tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 0) and \
    tuple(int(v) for v in scipy.__version__.split(".")[:2]) >= (1, 13)


@pytest.mark.skipif(not CHECKSUM_VERSIONS, reason="CROP_SHA256 was recorded with numpy >= 2.0 and scipy >= 1.13")
def test_unmodified_render_is_unchanged(spec):
    assert _sha(render_scan(spec)) == CROP_SHA256
    heal(spec, HEALS)                                   # healing copies: spec is not changed
    assert _sha(render_scan(spec)) == CROP_SHA256


def test_heal_restores_the_pre_fracture_heights(spec):
    k = spec.labels.index(HEALS)
    v = spec.vertebrae[k]
    twin, info = heal(spec, HEALS)
    h = twin.vertebrae[k]
    assert v.fracture is not None and v.grade == 3               # the original is untouched
    assert h.fracture is None and h.grade == 0 and h.shape == 0
    assert info["restored"] == 1.0 and not info["limited"] and info["grade0"]
    # hand formula: rims 1 - wedge (front) and 1 (back); middle 1 - wedge / 2 minus the two
    # normal endplate concavities of 3 % (the bump is ~1 near the centre, ~0 at the rims)
    assert h.heights["anterior"] == pytest.approx(1 - v.wedge, abs=0.01)
    assert h.heights["posterior"] == pytest.approx(1.0, abs=0.01)
    assert h.heights["middle"] == pytest.approx(1 - v.wedge / 2 - 0.06, abs=0.01)
    assert h.osteophytes == v.osteophytes and h.trab_hu == v.trab_hu and h.W == v.W
    assert h.body_box == _body_box(v)                  # drawn in the original's box
    others = [i for i in range(len(spec.vertebrae)) if i != k]
    assert all(twin.vertebrae[i] is spec.vertebrae[i] for i in others)


def test_twin_truth_has_no_fracture(pair):
    original, twin = pair
    t = next(v for v in twin.truth["vertebrae"] if v["label"] == HEALS)
    o = next(v for v in original.truth["vertebrae"] if v["label"] == HEALS)
    assert o["grade"] == 3 and o["fracture_signs"] is not None
    assert t["grade"] == 0 and t["shape"] == 0 and t["fracture_signs"] is None
    assert t["height_loss"] < GRADE1_LOSS
    assert twin.truth["twin"]["healed_label"] == HEALS
    for a, b in zip(original.truth["vertebrae"], twin.truth["vertebrae"]):
        if a["label"] != HEALS:
            assert {**a, "voxels": 0} == {**b, "voxels": 0}


def _outside_neighbourhood(scan, spec, label):
    """Voxels beyond the healed vertebra's body box, dilated by 8 mm sideways (osteophytes,
    disc bulge, blur) and along its axis by the adjacent disc + 4 mm (the discs it thins)."""
    k = spec.labels.index(label)
    v = spec.vertebrae[k]
    lo, hi = (np.array(b) for b in _body_box(v))
    lo = lo - np.array([8.0, 8.0, spec.discs[k].height + 4.0])
    hi = hi + np.array([8.0, 8.0, spec.discs[k - 1].height + 4.0])
    p = _local(scan, np.ones(scan.ct.shape, bool), v.frame).reshape(*scan.ct.shape, 3)
    return np.any((p < lo) | (p > hi), axis=-1)


def test_twin_differs_only_near_the_healed_vertebra(spec, pair):
    original, twin = pair
    far = _outside_neighbourhood(original, spec, HEALS)
    assert far.mean() > 0.5 and spec.acq.noise_hu > 5         # most of the crop, noise in it
    for name in ("ct", "vert", "concept"):
        a, b = getattr(original, name), getattr(twin, name)
        assert np.array_equal(a[far], b[far]), name            # bit-identical, noise included
        assert (a != b).sum() > 100, name                       # ... and the healing is there
    assert np.array_equal(original.affine, twin.affine)
    # the test can fail: another noise stream differs almost everywhere far away
    other = render_scan(dataclasses.replace(spec, render_seed=spec.render_seed + 1))
    assert (other.ct[far] != original.ct[far]).mean() > 0.5


def test_healed_body_is_taller_and_fills_the_gap(spec, pair):
    original, twin = pair
    v = spec.vertebrae[spec.labels.index(HEALS)]
    body = lambda s: (s.vert == HEALS) & np.isin(s.concept, BODY)  # noqa: E731
    # body voxels at 1 x 1 x 2 mm: the healed body's volume grows about as its mean height
    grow = body(twin).sum() / body(original).sum()
    expected = (1 - v.wedge / 2) / (0.5 * (v.h_post + v.h_ant))
    assert grow > 1.05 and abs(grow - expected) < 0.15, (grow, expected)


def test_limited_healing_keeps_the_discs_open():
    spec = sample_scan(SEED, INDEX)
    k = spec.labels.index(LIMITED)
    twin, info = heal(spec, LIMITED)
    assert info["limited"] and 0.0 < info["restored"] < 1.0
    for side, i in (("above", k - 1), ("below", k)):
        floor = min(MIN_DISC_MM, disc_gap(spec, i))
        assert disc_gap(twin, i) >= floor - 1e-6
        assert info["disc_gap_mm"][side]["healed"] == pytest.approx(disc_gap(twin, i), abs=1e-3)
    full, _ = heal(spec, LIMITED, min_disc_mm=-math.inf)
    assert min(disc_gap(full, k - 1), disc_gap(full, k)) < MIN_DISC_MM  # the limit was needed
    # independent check on voxels (0.5 mm): the limited body does not touch the one above;
    # fully restored, it does
    fine = _crop(spec, LIMITED, spacing=(0.5, 0.5, 0.5), margin=(5.0, 5.0, 5.0))
    fine = dataclasses.replace(fine, acq=dataclasses.replace(fine.acq, noise_hu=0.0))
    above = spec.labels[k - 1]

    def touching(s) -> int:
        scan = render_scan(s)
        own = (scan.vert == LIMITED) & np.isin(scan.concept, BODY)
        nb = (scan.vert == above) & np.isin(scan.concept, BODY)
        return int((ndimage.binary_dilation(own) & nb).sum())

    assert touching(dataclasses.replace(twin, acq=fine.acq)) == 0
    assert touching(dataclasses.replace(full, acq=fine.acq)) > 0


def test_heal_bad_input(spec):
    with pytest.raises(InvalidParameterError, match="label"):
        heal(spec, 99)
    healthy = next(v.label for v in spec.vertebrae if v.fracture is None)
    with pytest.raises(DataValueError, match="no fracture"):
        heal(spec, healthy)


# ------------------------------------------------------------------------------------------
# Patches: one straightening for both
# ------------------------------------------------------------------------------------------

def test_twin_patches_are_aligned_and_differ_near_the_centre(pair):
    original, twin = pair
    centroids = {lb: original.affine[:3, :3] @ c + original.affine[:3, 3]
                 for lb, c in original.centroids.items()}
    ref = straighten(Volume(original.ct, original.affine), Volume(original.vert, original.affine),
                     centroids, HEALS, 96, 1.0)
    a = TW._cut(original.ct, original.affine, ref.affine, 96, 1, -1024, np.int16)
    b = TW._cut(twin.ct, original.affine, ref.affine, 96, 1, -1024, np.int16)
    assert np.array_equal(a, ref.ct)                    # the store's straightening, exactly
    diff = np.argwhere(a != b)
    assert len(diff) > 100
    r = np.abs(diff - 47.5).max(axis=1)                 # Chebyshev distance from the centre
    assert r.max() < 34                                 # inside the network's 64^3 field
    assert np.array_equal(a[:8], b[:8]) and np.array_equal(a[-8:], b[-8:])


# ------------------------------------------------------------------------------------------
# The network side: effects and ranking on a model whose fracture unit is known
# ------------------------------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    """Three units on a 1x1x1 convolution: 0 = +HU/100 (sees the bright band), 1 = -HU/100,
    2 = a constant 1; the logit is max(unit 0) - 5."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.features.weight[:] = torch.tensor([0.01, -0.01, 0.0]).reshape(3, 1, 1, 1, 1)
            self.features.bias[:] = torch.tensor([0.0, 0.0, 1.0])

    def forward(self, x):
        a = self.features(x)
        return a[:, :1].amax(dim=(2, 3, 4)) - 5.0


def _pairs(n=6, size=8):
    """Constructed pairs: background 0..100 HU; the original has a 400 HU band in the centre."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        healed = rng.integers(0, 100, (size,) * 3).astype(np.int16)
        original = healed.copy()
        original[3:5, 2:6, 2:6] = 400 + 100 * i
        out.append(TW.TwinPair(f"c{i}", 20, 2, 1, np.eye(4), original, healed,
                               np.zeros_like(original, np.uint8), np.zeros_like(healed, np.uint8),
                               {"restored": 1.0, "grade0": True}, 0.0))
    return out


def test_twin_effects_and_ranking_find_the_fracture_unit():
    pairs = _pairs()
    eff = TW.twin_effects(_Tiny(), "features", iter(pairs), batch_size=4,
                          transform=lambda hu: hu.float()[:, None])
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for i, p in enumerate(pairs):       # hand-computed: logit = max HU / 100 - 5
        row = eff.table.iloc[i]
        assert row["p_original"] == pytest.approx(sig(p.original.max() / 100 - 5), abs=1e-6)
        assert row["p_healed"] == pytest.approx(sig(p.healed.max() / 100 - 5), abs=1e-6)
        assert row["changed_voxels"] == 32
    T = np.array([2.0, 0.0, 0.5])
    table = TW.twin_ranking(eff, eff.table["p_original"].to_numpy() >= 0.0, T=T)
    top = table.iloc[0]
    assert top["unit"] == 0 and top["n"] == 6 and top["n_drop"] == 6 and top["n_rise"] == 0
    want = np.mean([(p.original.max() - p.healed.max()) / 100 for p in pairs])
    assert top["mean_drop"] == pytest.approx(want, rel=1e-5)
    assert top["p_sign"] == pytest.approx(2 * binom.pmf(6, 6, 0.5))     # 2 / 64
    assert top["c_original"] == 1.0 and top["c_healed"] == 0.0            # max 4+ vs < 1
    rest = table.set_index("unit").loc[[1, 2]]
    assert (rest["mean_drop"].abs() < 1e-6).all() and (rest["p_sign"] == 1.0).all()
    # the default subset: true positives (p >= 0.5: max >= 500 HU, pairs 1-5) with grade 0
    assert TW.twin_ranking(eff).iloc[0]["n"] == 5
    assert eff.delta_p_summary()["n"] == 5


def test_twin_ranking_bad_input():
    eff = TW.twin_effects(_Tiny(), "features", iter(_pairs(2)),
                          transform=lambda hu: hu.float()[:, None])
    with pytest.raises(InvalidParameterError, match="summary"):
        TW.twin_ranking(eff, summary="median")
    with pytest.raises(InvalidParameterError, match="T"):
        TW.twin_ranking(eff, T=np.zeros(5))
    with pytest.raises(DataValueError, match="no pair"):
        TW.twin_ranking(eff, np.zeros(2, bool))
    assert isinstance(eff.table, pd.DataFrame)
