"""vfcore.phantom: VerSe layout and bytes, geometry truth, Genant grades, determinism, resume.

Every check measures the written files independently (nibabel, numpy, the reader) and
compares with what the phantom claims (its truth JSON, the VerSe format, Genant's bins).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vfcore import verse
from vfcore.errors import FormatError
from vfcore.phantom import (CONCEPTS, case_paths, read_truth, render_scan, sample_scan,
                            target_concepts, write_phantom_root)
from vfcore.phantom.concepts import BODY, DEGENERATED_DISC_BASE, DISC_BASE

N_SCANS = 3
# Genant: grade 1 20-25 %, grade 2 25-40 %, grade 3 > 40 % height loss
GENANT = {0: (0.0, 0.20), 1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.75)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_phantom_root(tmp_path_factory.mktemp("phantom"), n_scans=N_SCANS, seed=0,
                              progress=False)


def _truth(root: Path, case: str) -> dict:
    return json.loads(case_paths(root, case)["truth"].read_text())


def _cases(root: Path) -> list[str]:
    return [f"sub-phantom{i:03d}" for i in range(N_SCANS)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


# ------------------------------------------------------------------------------------------
# Layout, formats, reader
# ------------------------------------------------------------------------------------------

def test_verse_layout_and_dtypes(root):
    for case in _cases(root):
        ct_path = root / "rawdata" / case / f"{case}_ct.nii.gz"
        der = root / "derivatives" / case
        for p in (ct_path, der / f"{case}_seg-vert_msk.nii.gz", der / f"{case}_seg-subreg_ctd.json",
                  der / f"{case}_seg-concept_msk.nii.gz", der / f"{case}_phantom-truth.json"):
            assert p.is_file(), p
        ct = nib.load(ct_path)
        assert ct.get_data_dtype() == np.int16
        assert ct.dataobj.slope in (1.0, None) and ct.dataobj.inter in (0.0, None)
        vert = nib.load(der / f"{case}_seg-vert_msk.nii.gz")
        con = nib.load(der / f"{case}_seg-concept_msk.nii.gz")
        assert vert.get_data_dtype() == np.uint8 and con.get_data_dtype() == np.uint8
        assert vert.shape == ct.shape == con.shape
        assert np.allclose(vert.affine, ct.affine) and np.allclose(con.affine, ct.affine)
        labels = set(np.unique(np.asarray(vert.dataobj)).tolist()) - {0}
        assert labels and labels <= set(range(8, 26)) | {28}
        hu = np.asarray(ct.dataobj)
        assert -1024 <= hu.min() and hu.max() < 3072
    assert (root / "fracture_grades.tsv").is_file() and (root / "concept_labels.json").is_file()


def test_reader_opens_phantom_like_verse(root):
    cases = verse.find_cases(root)
    assert [c.case_id for c in cases] == _cases(root)
    grades = verse.read_grades(root / "fracture_grades.tsv", known_cases=[c.case_id for c in cases])
    for c in cases:
        data = verse.load_case(c)   # checks shapes, affines, centroid direction and bounds
        assert data.concepts is not None
        in_mask = set(np.unique(data.mask.data).tolist()) - {0}
        graded = set(grades.loc[grades.case == c.case_id, "label"].astype(int))
        assert graded == in_mask


def test_centroid_json_is_exact_verse_bytes(root):
    sample = next((Path(__file__).resolve().parents[2] / "shared/fixtures/verse/anjany_verse_sample")
                  .glob("*_ctd.json")).read_text()
    assert not sample.endswith("\n")
    for case in _cases(root):
        path = case_paths(root, case)["centroids"]
        text = path.read_text()
        entries = json.loads(text)
        affine = nib.load(case_paths(root, case)["ct"]).affine
        assert entries[0] == {"direction": list(nib.aff2axcodes(affine))}
        rebuilt = [entries[0]] + [{"label": e["label"], "X": round(e["X"], 1), "Y": round(e["Y"], 1),
                                   "Z": round(e["Z"], 1)} for e in entries[1:]]
        assert json.dumps(rebuilt) == text                    # default separators, no newline
        for e in entries[1:]:
            assert list(e) == ["label", "X", "Y", "Z"]
            for k in "XYZ":
                assert re.fullmatch(r"-?\d+\.\d", json.dumps(e[k])), e


def test_centroids_are_body_centres_inside_the_mask(root):
    checked = 0
    for case in _cases(root):
        p = case_paths(root, case)
        vert_img = nib.load(p["vert"])
        vert = np.asarray(vert_img.dataobj)
        con = np.asarray(nib.load(p["concept"]).dataobj)
        affine = vert_img.affine
        truth = {v["label"]: v for v in _truth(root, case)["vertebrae"]}
        cents = {e["label"]: np.array([e["X"], e["Y"], e["Z"]]) for e in json.loads(p["centroids"].read_text())[1:]}
        # a centroid is written exactly when the true body centre lies in the field of view
        assert set(cents) == {lab for lab, v in truth.items() if v["centroid_in_fov"]}
        for label, c in cents.items():
            assert vert[tuple(np.round(c).astype(int))] == label, (case, label)
            cw = _world(affine, c)
            assert np.linalg.norm(cw - np.array(truth[label]["body_centre"])) < 0.1 * 3 + 0.1
            body = np.argwhere((vert == label) & np.isin(con, BODY))
            if (body.min(axis=0) == 0).any() or (body.max(axis=0) == np.array(vert.shape) - 1).any():
                continue          # cut by the field of view: the voxel centre of mass is biased
            com = _world(affine, body.mean(axis=0))
            assert np.linalg.norm(cw - com) < 1.0, (case, label, cw, com)
            checked += 1
    assert checked >= 5


def test_truth_axes_match_the_drawn_body(root):
    """e_S points from the inferior to the superior endplate, e_A from the back to the front."""
    checked = 0
    for case in _cases(root):
        p = case_paths(root, case)
        img = nib.load(p["vert"])
        vert, con = np.asarray(img.dataobj), np.asarray(nib.load(p["concept"]).dataobj)
        for v in _truth(root, case)["vertebrae"]:
            L = v["label"]
            e_s, e_a, e_l = (np.array(v[k]) for k in ("superior", "anterior", "left"))
            R = np.stack([e_l, e_a, e_s])
            assert np.allclose(R @ R.T, np.eye(3), atol=1e-5)
            assert np.allclose(np.cross(e_s, e_a), e_l, atol=1e-5)
            own = vert == L
            sup, inf = np.argwhere(own & (con == 1)), np.argwhere(own & (con == 2))
            body = np.argwhere(own & np.isin(con, BODY))
            endplate_confounder = any("Schmorl" in c or "sclerosis" in c for c in v["confounders"])
            if v["grade"] or endplate_confounder or len(sup) < 50 or len(inf) < 50 \
                    or not v["centroid_in_fov"]:
                continue
            if (body.min(axis=0) == 0).any() or (body.max(axis=0) == np.array(vert.shape) - 1).any():
                continue
            d = _world(img.affine, sup.mean(axis=0)) - _world(img.affine, inf.mean(axis=0))
            angle = math.degrees(math.acos(np.clip(d @ e_s / np.linalg.norm(d), -1, 1)))
            assert angle < 6.0, (case, L, angle)
            checked += 1
    assert checked >= 5


def test_concept_labels(root):
    table = json.loads((root / "concept_labels.json").read_text())
    assert {int(k): n for k, n in table["labels"].items()} == CONCEPTS
    for name in ("superior endplate", "inferior endplate", "anterior cortex",
                 "posterior wall / middle column", "trabecular core", "spinal canal",
                 "fracture-deformity zone", "Schmorl node", "osteophyte"):
        assert name in CONCEPTS.values()
    case = _cases(root)[0]
    p = case_paths(root, case)
    vert = np.asarray(nib.load(p["vert"]).dataobj)
    con = np.asarray(nib.load(p["concept"]).dataobj)
    values = set(np.unique(con).tolist())
    discs = {v for v in values if v >= DISC_BASE}
    assert values - discs <= set(CONCEPTS) | {0}
    assert all(DISC_BASE + 8 <= v <= DEGENERATED_DISC_BASE + 28 for v in discs)
    # bone concepts belong to a vertebra, discs and canal to none
    assert not np.any((vert == 0) & np.isin(con, [1, 2, 3, 4, 5, 6, 13, 14, 15, 16]))
    assert not np.any((vert > 0) & (con >= DISC_BASE))
    # per-vertebra concepts of fully visible vertebrae are all there
    normal = fractured = 0
    for case in _cases(root):
        p = case_paths(root, case)
        vert = np.asarray(nib.load(p["vert"]).dataobj)
        con = np.asarray(nib.load(p["concept"]).dataobj)
        for v in _truth(root, case)["vertebrae"][1:-1]:
            if not v["centroid_in_fov"]:
                continue
            body = np.argwhere((vert == v["label"]) & np.isin(con, BODY))
            if (body.min(axis=0) == 0).any() or (body.max(axis=0) == np.array(vert.shape) - 1).any():
                continue          # cut by the field of view
            nb = v["neighbours"]
            masks = target_concepts(con, vert, v["label"], nb["above"], nb["below"])
            assert masks["vertebral body"].sum() == ((vert == v["label"]) & np.isin(con, BODY)).sum()
            assert masks["adjacent vertebrae"].sum() == np.isin(vert, [nb["above"], nb["below"]]).sum()
            if v["grade"]:
                assert masks["fracture-deformity zone"].any()
                fractured += 1
                continue
            for name in ("superior endplate", "inferior endplate", "trabecular core", "disc above",
                         "disc below", "posterior elements", "spinal canal", "adjacent vertebrae",
                         "anterior cortex", "posterior wall / middle column"):
                assert masks[name].any(), (case, v["label"], name)
            assert not masks["fracture-deformity zone"].any()
            normal += 1
    assert normal >= 5 and fractured >= 1


def test_tissue_intensities(root):
    """Median HU of each tissue, read from the concept mask, is what CT shows."""
    ct, con = [], []
    for case in _cases(root):
        p = case_paths(root, case)
        ct.append(np.asarray(nib.load(p["ct"]).dataobj).astype(np.float32))
        con.append(np.asarray(nib.load(p["concept"]).dataobj))
    hu = {}
    for value in (6, 18, 20, 22, 23):
        voxels = np.concatenate([a[c == value] for a, c in zip(ct, con)])
        if voxels.size > 500:
            hu[CONCEPTS[value]] = float(np.median(voxels))
    expect = {"trabecular core": (60, 320), "paraspinal muscle": (10, 90), "fat": (-160, -40),
              "spinal canal": (-80, 60), "lung": (-1000, -600)}
    assert {"trabecular core", "paraspinal muscle", "spinal canal"} <= set(hu)
    for name, median in hu.items():
        lo, hi = expect[name]
        assert lo < median < hi, (name, median)
    # the core of the discs (away from the bright endplates and the lungs that blur into them)
    core = [a[ndimage.binary_erosion((c >= DISC_BASE) & (c < DEGENERATED_DISC_BASE))]
            for a, c in zip(ct, con)]
    assert 30 < np.median(np.concatenate(core)) < 150


# ------------------------------------------------------------------------------------------
# Fractures per Genant, measured on a finely drawn copy of the vertebra
# ------------------------------------------------------------------------------------------

def _find(shape_wanted: int, grade_wanted: int | None = None):
    for i in range(300):
        spec = sample_scan(7, i)
        for k, v in enumerate(spec.vertebrae[1:-1], start=1):
            if v.shape == shape_wanted and (grade_wanted is None or v.grade == grade_wanted):
                return spec, k
    raise AssertionError("no such fracture in 300 scans")


def _fine_copy(spec, k, spacing=0.5):
    v = spec.vertebrae[k]
    c = v.frame.o
    half = 0.5 * max(v.W, v.D) + 8
    acq = dataclasses.replace(spec.acq, spacing=(spacing,) * 3, fov_lo=tuple(c - half),
                              fov_hi=tuple(c + half), noise_hu=0.0, axcodes="LPS")
    return render_scan(dataclasses.replace(spec, acq=acq))


def _heights(scan, label):
    """Anterior, middle and posterior body heights (mm) on the mid-sagittal line."""
    v = next(t for t in scan.truth["vertebrae"] if t["label"] == label)
    own = (scan.vert == label) & np.isin(scan.concept, BODY)
    pts = _world(scan.affine, np.argwhere(own).astype(np.float64)) - np.array(v["body_centre"])
    x, y, z = pts @ np.array(v["left"]), pts @ np.array(v["anterior"]), pts @ np.array(v["superior"])
    # the truth's centre is the centre of mass; heights are measured from the frame's origin
    off = (np.array(v["frame_origin"]) - np.array(v["body_centre"]))
    x0, y0 = off @ np.array(v["left"]), off @ np.array(v["anterior"])
    out = {}
    for name, frac in scan.truth["height_positions"].items():
        col = (x - x0) ** 2 + (y - y0 - frac * v["depth_mm"]) ** 2 < 0.75 ** 2
        out[name] = float(z[col].max() - z[col].min() + 0.5)
    return out, v


@pytest.mark.parametrize("shape", [1, 2, 3])
def test_genant_height_loss_and_shape(shape):
    spec, k = _find(shape)
    label = spec.vertebrae[k].label
    h, v = _heights(_fine_copy(spec, k), label)
    loss = {n: 1 - h[n] / v["nominal_height_mm"] for n in h}
    worst = max(loss.values())
    lo, hi = GENANT[v["grade"]]
    assert lo <= v["height_loss"] <= hi                          # the label follows Genant
    assert lo - 0.04 <= worst <= hi + 0.04, (v["grade"], loss)   # ... and so do the voxels
    for n in h:
        assert abs(h[n] / v["nominal_height_mm"] - v["heights"][n]) < 0.04, (n, h, v["heights"])
    if shape == 1:      # wedge: the front collapses, the back does not
        assert loss["anterior"] == worst and loss["posterior"] < 0.06
    elif shape == 2:    # biconcave: the middle collapses, the rims do not
        assert loss["middle"] == worst and loss["posterior"] < 0.06
    else:               # crush: the back collapses too
        assert loss["posterior"] > 0.15


def test_normal_vertebra_is_below_grade_1():
    spec = sample_scan(7, 0)
    k = next(i for i, v in enumerate(spec.vertebrae[1:-1], 1) if v.grade == 0 and v.wedge > 0.06)
    h, v = _heights(_fine_copy(spec, k), spec.vertebrae[k].label)
    assert max(1 - h[n] / v["nominal_height_mm"] for n in h) < 0.2


def test_prevalence_grades_and_no_intensity_shortcut():
    n_vert = n_frac = 0
    grades, shapes, confounders = Counter(), Counter(), Counter()
    trab = {True: [], False: []}
    for i in range(120):
        spec = sample_scan(11, i)
        lo, hi = spec.acq.fov_lo[2], spec.acq.fov_hi[2]
        for v in spec.vertebrae:
            if v.frame.o[2] + v.H / 2 < lo or v.frame.o[2] - v.H / 2 > hi:
                continue
            n_vert += 1
            n_frac += v.grade > 0
            grades[v.grade] += 1
            shapes[v.shape] += 1
            trab[v.grade > 0].append(v.trab_hu)
            confounders["schmorl"] += bool(v.schmorl)
            confounders["osteophyte"] += bool(v.osteophytes)
            confounders["wedging"] += v.wedge > 0.08
            confounders["sclerosis"] += bool(v.sclerosis_sup or v.sclerosis_inf)
            assert v.grade > 0 or v.wedge < 0.15
    assert 0.08 < n_frac / n_vert < 0.16
    assert all(grades[g] > 0 for g in (1, 2, 3)) and all(shapes[s] > 0 for s in (1, 2, 3))
    assert all(n > 0.03 * n_vert for n in confounders.values()), confounders
    # fractured bodies are not simply darker or brighter
    assert abs(np.mean(trab[True]) - np.mean(trab[False])) < 15


def test_acquisition_variety():
    specs = [sample_scan(0, i) for i in range(60)]
    spacings = np.array([s.acq.spacing for s in specs])
    assert spacings.min() <= 0.6 and spacings.max() >= 2.5
    assert any(max(s) / min(s) > 2.5 for s in spacings)            # anisotropic scans
    assert len({s.acq.axcodes for s in specs}) >= 5
    labels = {lab for s in specs for lab in s.labels}
    assert 28 in labels or 25 in labels                            # transitional vertebrae
    # partial field of view: some vertebra is cut by the box
    cut = sum(1 for s in specs for v in s.vertebrae
              if v.frame.o[2] - v.H / 2 < s.acq.fov_hi[2] < v.frame.o[2] + v.H / 2)
    assert cut > 10


# ------------------------------------------------------------------------------------------
# Determinism, resume, bad input
# ------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_with_two_workers(root, tmp_path):
    other = write_phantom_root(tmp_path / "again", n_scans=N_SCANS, seed=0, workers=2, progress=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        assert _sha(root / rel) == _sha(other / rel), rel
    for gz in root.rglob("*.nii.gz"):
        head = gz.read_bytes()[:10]
        assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\0\0\0\0"   # gzip, mtime 0


def test_resume_skips_complete_scans_and_redraws_missing(root, tmp_path):
    small = write_phantom_root(tmp_path / "r", n_scans=2, seed=3, progress=False)
    files = [p for p in small.rglob("*") if p.is_file()]
    before = {p: (p.stat().st_mtime_ns, _sha(p)) for p in files}
    write_phantom_root(small, n_scans=2, seed=3, progress=False)
    scans = [p for p in files if "sub-phantom" in p.name]
    assert all(p.stat().st_mtime_ns == before[p][0] for p in scans)      # nothing redrawn
    lost = case_paths(small, "sub-phantom001")["ct"]
    lost.unlink()
    write_phantom_root(small, n_scans=2, seed=3, progress=False)
    assert _sha(lost) == before[lost][1]
    kept = case_paths(small, "sub-phantom000")["ct"]
    assert kept.stat().st_mtime_ns == before[kept][0]
    # a smaller data set in the same root drops the extra scan
    write_phantom_root(small, n_scans=1, seed=3, progress=False)
    assert [c.case_id for c in verse.find_cases(small)] == ["sub-phantom000"]
    assert not list(small.rglob(".*part*"))                              # no temporary files


def test_bad_arguments(tmp_path):
    with pytest.raises(FormatError, match="n_scans"):
        write_phantom_root(tmp_path / "x", n_scans=0, progress=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FormatError, match="not a folder"):
        write_phantom_root(f, n_scans=1, progress=False)


def test_read_truth(root, tmp_path):
    truth = read_truth(root)
    grades = verse.read_grades(root / "fracture_grades.tsv")
    both = truth.merge(grades, on=["case", "label"], suffixes=("", "_tsv"))
    assert len(both) == len(truth) == len(grades) > 0
    assert (both["grade"] == both["grade_tsv"].astype(int)).all()
    assert (both["shape"] == both["shape_tsv"].astype(int)).all()
    # Schmorl nodes are drawn on intact vertebrae only; fractured bodies lost height
    assert (truth.loc[truth["confounders"].str.contains("Schmorl"), "grade"] == 0).all()
    assert (truth.loc[truth["grade"] >= 1, "height_loss"] >= 0.2 - 0.04).all()
    assert read_truth(tmp_path / "nothing").empty
    bad = tmp_path / "bad" / "derivatives" / "sub-phantom000"
    bad.mkdir(parents=True)
    (bad / "sub-phantom000_phantom-truth.json").write_text("{not json")
    with pytest.raises(FormatError, match="phantom truth"):
        read_truth(tmp_path / "bad")


# ------------------------------------------------------------------------------------------
# Field of view like a real scan, the fracture rate, the concept "outside the scan"
# ------------------------------------------------------------------------------------------

def _ras_axes(affine: np.ndarray) -> np.ndarray:
    """World axis (0 x, 1 y, 2 z) that each array axis runs along."""
    return nib.orientations.io_orientation(affine)[:, 0].astype(int)


def test_patches_leave_the_scan_only_cranio_caudally(root):
    """Every vertebra's straightened 96 mm patch lies inside the scan in the axial plane: where
    a patch leaves the CT volume, it leaves through the scan's first or last slice (world z),
    as real scans do; the outside voxels are measured with nibabel, independently of
    vfcore.patches, and are exactly the patch's concept "outside the scan" (and -1024 HU)."""
    from nibabel.affines import apply_affine

    from vfcore.patches import straighten
    from vfcore.phantom.concepts import OUTSIDE_SCAN

    cut = 0
    for case in verse.find_cases(root):
        data = verse.load_case(case)
        centroids = data.centroids.world(data.ct.affine)
        along = _ras_axes(data.ct.affine)
        shape = np.array(data.ct.shape)
        for label in centroids:
            p = straighten(data.ct, data.mask, centroids, label, concepts=data.concepts)
            ijk = np.stack(np.meshgrid(*[np.arange(96)] * 3, indexing="ij"), -1).reshape(-1, 3)
            vox = apply_affine(np.linalg.inv(data.ct.affine), apply_affine(p.affine, ijk))
            out = (vox < -0.5) | (vox > shape - 0.5)                       # (n, array axis)
            in_plane = out[:, along != 2].any(axis=1)
            assert not in_plane.any(), (case.case_id, label, in_plane.mean())
            outside = out.any(axis=1).reshape(96, 96, 96)
            assert np.array_equal(p.concepts == OUTSIDE_SCAN, outside), (case.case_id, label)
            assert (p.ct[outside] == -1024).all()
            assert p.out_of_field == pytest.approx(outside.mean(), abs=1e-9)
            cut += outside.any()
    assert cut >= 2          # the cranio-caudal ends do cut patches


def _cube_outside(frame, lo, hi, n: int = 16) -> float:
    """Fraction of the 96 mm cube around ``frame`` (its own axes) outside the box [lo, hi]."""
    g = (np.arange(n) + 0.5) / n * 96.0 - 48.0
    local = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    w = frame.o + local @ np.stack([frame.e_l, frame.e_a, frame.e_s])
    return float((~((w >= lo) & (w <= hi)).all(axis=1)).mean())


def test_only_the_end_vertebrae_lose_more_than_a_tenth_of_their_patch():
    """Over 150 sampled scans (seeds 0 and 5, prevalence 0.2 and 0.5): of the vertebrae whose
    body centre lies in the field (those with a centroid), only the most cranial and the most
    caudal one have more than 10 % of their 96 mm patch cube (true frame) outside the box;
    the upper thorax (T2-T5, short tilted segments) is covered too, and the ends are cut."""
    inner = Counter()
    ends_cut = 0
    for seed, prevalence, count in ((0, 0.2, 100), (5, 0.5, 50)):
        for i in range(count):
            spec = sample_scan(seed, i, prevalence=prevalence)
            lo, hi = np.array(spec.acq.fov_lo), np.array(spec.acq.fov_hi)
            field = [v for v in spec.vertebrae if lo[2] <= v.frame.o[2] <= hi[2]]
            assert len(field) >= 5, (seed, i)
            for v in field[1:-1]:
                assert _cube_outside(v.frame, lo, hi) <= 0.10, (seed, i, v.label)
                inner[v.label] += 1
            ends_cut += sum(_cube_outside(v.frame, lo, hi) > 0.10 for v in (field[0], field[-1]))
    assert all(inner[label] >= 20 for label in (9, 10, 11, 12)), inner      # T2-T5
    assert ends_cut > 150


def test_written_scans_cut_only_the_end_vertebrae_patches(root):
    """In the written scans, each vertebra's straightened patch (the spline frame of
    vfcore.patches) is at most 10 % outside the CT volume unless it is the most cranial or
    most caudal centroid; outside measured with nibabel on the patch's voxel centres."""
    from nibabel.affines import apply_affine

    from vfcore.patches.geometry import fit_spine, patch_affine, spine_frame

    g = np.arange(0, 96, 3) + 1.0
    ijk = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    for case in verse.find_cases(root):
        data = verse.load_case(case)
        centroids = data.centroids.world(data.ct.affine)
        spine = fit_spine(centroids)
        shape = np.array(data.ct.shape)
        for label in spine.labels[1:-1]:
            affine = patch_affine(spine_frame(spine, label))
            vox = apply_affine(np.linalg.inv(data.ct.affine), apply_affine(affine, ijk))
            outside = ((vox < -0.5) | (vox > shape - 0.5)).any(axis=1).mean()
            assert outside <= 0.10, (case.case_id, label, outside)


def test_field_of_view_covers_the_trunk_in_sampled_scans():
    """Over 100 sampled scans: every patch cube around a body in the field lies inside the
    box in x and y; spine-centred fields reach the skin of the back; some fields hold the
    whole trunk (the body outline on both sides)."""
    fields = Counter()
    for i in range(100):
        spec = sample_scan(2, i)
        lo, hi = np.array(spec.acq.fov_lo), np.array(spec.acq.fov_hi)
        fields[spec.acq.fov] += 1
        corners = np.array([[a, b, c] for a in (-48, 48) for b in (-48, 48) for c in (-48, 48)])
        for v in spec.vertebrae:
            if lo[2] <= v.frame.o[2] <= hi[2]:
                w = v.frame.to_world(corners)
                assert (w[:, :2] >= lo[:2]).all() and (w[:, :2] <= hi[:2]).all(), (i, v.label)
        bg = spec.background
        z = spec.curve_p[:, 2]
        y_spine = spec.curve_p[(z >= lo[2]) & (z <= hi[2]), 1].min()
        back = max(0.5 * v.D + v.post["canal_ap"] + v.post["lam_t"]
                   + v.post["sp_len"] * math.cos(math.radians(v.post["sp_angle"]))
                   for v in spec.vertebrae) + 8 + bg["fat_back"]
        assert lo[1] < y_spine - back, i                  # behind the skin of the back
        if spec.acq.fov == "trunk":
            cx = spec.curve_p[:, 0].mean()
            assert lo[0] < cx - bg["torso_a"] + 15 and hi[0] > cx + bg["torso_a"] - 15
    assert fields["spine"] > 60 and fields["trunk"] >= 3, fields


def test_axial_field_shows_the_tissues_of_the_trunk(root):
    """Each written scan holds skin/air of the body outline, fat and muscle; scans with
    thoracic levels hold ribs and air-filled lung (about -850 HU); no scan's own concept
    mask uses the concept "outside the scan"."""
    from vfcore.phantom.concepts import OUTSIDE_SCAN

    lung_hu = []
    for case in _cases(root):
        p = case_paths(root, case)
        con = np.asarray(nib.load(p["concept"]).dataobj)
        ct = np.asarray(nib.load(p["ct"]).dataobj)
        values = set(np.unique(con).tolist())
        assert {20, 23, 27} <= values, (case, values)        # muscle, fat, air outside the body
        assert OUTSIDE_SCAN not in values
        thoracic = any(v["label"] <= 19 for v in _truth(root, case)["vertebrae"])
        if thoracic:
            assert {19, 22} <= values, case                   # ribs and lung
            lung_hu.append(ct[ndimage.binary_erosion(con == 22, iterations=2)])
    assert lung_hu
    assert -900 < np.median(np.concatenate(lung_hu)) < -780


@pytest.mark.parametrize("prevalence", [0.12, 0.3, 0.5])
def test_realised_fracture_rate_follows_prevalence(prevalence):
    """The share of fractured vertebrae in the field of view is the asked ``prevalence``
    (within 0.04 over about 1,000 vertebrae; the default 0.12 too)."""
    n = fractured = 0
    for i in range(110):
        spec = sample_scan(21, i, prevalence=prevalence)
        lo, hi = spec.acq.fov_lo[2], spec.acq.fov_hi[2]
        inside = [v for v in spec.vertebrae if lo <= v.frame.o[2] <= hi]
        n += len(inside)
        fractured += sum(v.grade > 0 for v in inside)
    assert n > 800
    assert abs(fractured / n - prevalence) < 0.04, (prevalence, fractured / n)


def test_prevalence_out_of_range(tmp_path):
    for bad in (-0.1, 0.95):
        with pytest.raises(FormatError, match="prevalence"):
            write_phantom_root(tmp_path / "x", n_scans=1, prevalence=bad, progress=False)


def test_confounder_rate_above_one_adds_strong_wedges_that_stay_grade_0():
    """Sampled at confounders 4 vs 1 (the same 40 scans, prevalence 0.3): more non-fractured
    thoracic vertebrae carry a physiological wedge of 16 % or more, none of them measures a
    height loss of 20 % (Genant grade 1) or more, and the confounder rate 1 draws no strong
    wedge at all (its physiological wedges stay under 13 %)."""
    strong = {1.0: 0, 4.0: 0}
    for rate in strong:
        for i in range(40):
            for v in sample_scan(3, i, prevalence=0.3, confounders=rate).vertebrae:
                if v.fracture is None:
                    assert v.height_loss < 0.20, (rate, i, v.label, v.height_loss)
                    strong[rate] += v.wedge >= 0.16
    assert strong[1.0] == 0 and strong[4.0] >= 60, strong


def test_dissection_scans_record_their_confounder_rate(tmp_path):
    """write_phantom_root(dissect_confounders=...) draws only the dissection-only scans with
    it (their params record says so); the first scans are byte-identical with or without."""
    a = write_phantom_root(tmp_path / "a", n_scans=1, seed=4, progress=False, dissect_scans=1,
                           dissect_confounders=4.0)
    b = write_phantom_root(tmp_path / "b", n_scans=1, seed=4, progress=False, dissect_scans=1)
    ta, tb = (_truth(r, "sub-phantom001")["params"] for r in (a, b))
    assert ta["confounders"] == 4.0 and tb["confounders"] == 1.0
    assert _truth(a, "sub-phantom000")["params"]["confounders"] == 1.0
    pa, pb = case_paths(a, "sub-phantom000"), case_paths(b, "sub-phantom000")
    for key in ("ct", "vert", "concept", "centroids"):
        assert pa[key].read_bytes() == pb[key].read_bytes(), key
    with pytest.raises(FormatError, match="dissect_confounders"):
        write_phantom_root(tmp_path / "c", n_scans=1, dissect_scans=1, dissect_confounders=-1.0,
                           progress=False)
