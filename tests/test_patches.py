"""vfcore.patches: straightening geometry, the patch store, and accuracy on phantom and real scans.

References are independent of the code under test: analytic functions of world coordinates,
frames built here by hand, the phantom's recorded truth, and the real VerSe fixtures.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import center_of_mass

from vfcore import patches
from vfcore.verse import Volume, find_cases, load_case, write_centroids

N = 96
H = (N - 1) / 2  # patch centre index 47.5


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def oblique_affine(zooms, angles_deg, origin, flip=(1, 1, 1)):
    """Voxel -> world affine: per-axis flips, zooms, then a rotation (an oblique scanner grid)."""
    from scipy.spatial.transform import Rotation

    r = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(np.asarray(flip) * np.asarray(zooms))
    a[:3, 3] = origin
    return a


def world_grid(shape, affine):
    """World mm of every voxel centre: [3, *shape]."""
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)


def hand_frame(c, e_S):
    """The frame of the method, built here by hand: e_A = world A minus its e_S part,
    e_L = e_S x e_A."""
    e_S = np.asarray(e_S, float) / np.linalg.norm(e_S)
    a = np.array([0.0, 1.0, 0.0])
    e_A = a - (a @ e_S) * e_S
    e_A /= np.linalg.norm(e_A)
    return np.asarray(c, float), e_S, e_A, np.cross(e_S, e_A)


def hand_world_points(c, e_S, e_A, e_L, idx):
    """world = c + r_i(-e_S) + r_j(-e_A) + r_k(e_L), r = index - 47.5 (issue 3, step 4)."""
    r = np.asarray(idx, float) - H
    return c + r[..., :1] * -e_S + r[..., 1:2] * -e_A + r[..., 2:3] * e_L


def angle_deg(u, v):
    u, v = np.asarray(u, float), np.asarray(v, float)
    cos = abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v)
    return float(np.degrees(np.arccos(np.clip(cos, 0, 1))))


# --------------------------------------------------------------------------------------------
# Hand-made volumes: sampled values equal the analytic function
# --------------------------------------------------------------------------------------------


def test_linear_function_sampled_exactly_on_oblique_anisotropic_grid():
    """A linear function of world mm is reproduced exactly by trilinear sampling."""
    shape = (70, 60, 45)
    aff = oblique_affine((1.7, 0.8, 3.0), (12, -20, 33), (-40.0, -30.0, -60.0), flip=(-1, 1, -1))
    X, Y, Z = world_grid(shape, aff)
    g = np.array([2.0, -3.0, 1.5])
    ct = Volume((g[0] * X + g[1] * Y + g[2] * Z + 7.0).astype(np.float32), aff)
    centre = aff[:3, :3] @ (np.array(shape) / 2) + aff[:3, 3]
    direction = np.array([0.3, -0.2, 1.0])  # cranial direction of a straight, oblique spine
    cw = {18: centre + 30 * direction / np.linalg.norm(direction), 19: centre,
          28: centre - 30 * direction / np.linalg.norm(direction)}
    p = patches.straighten(ct, None, cw, 19)

    c, e_S, e_A, e_L = hand_frame(centre, direction)
    idx = np.indices((N, N, N)).reshape(3, -1).T
    world = hand_world_points(c, e_S, e_A, e_L, idx)
    expected = (world @ g + 7.0).reshape(N, N, N)
    vox = np.linalg.solve(aff[:3, :3], (world - aff[:3, 3]).T)
    inside = np.all((vox >= 0) & (vox <= np.array(shape)[:, None] - 1), axis=0).reshape(N, N, N)
    assert inside.mean() > 0.2
    assert np.abs(p.ct[inside] - expected[inside]).max() <= 0.5 + 1e-3  # int16 rounding only
    outside = ~np.all((vox >= -0.5) & (vox <= np.array(shape)[:, None] - 0.5), axis=0)
    assert np.all(p.ct.reshape(-1)[outside] == -1024)
    assert p.out_of_field == pytest.approx(outside.mean(), abs=1e-6)
    # cubic B-spline interpolation also reproduces a linear function (away from the border)
    p3 = patches.straighten(ct, None, cw, 19, ct_order=3)
    deep = np.all((vox >= 4) & (vox <= np.array(shape)[:, None] - 5), axis=0).reshape(N, N, N)
    assert deep.mean() > 0.1
    assert np.abs(p3.ct[deep] - expected[deep]).max() <= 0.5 + 1e-2


def test_axes_point_inferior_posterior_left():
    """Patch axes 0, 1, 2 run towards the feet, the back and the patient's left (RAS world)."""
    shape = (80, 80, 80)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -40
    X, Y, Z = world_grid(shape, aff)
    cw = {20: np.array([0.0, 0.0, 30.0]), 21: np.zeros(3), 22: np.array([0.0, 0.0, -30.0])}
    # z (S) falls along axis 0, y (A) along axis 1, x (R) along axis 2
    for values, axis in ((Z, 0), (Y, 1), (X, 2)):
        p = patches.straighten(Volume(10 * values.astype(np.float32), aff), None, cw, 21)
        line = p.ct[tuple(slice(20, 76) if d == axis else 48 for d in range(3))].astype(float)
        assert np.all(np.diff(line) == -10), axis  # 1 mm per voxel
    assert nib.aff2axcodes(p.affine) == ("I", "P", "L")


def test_mask_nearest_neighbour_and_fill():
    """Labels: the value of the nearest source voxel, 0 outside the scan, never interpolated."""
    shape = (40, 50, 30)
    aff = oblique_affine((2.0, 1.2, 2.5), (5, 15, -25), (-30.0, -35.0, -40.0))
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 29, size=shape).astype(np.int16)
    mask = Volume(labels, aff)
    centre = aff[:3, :3] @ (np.array(shape) / 2) + aff[:3, 3]
    direction = np.array([-0.2, 0.4, 1.0])
    cw = {9: centre + 25 * direction / np.linalg.norm(direction), 10: centre,
          11: centre - 25 * direction / np.linalg.norm(direction)}
    p = patches.straighten(None, mask, cw, 10)
    c, e_S, e_A, e_L = hand_frame(centre, direction)
    idx = np.indices((N, N, N)).reshape(3, -1).T
    world = hand_world_points(c, e_S, e_A, e_L, idx)
    vox = np.linalg.solve(aff[:3, :3], (world - aff[:3, 3]).T)
    near = np.rint(vox).astype(int)
    inside = np.all((vox > -0.5) & (vox < np.array(shape)[:, None] - 0.5), axis=0)
    # away from exact half-voxel ties, the label is the one of the rounded index
    clear = inside & np.all(np.abs(vox - np.rint(vox)) < 0.49, axis=0)
    got = p.mask.reshape(-1)
    assert np.array_equal(got[clear], labels[tuple(n[clear] for n in near)])
    assert np.all(got[~inside] == 0)
    assert set(np.unique(got)) <= set(range(0, 29))


def test_spline_tangent_on_a_circle():
    """Centroids on a circular arc (radius 250 mm): the frame follows the analytic tangent."""
    radius, step = 250.0, 30.0
    phi = np.arange(12) * step / radius  # arc from head (phi = 0) to feet
    pts = {lb: np.array([0.0, radius * (1 - np.cos(f)), -radius * np.sin(f)])
           for lb, f in zip(range(8, 20), phi)}  # a kyphosis in the sagittal (y, z) plane
    spine = patches.fit_spine(pts)
    for lb, f in zip(range(8, 20), phi):
        frame = patches.spine_frame(spine, lb)
        cranial = np.array([0.0, -np.sin(f), np.cos(f)])  # d/d(-phi) of the arc, unit
        err = angle_deg(frame.e_S, cranial)
        assert frame.e_S @ cranial > 0
        assert err < (1.0 if lb in (8, 19) else 0.2), (lb, err)
        assert np.allclose(frame.e_L, [-1, 0, 0], atol=1e-9)  # the sagittal curve keeps L = -x


def test_one_and_two_centroids():
    """Two centroids: the line through them; one: the scanner's superior axis, with a warning."""
    two = {20: np.array([0.0, 10.0, 30.0]), 21: np.array([0.0, 0.0, 0.0])}
    f = patches.spine_frame(patches.fit_spine(two), 21)
    assert np.allclose(f.e_S, np.array([0, 10, 30]) / np.linalg.norm([0, 10, 30]))
    one = {21: np.array([1.0, 2.0, 3.0])}
    with pytest.warns(UserWarning, match="only one body centroid"):
        f = patches.spine_frame(patches.fit_spine(one), 21)
    assert np.allclose(f.e_S, [0, 0, 1]) and np.allclose(f.e_A, [0, 1, 0])
    assert np.allclose(f.e_L, [-1, 0, 0])


def test_cranial_direction_does_not_depend_on_world_sign():
    """e_S points to the cranial neighbour even when label order and world z disagree."""
    upside = {8: np.array([0.0, 0.0, -100.0]), 9: np.array([0.0, 0.0, -70.0]),
              10: np.array([0.0, 0.0, -40.0])}  # T1 below T3 in world z (odd, but possible)
    f = patches.spine_frame(patches.fit_spine(upside), 9)
    assert np.allclose(f.e_S, [0, 0, -1])
    assert np.allclose(np.cross(f.e_S, f.e_A), f.e_L)


def test_coinciding_centroids_rejected():
    from vfcore.errors import GeometryError

    with pytest.raises(GeometryError, match="coincide"):
        patches.fit_spine({20: np.zeros(3), 21: np.zeros(3), 22: np.ones(3)})


# --------------------------------------------------------------------------------------------
# Real fixtures: centre voxel label and body axis
# --------------------------------------------------------------------------------------------


def body_of(m: np.ndarray) -> np.ndarray:
    """The vertebral body of a straightened whole-vertebra mask: voxels anterior of the canal.

    Walk from the patch centre towards posterior along the mid-sagittal strip until the mask
    ends (the spinal canal); the body is what lies anterior of that.
    """
    strip = m[44:52, :, 44:52].any(axis=(0, 2))
    j = 48
    while j < N - 1 and strip[j]:
        j += 1
    return m & (np.arange(N) < j)[None, :, None]


def si_axis_angle(body: np.ndarray) -> float:
    """Angle between patch axis 0 and the body's SI axis (centroid of the lower half minus the
    centroid of the upper half, split at the body's centre)."""
    idx = np.argwhere(body).astype(float)
    mid = idx[:, 0].mean()
    axis = idx[idx[:, 0] > mid].mean(0) - idx[idx[:, 0] < mid].mean(0)
    return angle_deg(axis, [1, 0, 0])


#: Vertebrae whose body axis is not expected within 5 degrees of the spline through the body
#: centroids: the last centroid of the spine at the lordotic, wedge-shaped L5 (sub-verse004 and
#: ctfu L5, 10-16 degrees: in real spines the centroid line and the bodies' own axes differ
#: where the bodies grow in depth and wedge) and fractured bodies (sub-verse004 T9 and T10
#: grade 2, L1 grade 3: a collapsed body has no clean axis). Their angles are printed and
#: bounded at 20 degrees. TPTBox L2 and L4 are fragments cut by the field of view: no body
#: axis to measure (only the centre label is checked).
LOOSE = {("sub-verse004", 16), ("sub-verse004", 17), ("sub-verse004", 20), ("sub-verse004", 24),
         ("sub-ctfu00001_ses-20080508_ce-no", 24)}
FRAGMENTS = {("sub-ct_label-22", 21), ("sub-ct_label-22", 23)}


@pytest.mark.parametrize("sample", ["fxgrader_ctfu", "anjany_verse_sample", "tptbox_sample_ct"])
def test_real_fixture_patches(fixtures_dir, sample):
    case = find_cases(fixtures_dir / sample, require_ct=sample != "anjany_verse_sample")[0]
    data = load_case(case)
    ref = data.ct if data.ct is not None else data.mask
    if data.centroids is not None:
        cw = data.centroids.world(ref.affine)
    else:  # TPTBox: body centroid = centre of mass of (vert == L) & (subreg == 50), computed here
        body = data.subreg.data == 50
        cw = {}
        for lb in (21, 22, 23):
            com = center_of_mass((data.mask.data == lb) & body)
            cw[lb] = ref.affine[:3, :3] @ np.array(com) + ref.affine[:3, 3]
    report = []
    for lb in sorted(cw):
        p = patches.straighten(data.ct, data.mask, cw, lb)
        assert p.mask.shape == (N, N, N) and p.mask.dtype == np.uint8
        if data.ct is not None:
            assert p.ct.dtype == np.int16
            # linear interpolation stays within the source's range (plus the -1024 fill)
            assert min(data.ct.data.min(), -1024) - 1 <= p.ct.min()
            assert p.ct.max() <= data.ct.data.max() + 1
        centre = p.mask[47:49, 47:49, 47:49]
        assert np.all(centre == lb), (lb, np.unique(centre))
        if (case.case_id, lb) in FRAGMENTS:
            continue
        angle = si_axis_angle(body_of(p.mask == lb))
        report.append(f"{lb}:{angle:.1f}")
        limit = 20.0 if (case.case_id, lb) in LOOSE else 5.0
        assert angle < limit, (case.case_id, lb, angle)
    print(case.case_id, "body SI axis vs patch axis 0 (deg):", " ".join(report))


def test_real_ct_values_preserved(fixtures_dir):
    """HU survive the uint8 + scl_slope/inter storage: the patch equals the scaled source CT
    interpolated (here, with its own code) at the 8 central patch points."""
    from scipy.ndimage import map_coordinates

    case = find_cases(fixtures_dir / "fxgrader_ctfu")[0]
    data = load_case(case)
    raw = nib.load(case.ct)
    stored = np.asarray(raw.dataobj.get_unscaled())
    assert stored.dtype == np.uint8
    hu = stored.astype(np.float64) * raw.dataobj.slope + raw.dataobj.inter
    cw = data.centroids.world(data.ct.affine)
    p = patches.straighten(data.ct, None, cw, 22)
    f = p.frame
    offsets = np.array([[a, b, c] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5)])
    world = f.c + offsets[:, :1] * -f.e_S + offsets[:, 1:2] * -f.e_A + offsets[:, 2:] * f.e_L
    vox = np.linalg.solve(raw.affine[:3, :3], (world - raw.affine[:3, 3]).T)
    expected = map_coordinates(hu, vox, order=1)
    got = p.ct[47:49, 47:49, 47:49].reshape(-1).astype(float)
    assert np.abs(got - expected).max() <= 0.51
    assert 0 < expected.mean() < 600  # trabecular bone, not raw uint8 codes


# --------------------------------------------------------------------------------------------
# The patch store
# --------------------------------------------------------------------------------------------


def write_tiny_root(root: Path, specs: list[dict]) -> Path:
    """A VerSe-layout root of small synthetic scans: boxes of bone along an oblique spine."""
    for spec in specs:
        stem, shape = spec["stem"], spec.get("shape", (40, 36, 60))
        aff = oblique_affine(spec.get("zooms", (2.0, 2.0, 2.5)), spec.get("angles", (4, -6, 10)),
                             spec.get("origin", (-40.0, -36.0, -75.0)))
        sub = stem.split("_")[0]
        base = root / spec.get("folder", "")
        raw, der = base / "rawdata" / sub, base / "derivatives" / sub
        raw.mkdir(parents=True, exist_ok=True)
        der.mkdir(parents=True, exist_ok=True)
        X, Y, Z = world_grid(shape, aff)
        ct = np.full(shape, -50.0, dtype=np.float32)
        mask = np.zeros(shape, dtype=np.uint8)
        labels = spec["labels"]
        zs = {lb: 45.0 - 30.0 * i for i, lb in enumerate(labels)}
        for lb, z in zs.items():
            box = (np.abs(Z - z) < 11) & (np.abs(X) < 16) & (np.abs(Y) < 13)
            mask[box] = lb
            ct[box] = 300 + 10 * lb
        ct += np.random.default_rng(spec.get("seed", 0)).normal(0, 5, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.rint(ct).astype(np.int16), aff), raw / f"{stem}_ct.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), der / f"{stem}_seg-vert_msk.nii.gz")
        inv = np.linalg.inv(aff)
        voxel = {lb: inv[:3, :3] @ np.array([0.0, 0.0, z]) + inv[:3, 3]
                 for lb, z in zs.items() if lb not in spec.get("no_centroid", ())}
        write_centroids(der / f"{stem}_seg-subreg_ctd.json", voxel, aff)
    grades = [(s["stem"], lb, g) for s in specs for lb, g in s.get("grades", {}).items()]
    pd.DataFrame(grades, columns=["case", "label", "grade"]).assign(shape="").to_csv(
        root / "fracture_grades.tsv", sep="\t", index=False)
    return root


SPECS = [
    {"stem": "sub-a01", "labels": [7, 8, 9, 10], "grades": {8: 0, 9: 2, 10: "x"}, "seed": 1},
    {"stem": "sub-a02", "labels": [19, 20, 21, 22], "grades": {19: 0, 20: 0, 21: 1}, "seed": 2,
     "no_centroid": (22,)},
    {"stem": "sub-a03_split-b01", "labels": [15, 16, 17], "grades": {15: 0, 16: 0, 17: 0},
     "seed": 3},
    {"stem": "sub-a03_split-b02", "labels": [18, 19, 20], "grades": {18: 3, 19: 0}, "seed": 4},
]


def store_bytes(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes()
            for p in sorted((run / "patches").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_tiny_root(tmp_path_factory.mktemp("tiny"), SPECS)


@pytest.fixture(scope="module")
def reference_run(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    manifest = patches.extract_patches(tiny_root, run, seed=3, progress=False)
    return run, manifest


def test_store_manifest_and_report(reference_run):
    run, m = reference_run
    assert list(m.columns) == patches.MANIFEST_COLUMNS
    # cervical C7 (sub-a01) and L3 without centroid (sub-a02) are not extracted
    assert sorted(zip(m["case"], m["label"])) == sorted(
        [("sub-a01", 8), ("sub-a01", 9), ("sub-a01", 10), ("sub-a02", 19), ("sub-a02", 20),
         ("sub-a02", 21), ("sub-a03_split-b01", 15), ("sub-a03_split-b01", 16),
         ("sub-a03_split-b01", 17), ("sub-a03_split-b02", 18), ("sub-a03_split-b02", 19),
         ("sub-a03_split-b02", 20)])
    row = m.set_index(["case", "label"])
    assert row.loc[("sub-a01", 9), "fracture"] == 1 and row.loc[("sub-a01", 9), "grade"] == 2
    assert row.loc[("sub-a01", 8), "fracture"] == 0
    assert pd.isna(row.loc[("sub-a01", 10), "fracture"])
    assert row.loc[("sub-a01", 10), "reason"] == "foreign material (x)"
    assert row.loc[("sub-a03_split-b02", 20), "reason"] == "not graded"
    assert row.loc[("sub-a03_split-b01", 15), "level"] == "T8"
    assert row.loc[("sub-a03_split-b01", 15), "patient"] == "sub-a03"
    report = json.loads((run / "patches" / "report.json").read_text())
    skipped = {(s["case"], s["label"]): s["reason"] for s in report["skipped"]}
    assert "cervical" in skipped[("sub-a01", 7)]
    assert "without a body centroid" in skipped[("sub-a02", 22)]
    assert report["failed"] == []
    for r in m.itertuples():
        ct = np.load(run / "patches" / r.ct_path)
        mask = np.load(run / "patches" / r.mask_path)
        assert ct.shape == mask.shape == (N, N, N)
        assert ct.dtype == np.int16 and mask.dtype == np.uint8
        assert mask[48, 48, 48] == r.label
        assert r.concept_path == ""
        assert 0 <= r.out_of_field < 1


def test_patient_level_split(reference_run):
    _, m = reference_run
    per_patient = m.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(m["split"]) <= {"train", "val", "test"}


def test_patient_splits_function():
    rng = np.random.default_rng(1)
    has_fx = {f"sub-{i:03d}": bool(rng.random() < 0.3) for i in range(60)}
    split = patches.patient_splits(has_fx, seed=5, fractions=(0.6, 0.2, 0.2),
                                   fixed={"sub-000": "test", "sub-001": "val"})
    assert set(split) == set(has_fx)
    assert split["sub-000"] == "test" and split["sub-001"] == "val"
    for s in ("train", "val", "test"):
        fx = [p for p in split if split[p] == s and has_fx[p]]
        assert fx, f"no fractured patient in {s}"
    counts = pd.Series(split).value_counts()
    assert counts["train"] > counts["val"] and counts["train"] > counts["test"]
    assert patches.patient_splits(has_fx, seed=5) == patches.patient_splits(has_fx, seed=5)
    assert patches.patient_splits(has_fx, seed=5) != patches.patient_splits(has_fx, seed=6)


def test_official_release_split_used(tmp_path):
    root = write_tiny_root(tmp_path / "root", [
        {"stem": "sub-v01", "labels": [19, 20, 21], "folder": "dataset-verse19test"},
        {"stem": "sub-v02", "labels": [19, 20, 21], "folder": "dataset-02validation"},
    ])
    m = patches.extract_patches(root, tmp_path / "run", progress=False)
    assert set(m.loc[m["patient"] == "sub-v01", "split"]) == {"test"}
    assert set(m.loc[m["patient"] == "sub-v02", "split"]) == {"val"}
    assert set(m["reason"]) == {"not graded"}


def test_rerun_skips_and_interrupted_run_is_byte_identical(tiny_root, reference_run, tmp_path,
                                                           monkeypatch):
    ref_run, _ = reference_run
    expected = store_bytes(ref_run)
    run = tmp_path / "run"
    calls = {"n": 0}
    real_save = patches.save_npy

    def dying_save(path, array):
        calls["n"] += 1
        if calls["n"] == 8:  # in the middle of the second case
            raise KeyboardInterrupt
        return real_save(path, array)

    monkeypatch.setattr(patches.store, "save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        patches.extract_patches(tiny_root, run, seed=3, progress=False)
    monkeypatch.setattr(patches.store, "save_npy", real_save)
    assert not (run / "patches" / "manifest.csv").exists()
    # temporaries as a SIGKILL leaves them (vfcore.io names them .<target>.<random>.part<suffix>)
    (run / "patches" / "sub-a01" / ".T3_ct.npy.x1y2.part.npy").write_bytes(b"half")
    (run / "patches" / ".manifest.csv.x1y2.part").write_bytes(b"half")
    patches.extract_patches(tiny_root, run, seed=3, progress=False)
    assert store_bytes(run) == expected

    # a second run redoes nothing: no patch file is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (run / "patches").rglob("*.npy")}
    calls["n"] = 0
    monkeypatch.setattr(patches.store, "save_npy", lambda *a: calls.__setitem__("n", calls["n"] + 1))
    patches.extract_patches(tiny_root, run, seed=3, progress=False)
    assert calls["n"] == 0
    assert {p: p.stat().st_mtime_ns for p in (run / "patches").rglob("*.npy")} == stamps
    assert store_bytes(run) == expected


def test_changed_source_redone_and_failing_scan_reported(tmp_path):
    root = write_tiny_root(tmp_path / "root", SPECS[:2])
    run = tmp_path / "run"
    m1 = patches.extract_patches(root, run, progress=False)
    old_ct = {r.ct_path: np.load(run / "patches" / r.ct_path) for r in m1.itertuples()}
    # change the CT of sub-a02: its patches and checksum change, sub-a01 stays as it was
    ct_path = root / "rawdata" / "sub-a02" / "sub-a02_ct.nii.gz"
    img = nib.load(ct_path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + np.int16(100), img.affine), ct_path)
    # and break sub-a01's CT: it fails, listed in the report; sub-a02 still succeeds
    bad = root / "rawdata" / "sub-a01" / "sub-a01_ct.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    m2 = patches.extract_patches(root, run, progress=False, workers=2)
    report = json.loads((run / "patches" / "report.json").read_text())
    assert [f["case"] for f in report["failed"]] == ["sub-a01"]
    assert "CorruptFileError" in report["failed"][0]["reason"]
    assert "sub-a01_ct.nii.gz" in report["failed"][0]["reason"]
    assert set(m2["case"]) == {"sub-a02"}
    old = m1.set_index(["case", "label"]).loc["sub-a02"]
    new = m2.set_index(["case", "label"]).loc["sub-a02"]
    assert (old["source_sha256"] != new["source_sha256"]).all()
    for r in new.itertuples():
        ct, ct_old = np.load(run / "patches" / r.ct_path).astype(int), old_ct[r.ct_path]
        inside = ct_old != -1024
        assert inside.mean() > 0.1
        assert np.abs(ct[inside] - ct_old[inside] - 100).max() <= 1
    assert not [p for p in (run / "patches").rglob(".*")]  # no half-written files anywhere


def test_corrupt_centroids_reported(tmp_path):
    root = write_tiny_root(tmp_path / "root", SPECS[1:3])
    ctd = root / "derivatives" / "sub-a02" / "sub-a02_seg-subreg_ctd.json"
    entries = json.loads(ctd.read_text())
    entries[0]["direction"] = ["L", "A", "S"]  # disagrees with the image
    ctd.write_text(json.dumps(entries))
    patches.extract_patches(root, tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "patches" / "report.json").read_text())
    assert [f["case"] for f in report["failed"]] == ["sub-a02"]
    assert "GeometryError" in report["failed"][0]["reason"]
    assert report["extracted"] == 1


def _report(run: Path) -> dict:
    return json.loads((run / "patches" / "report.json").read_text())


def _without_report(store: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in store.items() if not k.endswith("report.json")}


def test_dying_worker_is_retried_once_in_a_fresh_process(tiny_root, reference_run, tmp_path,
                                                         monkeypatch):
    """Issue 13, case 2: the worker of sub-a02 is SIGKILLed once (as the OOM killer does):
    the scan is retried alone, every scan ends up in the store, byte-identical to a clean run."""
    ref_run, _ = reference_run
    run, flag = tmp_path / "run", tmp_path / "died-once"
    monkeypatch.setenv(patches.KILL_ENV, f"sub-a02:{flag}")
    patches.extract_patches(tiny_root, run, seed=3, workers=2, progress=False)
    assert flag.exists()  # the worker did die
    report = _report(run)
    assert report["failed"] == []
    assert "sub-a02" in report["retried"]
    assert _without_report(store_bytes(run)) == _without_report(store_bytes(ref_run))
    assert not [p for p in (run / "patches").rglob(".*")]


def test_worker_that_always_dies_is_reported_and_the_others_finish(tiny_root, reference_run,
                                                                    tmp_path, monkeypatch):
    """Issue 13, case 2: a scan whose worker dies every time is one line of report.json; no raw
    BrokenProcessPool, the other scans finish, manifest and report are written."""
    ref_run, ref = reference_run
    run = tmp_path / "run"
    monkeypatch.setenv(patches.KILL_ENV, "sub-a02")
    m = patches.extract_patches(tiny_root, run, seed=3, workers=2, progress=False)
    report = _report(run)
    assert [f["case"] for f in report["failed"]] == ["sub-a02"]
    assert "WorkerDied" in report["failed"][0]["reason"]
    assert set(m["case"]) == set(ref["case"]) - {"sub-a02"}
    assert report["extracted"] == ref["case"].nunique() - 1
    for case in set(m["case"]):  # the finished scans are exactly those of a clean run
        for path in (run / "patches" / case).iterdir():
            assert path.read_bytes() == (ref_run / "patches" / case / path.name).read_bytes()
    assert not (run / "patches" / "sub-a02" / patches.RECORD_NAME).exists()
    assert not [p for p in (run / "patches").rglob(".*")]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_resume_notices_a_damaged_patch(tiny_root, reference_run, tmp_path, capsys, damage):
    """Issue 13, case 3: a truncated, bit-flipped or deleted patch is noticed on resume (sha256
    recorded when written), its case re-extracted and said so; the store is then byte-identical
    to a fresh one."""
    import shutil

    ref_run, ref = reference_run
    run = tmp_path / "run"
    shutil.copytree(ref_run / "patches", run / "patches")
    rel = ref.loc[ref["case"] == "sub-a02", "ct_path"].iloc[1]
    victim = run / "patches" / rel
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "bitflip":
        data[len(data) - 1000] ^= 0x10
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    capsys.readouterr()
    patches.extract_patches(tiny_root, run, seed=3, progress=False)
    out = capsys.readouterr().out
    assert "sub-a02 re-extracted" in out and victim.name in out
    report = _report(run)
    assert [r["case"] for r in report["redone"]] == ["sub-a02"]
    assert victim.name in report["redone"][0]["reason"]
    assert _without_report(store_bytes(run)) == _without_report(store_bytes(ref_run))
    report.pop("redone")
    expected = _report(ref_run)
    expected.pop("redone")
    assert report == expected



# --------------------------------------------------------------------------------------------
# Accuracy on the phantom, where the truth is known (issue 3)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from vfcore.phantom import write_phantom_root

    return Path(write_phantom_root(tmp_path_factory.mktemp("phantom") / "data",
                                           n_scans=PHANTOM_SCANS, seed=PHANTOM_SEED, workers=1,
                                           progress=False))


PHANTOM_SEED, PHANTOM_SCANS = 3, 3


def truth_of(case) -> dict:
    stem = case.mask.name.replace("_seg-vert_msk.nii.gz", "")
    return json.loads((case.mask.parent / f"{stem}_phantom-truth.json").read_text())


def near_kyphotic_fracture(vertebrae: list[dict], i: int) -> bool:
    """The vertebra or a neighbour is a wedge or crush fracture (any grade): the phantom's spine
    bends inside that body (by about 14 degrees for a grade-1 wedge), and a smooth curve through
    body centroids cannot follow a bend concentrated in one body. On 60 phantom scans (seed 1)
    the spline axis there was off by up to 15 degrees (median 0.7); everywhere else by at most
    2.6 degrees (median 0.2)."""
    return any(v["grade"] >= 1 and v["shape"] in (1, 3)
               for v in vertebrae[max(i - 1, 0): i + 2])


def test_phantom_accuracy(phantom_root):
    """Patch centre within 1 mm of the true body centre, patch axis 0 within 3 degrees of the
    true inferior axis, on curved, anisotropic, obliquely oriented phantom scans (every
    vertebra; at and next to wedge/crush fractures within 20 degrees, see
    :func:`near_kyphotic_fracture`).

    Independent measurement: the scan's own world coordinates (x, y, z in 0.1 mm, built here
    from the affine) are straightened like a CT; the patch then holds, voxel by voxel, the
    world point it was sampled from. Its centre and its axis-0 direction are read from the
    patch and compared with the phantom's recorded truth."""
    cases = find_cases(phantom_root)
    assert len(cases) == PHANTOM_SCANS
    properties = []
    offsets, angles, exempt = [], [], []
    for case in cases:
        data = load_case(case)
        truth = truth_of(case)
        aff, shape = data.ct.affine, data.ct.shape
        zooms = np.linalg.norm(aff[:3, :3], axis=0)
        # world mm + 1000, in 0.1 mm units: positive and within int16; -1024 = outside the scan
        world = (world_grid(shape, aff) + 1000).astype(np.float32) * 10
        coord_volumes = [Volume(w, aff) for w in world]
        cw = data.centroids.world(aff)
        verts = [v for v in truth["vertebrae"] if v["label"] in cw]
        sup = np.array([v["superior"] for v in verts])
        curve = max(angle_deg(a, b) for a in sup for b in sup)
        properties.append((zooms.max() / zooms.min(), "".join(data.ct.axcodes), curve))
        order = [u["label"] for u in truth["vertebrae"]]  # every drawn vertebra, head to feet
        for v in verts:
            lb = v["label"]
            sampled = np.stack([patches.straighten(vol, None, cw, lb).ct for vol in coord_volumes],
                               axis=-1)
            valid = np.all(sampled != -1024, axis=-1)
            xyz = sampled.astype(np.float64) / 10 - 1000   # world point of every patch voxel
            assert valid[47:49, 47:49, 47:49].all()
            centre = xyz[47:49, 47:49, 47:49].reshape(-1, 3).mean(0)
            # axis 0 direction: least-squares line through the central column's world points
            rows = np.flatnonzero(valid[:, 48, 48])
            slope = np.polyfit(rows, xyz[rows, 48, 48], 1)[0]  # mm per voxel along axis 0
            assert np.linalg.norm(slope) == pytest.approx(1.0, abs=0.01)  # 1 mm voxels
            offset = float(np.linalg.norm(centre - np.array(v["body_centre"])))
            angle = angle_deg(-slope, v["superior"])
            assert float(np.dot(-slope, v["superior"])) > 0, "patch axis 0 must point inferior"
            offsets.append(offset)
            if near_kyphotic_fracture(truth["vertebrae"], order.index(lb)):
                exempt.append((case.case_id, v["label"], round(angle, 2)))
                assert angle < 20.0, (case.case_id, lb, angle)
            else:
                angles.append(angle)
                assert angle < 3.0, (case.case_id, lb, angle)
            assert offset < 1.0, (case.case_id, lb, offset)
    assert any(r > 1.5 for r, _, _ in properties), f"no anisotropic scan: {properties}"
    assert any(c != "RAS" for _, c, _ in properties), f"no oblique orientation: {properties}"
    assert any(k > 10 for _, _, k in properties), f"no curved spine: {properties}"
    print(f"phantom: {len(offsets)} vertebrae, max centre offset {max(offsets):.3f} mm, "
          f"axis angle max {max(angles):.2f} / median {np.median(angles):.2f} deg; "
          f"near kyphotic fractures (not held to 3 deg): {exempt}; scans "
          "(anisotropy, axcodes, curvature deg): "
          f"{[(round(a, 2), c, round(k, 1)) for a, c, k in properties]}")


def test_phantom_patch_content(phantom_root):
    """The patch content agrees with the truth: for intact vertebrae the body's concept voxels
    are centred (within 1.5 mm: voxelised, possibly wedge-shaped bodies) and the superior
    endplate lies above the inferior one along axis 0; grades reach the manifest."""
    run = phantom_root.parent / "run"
    m = patches.extract_patches(phantom_root, run, progress=False)
    assert (m["concept_path"] != "").all()
    assert m["fracture"].notna().all()
    cases = {c.case_id: c for c in find_cases(phantom_root)}
    checked = 0
    for case_id, rows in m.groupby("case"):
        truth = {v["label"]: v for v in truth_of(cases[case_id])["vertebrae"]}
        for r in rows.itertuples():
            mask = np.load(run / "patches" / r.mask_path)
            concept = np.load(run / "patches" / r.concept_path)
            assert mask[47:49, 47:49, 47:49].min() == r.label
            own = mask == r.label
            assert truth[r.label]["grade"] == r.grade
            if r.grade > 0:  # a fracture replaces the endplates by the deformity zone
                continue
            if r.out_of_field > 0.2:  # the scan's border may cut the body: no clean endplates
                continue
            if any(c.startswith("Schmorl node") for c in truth[r.label]["confounders"]):
                continue  # the node replaces part of one endplate (its own concept): off-centre
            checked += 1
            sup = np.argwhere(own & (concept == 1)).mean(0)
            inf = np.argwhere(own & (concept == 2)).mean(0)
            assert sup[0] < 47.5 < inf[0], (case_id, r.level, sup, inf)  # superior endplate above
            # 6.5: a normal, slightly wedged T6 of the v4 phantom measures 6.005 (v3 stayed < 6)
            assert angle_deg(inf - sup, [1, 0, 0]) < 6.5, (case_id, r.level, sup, inf)
            body = own & np.isin(concept, [1, 2, 3, 4, 5, 6, 9, 11])
            com = np.argwhere(body).mean(0) - H
            assert np.linalg.norm(com) < 1.5, (case_id, r.level, com)
    assert checked >= 10


def test_a_roots_split_table_pins_dissection_only_scans(tmp_path):
    """The phantom's dissection-only scans land in the split `dissect`, nothing else does, and
    the first scans are the same files with or without them."""
    from vfcore.phantom import write_phantom_root
    from vfcore.patches import read_manifest, extract_patches

    plain = write_phantom_root(tmp_path / "plain", n_scans=3, seed=5, progress=False)
    root = write_phantom_root(tmp_path / "data", n_scans=3, seed=5, progress=False,
                              dissect_scans=2, dissect_prevalence=0.6)
    table = (root / "splits.tsv").read_text().splitlines()
    assert table == ["patient\tsplit", "sub-phantom003\tdissect", "sub-phantom004\tdissect"]
    for name in ("sub-phantom000", "sub-phantom002"):
        a = (plain / "rawdata" / name / f"{name}_ct.nii.gz").read_bytes()
        b = (root / "rawdata" / name / f"{name}_ct.nii.gz").read_bytes()
        assert a == b
    extract_patches(root, tmp_path / "run", workers=1, seed=0)
    m = read_manifest(tmp_path / "run" / "patches" / "manifest.csv")
    by_case = m.groupby("case")["split"].unique()
    assert {c for c, s in by_case.items() if "dissect" in s} == {"sub-phantom003", "sub-phantom004"}
    assert all(len(s) == 1 for s in by_case)
    # back to no dissection scans: the table goes, and so do the extra scans
    write_phantom_root(root, n_scans=3, seed=5, progress=False)
    assert not (root / "splits.tsv").exists()


def test_a_malformed_split_table_is_refused_naming_it(tmp_path):
    from vfcore.errors import FormatError
    from vfcore.patches import read_split_table
    (tmp_path / "splits.tsv").write_text("patient\tsplit\nsub-a\tholiday\n")
    with pytest.raises(FormatError, match="splits.tsv.*row 2"):
        read_split_table(tmp_path)
