"""vfcore.verse against the real VerSe-format fixtures (read in place) and bad input.

References are independent of the reader: NIfTI headers parsed by hand with ``struct``, the
fixture README's facts, counts derived by hand from the Löffler appendix, and plain numpy.
"""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vfcore import verse
from vfcore.io import sha256_file
from vfcore.errors import (
    CorruptFileError,
    DataValueError,
    EmptyRootError,
    FormatError,
    GeometryError,
    GradeTableError,
    LabelError,
)

ANJANY = "anjany_verse_sample"
FXG = "fxgrader_ctfu/sub-ctfu00001_ses-20080508"
FXG_STEM = "sub-ctfu00001_ses-20080508_ce-no"
TPT = "tptbox_sample_ct"
APPENDIX = "loeffler2020_appendixE1/ryai190138_appendixe1.xlsx"


def raw_nifti(path: Path) -> tuple[np.ndarray, float, float]:
    """Stored voxel values, scl_slope, scl_inter: a NIfTI-1 reader written from the spec."""
    raw = gzip.decompress(path.read_bytes())
    assert struct.unpack("<i", raw[:4])[0] == 348  # little-endian NIfTI-1 header
    dim = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    vox_offset, slope, inter = struct.unpack("<3f", raw[108:120])
    dtype = {2: "<u1", 4: "<i2", 512: "<u2", 16: "<f4", 64: "<f8"}[datatype]
    shape = dim[1:1 + dim[0]]
    data = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=int(vox_offset))
    return data.reshape(shape, order="F"), slope, inter


def save_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def check_names_file(err: pytest.ExceptionInfo, path: Path | str) -> None:
    assert str(path) in str(err.value), f"message does not name {path}: {err.value}"


# ---------------------------------------------------------------------------------- levels


def test_level_names_and_order():
    assert verse.level_name(1) == "C1" and verse.level_name(7) == "C7"
    assert verse.level_name(8) == "T1" and verse.level_name(19) == "T12"
    assert verse.level_name(20) == "L1" and verse.level_name(25) == "L6"
    assert verse.level_name(28) == "T13"
    assert len(verse.LEVEL_NAMES) == 26
    assert verse.craniocaudal([24, 28, 20, 19, 8, 1]) == [1, 8, 19, 28, 20, 24]
    assert verse.craniocaudal([25, 28, 1]) == [1, 28, 25]
    with pytest.raises(LabelError):
        verse.level_name(26)
    with pytest.raises(LabelError):
        verse.craniocaudal([20, 27])


# ---------------------------------------------------------------------------------- fixtures


def test_fixtures_are_intact(fixtures_dir):
    lines = (fixtures_dir / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split(maxsplit=1)) for line in lines if line.strip())
    assert len(sums) >= 10
    for name, digest in sums.items():
        assert sha256_file(fixtures_dir / name) == digest, name


def test_find_cases_on_fixtures(fixtures_dir):
    cases = verse.find_cases(fixtures_dir)
    assert [c.case_id for c in cases] == ["sub-ct_label-22", FXG_STEM]
    fxg = cases[1]
    assert fxg.patient == "sub-ctfu00001" and fxg.session == "ses-20080508"
    assert fxg.ct.name == f"{FXG_STEM}_ct.nii.gz"
    assert fxg.mask.name == f"{FXG_STEM}_seg-vert_msk.nii.gz"
    assert fxg.subreg.name == f"{FXG_STEM}_seg-subreg_msk.nii.gz"
    assert fxg.centroids.name == f"{FXG_STEM}_seg-subreg_ctd.json"
    tpt = cases[0]
    assert tpt.patient == "sub-ct" and tpt.centroids is None and tpt.subreg is not None
    # the official sample has no CT: listed only when masks alone are enough
    with_masks = verse.find_cases(fixtures_dir, require_ct=False)
    assert [c.case_id for c in with_masks] == ["sub-ct_label-22", FXG_STEM, "sub-verse004"]
    sample = with_masks[2]
    assert sample.ct is None and sample.mask.name == "sub-verse004_seg-vert_msk.nii.gz"
    assert sample.centroids.name == "sub-verse004_seg-subreg_ctd.json"


def test_every_fixture_image_is_PIR_and_every_json_direction_matches(fixtures_dir):
    images = sorted(fixtures_dir.rglob("*.nii.gz"))
    assert len(images) == 7
    for path in images:
        reader = verse.read_ct if path.name.endswith("_ct.nii.gz") else (
            verse.read_subreg if "seg-subreg" in path.name else verse.read_mask)
        assert reader(path).axcodes == ("P", "I", "R"), path  # README: all (P, I, R)
    for path in sorted(fixtures_dir.rglob("*_ctd.json")):
        reference = verse.read_mask(next(path.parent.glob("*_seg-vert_msk.nii.gz")))
        centroids = verse.read_centroids(path, reference=reference)  # checks direction
        assert centroids.direction == tuple(json.loads(path.read_text())[0]["direction"])
        assert centroids.direction == nib.aff2axcodes(reference.affine)


def test_anjany_mask_is_float64_and_rounds_to_T9_L5(fixtures_dir):
    path = fixtures_dir / ANJANY / "sub-verse004_seg-vert_msk.nii.gz"
    stored, _, _ = raw_nifti(path)
    assert stored.dtype == np.float64 and stored.shape == (161, 338, 61)
    mask = verse.read_mask(path)
    assert mask.data.dtype == np.int16
    np.testing.assert_array_equal(mask.data, np.rint(stored).astype(np.int16))
    assert sorted(np.unique(mask.data).tolist()) == [0, *range(16, 25)]
    np.testing.assert_allclose(mask.zooms, (1.0, 1.0, 2.0), atol=1e-3)


def test_anjany_centroids_values_world_and_in_mask(fixtures_dir):
    mask = verse.read_mask(fixtures_dir / ANJANY / "sub-verse004_seg-vert_msk.nii.gz")
    ctd = verse.read_centroids(fixtures_dir / ANJANY / "sub-verse004_seg-subreg_ctd.json", mask)
    assert sorted(ctd.voxel) == list(range(16, 25))
    np.testing.assert_array_equal(ctd.voxel[16], [79.1, 40.9, 32.3])  # first entry of the file
    np.testing.assert_array_equal(ctd.voxel[24], [57.2, 266.4, 29.3])
    world = ctd.world(mask.affine)
    for label, v in ctd.voxel.items():
        np.testing.assert_allclose(world[label], mask.affine[:3, :3] @ v + mask.affine[:3, 3])
        assert mask.data[tuple(np.rint(v).astype(int))] == label, verse.level_name(label)
    # the centroids run from head to feet along the array axis 1 (I)
    ys = [ctd.voxel[label][1] for label in verse.craniocaudal(ctd.voxel)]
    assert ys == sorted(ys)


def test_anjany_centroids_roundtrip_byte_for_byte(fixtures_dir, tmp_path):
    original = fixtures_dir / ANJANY / "sub-verse004_seg-subreg_ctd.json"
    mask = verse.read_mask(fixtures_dir / ANJANY / "sub-verse004_seg-vert_msk.nii.gz")
    ctd = verse.read_centroids(original, mask)
    out = verse.write_centroids(tmp_path / "copy_ctd.json", ctd.voxel, mask.affine)
    assert out.read_bytes() == original.read_bytes()
    assert not out.read_bytes().endswith(b"\n")
    assert [p.name for p in tmp_path.iterdir()] == ["copy_ctd.json"]  # no temp file left


def test_write_centroids_rounds_to_one_decimal(tmp_path):
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # L A S
    path = verse.write_centroids(tmp_path / "c.json",
                                 {20: np.array([1.04, 2.96, -0.04]), 8: [3, 4, 5]}, affine)
    assert path.read_text() == ('[{"direction": ["L", "A", "S"]}, '
                                '{"label": 8, "X": 3.0, "Y": 4.0, "Z": 5.0}, '
                                '{"label": 20, "X": 1.0, "Y": 3.0, "Z": 0.0}]')


def test_fxgrader_uint8_ct_is_scaled_to_hounsfield(fixtures_dir):
    path = fixtures_dir / FXG / f"{FXG_STEM}_ct.nii.gz"
    stored, slope, inter = raw_nifti(path)
    assert stored.dtype == np.uint8
    assert slope == pytest.approx(16.955, abs=1e-3) and inter == pytest.approx(-1125.4, abs=0.01)
    ct = verse.read_ct(path)
    assert ct.data.dtype == np.float32 and ct.shape == (111, 176, 113)
    np.testing.assert_allclose(ct.data, stored * np.float64(slope) + inter, rtol=0, atol=1e-3)
    mask = verse.read_mask(fixtures_dir / FXG / f"{FXG_STEM}_seg-vert_msk.nii.gz").data
    air = ct.data[ct.data < -500]
    assert -1050 < np.median(air) < -950  # air ~ -1000 HU
    for label in range(21, 25):
        assert np.percentile(ct.data[mask == label], 95) > 200  # cortical bone
    assert -100 < np.median(ct.data[mask == 0]) < 100  # mostly soft tissue around the spine


def test_fxgrader_L1_has_mask_but_no_centroid(fixtures_dir):
    case = verse.find_cases(fixtures_dir)[1]
    data = verse.load_case(case)
    labels = set(np.unique(data.mask.data).tolist()) - {0}
    assert labels == {20, 21, 22, 23, 24}
    assert sorted(data.centroids.voxel) == [21, 22, 23, 24]  # L1 (20) has no centroid
    assert labels - set(data.centroids.voxel) == {20}
    # L1 is a 2-voxel sliver at the cranial border of the field of view
    assert int((data.mask.data == 20).sum()) == 2
    for label, v in data.centroids.voxel.items():
        assert data.mask.data[tuple(np.rint(v).astype(int))] == label
        body = (data.mask.data == label) & (data.subreg.data == verse.SUBREG_BODY)
        # the JSON point is the body centroid: within 2 voxels of the body's centre of mass
        assert np.linalg.norm(v - np.argwhere(body).mean(0)) < 2.0


def test_tptbox_sample_int16_ct_and_body_centroid(fixtures_dir, tmp_path):
    ct_path = fixtures_dir / TPT / "sub-ct_label-22_ct.nii.gz"
    stored, slope, inter = raw_nifti(ct_path)
    assert stored.dtype == np.int16
    data = verse.load_case(verse.find_cases(fixtures_dir)[0])
    assert data.ct.shape == (73, 47, 73) and data.centroids is None
    np.testing.assert_array_equal(data.ct.data, stored.astype(np.float32))
    np.testing.assert_allclose(data.ct.zooms, (1.5, 1.5, 1.5), atol=1e-4)
    assert set(np.unique(data.mask.data).tolist()) == {0, 21, 22, 23}
    assert set(np.unique(data.subreg.data).tolist()) == {0, *range(41, 51)}
    # README: body centroid = centre of mass of (vert == L) & (subreg == 50); write it as JSON
    body = (data.mask.data == 22) & (data.subreg.data == 50)
    com = np.argwhere(body).mean(0)
    path = verse.write_centroids(tmp_path / "sub-ct_label-22_seg-subreg_ctd.json", {22: com},
                                 data.ct.affine)
    back = verse.read_centroids(path, reference=data.ct)
    np.testing.assert_allclose(back.voxel[22], com, atol=0.05)
    assert data.mask.data[tuple(np.rint(back.voxel[22]).astype(int))] == 22


# ---------------------------------------------------------------------------------- grades


@pytest.fixture(scope="module")
def appendix(fixtures_dir):
    return verse.read_grades(fixtures_dir / APPENDIX)


@pytest.mark.filterwarnings("ignore:Workbook contains no default style")
def test_appendix_counts(appendix, fixtures_dir):
    # 160 image series, one row per T1-L6 level (18; the appendix has no T13 column)
    assert appendix["case"].nunique() == 160
    assert len(appendix) == 160 * 18
    assert list(appendix.columns) == verse.GRADE_COLUMNS
    graded = appendix[appendix.status == "graded"]
    foreign = appendix[appendix.reason == verse.FOREIGN]
    # Hand-derived from the sheet: 1515 non-empty T1-L6 cells = 1484 Genant grades 0-3 plus
    # 31 'x' (foreign material). The paper's "1515 graded" therefore counts the 'x' cells;
    # its "1725 vertebrae" is the sum of N_vertebrae, which includes cervical vertebrae that
    # have no grade column. Fractured (grade >= 1): 289, matching the published number.
    assert len(graded) == 1484 and len(foreign) == 31
    assert len(graded) + len(foreign) == 1515
    assert int(graded.fracture.sum()) == 289
    assert graded.grade.value_counts().to_dict() == {0: 1195, 1: 142, 2: 96, 3: 51}
    # an independent column of the same sheet: N_Fx per series equals our fracture count
    sheet = pd.read_excel(fixtures_dir / APPENDIX, sheet_name="VerSe_dataset",
                          usecols="A:L")
    assert int(sheet["N_vertebrae"].sum()) == 1725
    ours = graded.groupby("case").fracture.sum()
    for _, row in sheet.iterrows():
        case = verse.appendix_case_id(row.verse_ID, row.subject_ID)
        assert int(ours.get(case, 0)) == row.N_Fx, case
    # shape is 0 exactly when grade is 0 (``shape`` is a column: use [], not the attribute)
    assert ((graded["shape"] == 0) == (graded.grade == 0)).all()
    excluded = appendix[appendix.status == "excluded"]
    assert excluded.grade.isna().all() and excluded.fracture.isna().all()
    assert set(excluded.reason) == {verse.FOREIGN, verse.NOT_GRADED}


def test_appendix_case_ids(appendix):
    cases = set(appendix["case"])
    assert "sub-verse004" in cases
    assert "sub-verse408_split-verse223" in cases  # verse_ID 223, subject_ID 408
    assert "sub-verse400_split-verse090" in cases
    assert sum("_split-" in c for c in cases) == 37


def test_appendix_sub_verse004(appendix):
    rows = appendix[appendix.case == "sub-verse004"].set_index("level")
    expected = {"T9": 2, "T10": 2, "T11": 0, "T12": 0, "L1": 3, "L2": 0, "L3": 0}
    for level, grade in expected.items():
        assert rows.loc[level, "grade"] == grade and rows.loc[level, "status"] == "graded"
        assert bool(rows.loc[level, "fracture"]) == (grade >= 1)
    assert rows.loc["L1", "shape"] == 3  # crush
    for level in ("L4", "L5"):
        assert rows.loc[level, "status"] == "excluded"
        assert rows.loc[level, "reason"] == verse.NOT_GRADED
    assert list(rows.index[:3]) == ["T1", "T2", "T3"]  # cranio-caudal order


def test_fxgrader_grade_table(fixtures_dir):
    grades = verse.read_grades(fixtures_dir / "fxgrader_ctfu" / "dataset_ctfu_labels_subset.tsv")
    assert set(grades.case) == {FXG_STEM}
    assert len(grades) == 19  # def_T1 ... def_T12, def_L1 ... def_L5, def_T13, def_L6
    rows = grades.set_index("level")
    # the file rates L2 = 0, L3 = 6, L4 = 6, L5 = 0; L1 (the 2-voxel sliver) is empty
    for level in ("L2", "L5"):
        assert rows.loc[level, "grade"] == 0 and rows.loc[level, "status"] == "graded"
        assert not rows.loc[level, "fracture"]
    for level in ("L3", "L4"):  # code 6: sclerotic change
        assert rows.loc[level, "status"] == "excluded"
        assert rows.loc[level, "reason"] == "FX-Grader code 6: sclerotic change"
    assert rows.loc["L1", "reason"] == verse.NOT_GRADED
    assert (grades.status == "graded").sum() == 2
    assert grades["shape"].isna().all()  # FX-Grader rates no shape


def test_long_table(tmp_path):
    path = tmp_path / "fracture_grades.tsv"
    path.write_text("case\tlabel\tgrade\tshape\n"
                    "sub-a\t20\t2\t1\n"
                    "sub-a\tT13\t0\t0\n"
                    "sub-a\t21\tx\tx\n"
                    "sub-a\t22\t\t\n"
                    "sub-b\t8\t3\t3\n")
    grades = verse.read_grades(path, known_cases=["sub-a", "sub-b"])
    a = grades[grades.case == "sub-a"]
    assert a.label.tolist() == [28, 20, 21, 22]  # cranio-caudal: T13 before L1
    assert a.grade.tolist()[:2] == [0, 2] and a.fracture.tolist()[:2] == [False, True]
    assert a.status.tolist() == ["graded", "graded", "excluded", "excluded"]
    assert a.reason.tolist()[2:] == [verse.FOREIGN, verse.NOT_GRADED]
    csv = tmp_path / "g.csv"
    csv.write_text("case,label,grade\nsub-a,20,1\n")
    assert verse.read_grades(csv).fracture.tolist() == [True]


# ---------------------------------------------------------------------------------- layouts


def _layout(root: Path, sub: str, stem: str, ses: str | None = None, ctd: str = "subreg",
            ct: bool = True, mask: bool = True):
    rel = Path(sub) / ses if ses else Path(sub)
    data = np.zeros((4, 5, 6), np.int16)
    if ct:
        (root / "rawdata" / rel).mkdir(parents=True, exist_ok=True)
        save_nifti(root / "rawdata" / rel / f"{stem}_ct.nii.gz", data)
    (root / "derivatives" / rel).mkdir(parents=True, exist_ok=True)
    if mask:
        save_nifti(root / "derivatives" / rel / f"{stem}_seg-vert_msk.nii.gz", data)
    if ctd:
        verse.write_centroids(root / "derivatives" / rel / f"{stem}_seg-{ctd}_ctd.json",
                              {20: [1, 2, 3]}, np.eye(4))


def test_find_cases_walks_any_layout(tmp_path):
    v19 = tmp_path / "verse" / "dataset-verse19training"
    _layout(v19, "sub-verse004", "sub-verse004", ctd="vb")
    v20 = tmp_path / "verse" / "dataset-02validation"
    _layout(v20, "sub-verse408", "sub-verse408_split-verse223")
    _layout(v20, "sub-verse408", "sub-verse408_split-verse224", ctd=None)
    _layout(v20, "sub-gl003", "sub-gl003_dir-ax")
    test20 = tmp_path / "verse" / "dataset-03test"
    _layout(test20, "sub-verse700", "sub-verse700_dir-iso")
    clinic = tmp_path / "clinic" / "deeper"
    _layout(clinic, "sub-ctfu00001", "sub-ctfu00001_ses-20080508_ce-no", ses="ses-20080508")
    _layout(clinic, "sub-x1", "sub-x1", ses="ses-2", mask=False, ctd=None)
    _layout(tmp_path / "masksonly", "sub-m", "sub-m", ct=False)
    (tmp_path / "verse" / ".hidden").mkdir()
    save_nifti(tmp_path / "verse" / ".hidden" / "sub-h_ct.nii.gz", np.zeros((2, 2, 2)))
    save_nifti(tmp_path / "clinic" / ".sub-t_ct.nii.gz.tmp.nii.gz", np.zeros((2, 2, 2)))
    (tmp_path / "notes_ct.txt").write_text("not an image")
    # a concept mask (phantom) joins its case
    save_nifti(v20 / "derivatives" / "sub-gl003" / "sub-gl003_dir-ax_seg-concept_msk.nii.gz",
               np.zeros((4, 5, 6), np.int16))

    cases = {c.case_id: c for c in verse.find_cases(tmp_path)}
    assert sorted(cases) == ["sub-ctfu00001_ses-20080508_ce-no", "sub-gl003_dir-ax",
                             "sub-verse004", "sub-verse408_split-verse223",
                             "sub-verse408_split-verse224", "sub-verse700_dir-iso", "sub-x1"]
    assert cases["sub-verse004"].release_split == "training"
    assert cases["sub-verse004"].centroids.name == "sub-verse004_seg-vb_ctd.json"
    split = cases["sub-verse408_split-verse223"]
    assert split.patient == "sub-verse408" and split.release_split == "validation"
    assert cases["sub-verse408_split-verse224"].patient == "sub-verse408"
    assert cases["sub-verse408_split-verse224"].centroids is None
    assert cases["sub-verse700_dir-iso"].release_split == "test"
    gl = cases["sub-gl003_dir-ax"]
    assert gl.patient == "sub-gl003" and gl.concepts is not None and gl.mask is not None
    ses = cases["sub-ctfu00001_ses-20080508_ce-no"]
    assert ses.session == "ses-20080508" and ses.release_split is None
    assert ses.mask.parent == tmp_path / "clinic/deeper/derivatives/sub-ctfu00001/ses-20080508"
    assert cases["sub-x1"].session == "ses-2" and cases["sub-x1"].mask is None
    everything = {c.case_id for c in verse.find_cases(tmp_path, require_ct=False)}
    assert everything == set(cases) | {"sub-m"}


def test_find_cases_prefers_subreg_centroids(tmp_path):
    _layout(tmp_path, "sub-a", "sub-a", ctd="vb")
    verse.write_centroids(tmp_path / "derivatives/sub-a/sub-a_seg-subreg_ctd.json",
                          {21: [1, 1, 1]}, np.eye(4))
    (case,) = verse.find_cases(tmp_path)
    assert case.centroids.name == "sub-a_seg-subreg_ctd.json"


def test_load_case_checks_and_reads_concepts(tmp_path):
    _layout(tmp_path, "sub-a", "sub-a")
    save_nifti(tmp_path / "derivatives/sub-a/sub-a_seg-concept_msk.nii.gz",
               np.full((4, 5, 6), 7, np.int16))
    data = verse.load_case(verse.find_cases(tmp_path)[0])
    assert data.concepts.data.max() == 7 and data.ct.data.dtype == np.float32
    np.testing.assert_array_equal(data.centroids.voxel[20], [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("reader", [verse.read_ct, verse.read_mask])
def test_truncated_nifti(fixtures_dir, tmp_path, reader):
    source = fixtures_dir / FXG / f"{FXG_STEM}_seg-vert_msk.nii.gz"
    bad = tmp_path / "truncated_seg-vert_msk.nii.gz"
    bad.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as err:
        reader(bad)
    check_names_file(err, bad)


def test_corrupt_nifti(tmp_path):
    bad = tmp_path / "garbage_ct.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a NIfTI header" * 3))
    with pytest.raises(CorruptFileError) as err:
        verse.read_ct(bad)
    check_names_file(err, bad)
    not_gzip = tmp_path / "plain_ct.nii.gz"
    not_gzip.write_bytes(b"\x00" * 400)
    with pytest.raises(CorruptFileError) as err:
        verse.read_ct(not_gzip)
    check_names_file(err, not_gzip)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels(tmp_path, value):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = value
    path = save_nifti(tmp_path / "bad_ct.nii.gz", data)
    with pytest.raises(DataValueError) as err:
        verse.read_ct(path)
    check_names_file(err, path)
    assert "(1, 2, 3)" in str(err.value)
    with pytest.raises(DataValueError) as err:
        verse.read_mask(path)
    check_names_file(err, path)


def test_unknown_label(tmp_path):
    data = np.zeros((4, 4, 4), np.uint8)
    data[0, 0, 0], data[1, 1, 1] = 20, 27
    path = save_nifti(tmp_path / "x_seg-vert_msk.nii.gz", data)
    with pytest.raises(LabelError) as err:
        verse.read_mask(path)
    check_names_file(err, path)
    assert "[27]" in str(err.value)
    with pytest.raises(LabelError) as err:
        verse.read_subreg(path)  # 20 is not a subregion label
    check_names_file(err, path)


def test_mask_resampled_linearly(tmp_path):
    path = save_nifti(tmp_path / "x_seg-vert_msk.nii.gz", np.full((3, 3, 3), 20.5))
    with pytest.raises(DataValueError) as err:
        verse.read_mask(path)
    check_names_file(err, path)


def _json(tmp_path, entries, name="c_ctd.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def test_old_format_without_direction(tmp_path):
    path = _json(tmp_path, [{"label": 20, "X": 40.2, "Y": -12.0, "Z": 88.1}])
    with pytest.raises(FormatError) as err:
        verse.read_centroids(path)
    check_names_file(err, path)
    assert "direction" in str(err.value) and "old" in str(err.value)


def test_direction_disagrees_with_image(fixtures_dir, tmp_path):
    mask = verse.read_mask(fixtures_dir / ANJANY / "sub-verse004_seg-vert_msk.nii.gz")
    path = _json(tmp_path, [{"direction": ["R", "A", "S"]},
                            {"label": 20, "X": 63.2, "Y": 141.9, "Z": 31.8}])
    assert verse.read_centroids(path).direction == ("R", "A", "S")  # no reference: no check
    with pytest.raises(GeometryError) as err:
        verse.read_centroids(path, reference=mask)
    check_names_file(err, path)
    assert str(mask.path) in str(err.value) and "'P', 'I', 'R'" in str(err.value)


def test_centroid_outside_volume(fixtures_dir, tmp_path):
    mask = verse.read_mask(fixtures_dir / ANJANY / "sub-verse004_seg-vert_msk.nii.gz")
    path = _json(tmp_path, [{"direction": ["P", "I", "R"]},
                            {"label": 20, "X": 63.2, "Y": 141.9, "Z": 61.0}])  # Z >= 60.5
    with pytest.raises(GeometryError) as err:
        verse.read_centroids(path, reference=mask)
    check_names_file(err, path)
    assert "outside" in str(err.value)


def test_centroid_json_nan_entries_skipped_and_bad_entries_refused(tmp_path):
    path = tmp_path / "n_ctd.json"
    path.write_text('[{"direction": ["P", "I", "R"]}, {"label": 20, "X": NaN, "Y": 1, "Z": 2},'
                    ' {"label": 21, "X": 1.5, "Y": 2.5, "Z": 3.5}]')
    assert sorted(verse.read_centroids(path).voxel) == [21]
    for entries, error in [([{"direction": ["P", "I", "R"]}, {"label": 26, "X": 1, "Y": 1, "Z": 1}],
                            LabelError),
                           ([{"direction": ["P", "P", "R"]}], FormatError),
                           ([{"direction": ["P", "I", "R"]}, {"label": 20, "X": 1}], FormatError),
                           ({"direction": ["P", "I", "R"]}, FormatError)]:
        bad = _json(tmp_path, entries, "bad_ctd.json")
        with pytest.raises(error) as err:
            verse.read_centroids(bad)
        check_names_file(err, bad)
    broken = tmp_path / "broken_ctd.json"
    broken.write_text('[{"direction": ["P", "I", "R"]}, {"label": 2')
    with pytest.raises(CorruptFileError) as err:
        verse.read_centroids(broken)
    check_names_file(err, broken)


def test_write_centroids_refuses_nan_and_leaves_old_file(tmp_path):
    path = verse.write_centroids(tmp_path / "c.json", {20: [1, 2, 3]}, np.eye(4))
    before = path.read_bytes()
    with pytest.raises(DataValueError):
        verse.write_centroids(path, {20: [1, np.nan, 3]}, np.eye(4))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_ct_mask_shape_mismatch(fixtures_dir):
    case = verse.Case("mixed", "sub-x", ct=fixtures_dir / TPT / "sub-ct_label-22_ct.nii.gz",
                      mask=fixtures_dir / FXG / f"{FXG_STEM}_seg-vert_msk.nii.gz")
    with pytest.raises(GeometryError) as err:
        verse.load_case(case)
    check_names_file(err, case.mask)
    assert str(case.ct) in str(err.value) and "shape" in str(err.value)


def test_ct_mask_affine_mismatch(fixtures_dir, tmp_path):
    ct_path = fixtures_dir / TPT / "sub-ct_label-22_ct.nii.gz"
    mask_img = nib.load(fixtures_dir / TPT / "sub-ct_seg-vert_label-22_msk.nii.gz")
    shifted = mask_img.affine.copy()
    shifted[:3, 3] += [0.0, 1.5, 0.0]  # one voxel off
    moved = save_nifti(tmp_path / "sub-ct_seg-vert_label-22_msk.nii.gz",
                       np.asarray(mask_img.dataobj), shifted)
    case = verse.Case("sub-ct_label-22", "sub-ct", ct=ct_path, mask=moved)
    with pytest.raises(GeometryError) as err:
        verse.load_case(case)
    check_names_file(err, moved)
    assert "affine" in str(err.value)


def test_empty_root(tmp_path):
    with pytest.raises(EmptyRootError) as err:
        verse.find_cases(tmp_path)
    check_names_file(err, tmp_path)
    with pytest.raises(EmptyRootError) as err:
        verse.find_cases(tmp_path / "missing")
    check_names_file(err, tmp_path / "missing")
    _layout(tmp_path, "sub-m", "sub-m", ct=False)
    with pytest.raises(EmptyRootError) as err:
        verse.find_cases(tmp_path)
    assert "require_ct=False" in str(err.value)


def test_grade_table_with_unknown_cases(tmp_path):
    _layout(tmp_path / "root", "sub-a", "sub-a")
    known = [c.case_id for c in verse.find_cases(tmp_path / "root")]
    table = tmp_path / "root" / "fracture_grades.tsv"
    table.write_text("case\tlabel\tgrade\tshape\nsub-a\t20\t0\t0\nsub-zz\t20\t1\t1\n")
    with pytest.raises(GradeTableError) as err:
        verse.read_grades(table, known_cases=known)
    check_names_file(err, table)
    assert "sub-zz" in str(err.value)


def test_appendix_with_unknown_cases(fixtures_dir):
    path = fixtures_dir / APPENDIX
    with pytest.raises(GradeTableError) as err:
        verse.read_grades(path, known_cases=["sub-verse004"])
    check_names_file(err, path)
    assert "159 case(s)" in str(err.value)


@pytest.mark.parametrize("body, error", [
    ("case\tlabel\tgrade\nsub-a\t20\t5\n", GradeTableError),        # grade out of range
    ("case\tlabel\tgrade\nsub-a\t20\tmild\n", GradeTableError),     # not a grade
    ("case\tlabel\tgrade\nsub-a\t27\t0\n", LabelError),             # unknown label
    ("case\tlabel\tgrade\nsub-a\tT14\t0\n", GradeTableError),       # unknown level name
    ("case\tlabel\tgrade\nsub-a\t20\t0\nsub-a\tL1\t1\n", GradeTableError),  # duplicate
    ("case\tvertebra\tgrade\nsub-a\t20\t0\n", GradeTableError),     # missing column
])
def test_bad_grade_tables(tmp_path, body, error):
    path = tmp_path / "grades.tsv"
    path.write_text(body)
    with pytest.raises(error) as err:
        verse.read_grades(path)
    check_names_file(err, path)



# ---------------------------------------------------------------------------------- grade table detection


LONG = "case\tlabel\tgrade\tshape\nsub-a\tL1\t2\t1\nsub-a\tL2\t0\t0\n"


def test_detects_the_fxgrader_table_of_its_sample_dataset(fixtures_dir):
    root = fixtures_dir / "fxgrader_ctfu"
    found = verse.grades_for_root(root)
    assert found.path == root / "dataset_ctfu_labels_subset.tsv"
    assert found.kind == "FX-Grader ratings"
    assert str(found.path) in found.describe() and "2 graded" in found.describe()
    scans = [c.case_id for c in verse.find_cases(root)]
    assert scans == [FXG_STEM]  # the table's ID column names the scan's stem
    assert verse.grade_table_mismatch(found.grades, scans, found.path) is None


def test_detects_the_verse19_appendix(fixtures_dir):
    found = verse.grades_for_root(fixtures_dir / "loeffler2020_appendixE1")
    assert found.path == fixtures_dir / APPENDIX and found.kind == "VerSe'19 appendix E1"
    assert found.grades.case.nunique() == 160  # the appendix has 160 rows


def test_detects_the_long_table_and_prefers_it(tmp_path):
    (tmp_path / "fracture_grades.tsv").write_text(LONG)
    (tmp_path / "dataset_ctfu_labels.tsv").write_text("ID\tdef_L1\nsub-a\t3\n")
    found = verse.grades_for_root(tmp_path)
    assert found.path == tmp_path / "fracture_grades.tsv" and found.kind == "long table"
    assert found.grades.set_index("level").loc["L1", "grade"] == 2
    explicit = verse.grades_for_root(tmp_path, tmp_path / "dataset_ctfu_labels.tsv")
    assert explicit.path == tmp_path / "dataset_ctfu_labels.tsv"
    assert explicit.grades.set_index("level").loc["L1", "grade"] == 3


def test_table_one_folder_down_and_none_at_all(tmp_path):
    (tmp_path / "dataset-verse19training" / "rawdata").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "fracture_grades.tsv").write_text(LONG)  # hidden folders are skipped
    assert verse.find_grade_table(tmp_path) is None
    none = verse.grades_for_root(tmp_path)
    assert none.path is None and none.grades is None and "no grade table" in none.describe()
    (tmp_path / "dataset-verse19training" / "Fracture_Grades.TSV").write_text(LONG)
    assert verse.find_grade_table(tmp_path) == tmp_path / "dataset-verse19training" / "Fracture_Grades.TSV"


def test_mismatch_warning_names_table_and_examples(tmp_path):
    table = tmp_path / "fracture_grades.tsv"
    table.write_text(LONG)
    grades = verse.read_grades(table)
    message = verse.grade_table_mismatch(grades, ["sub-verse004", "sub-verse005"], table)
    assert message is not None and str(table) in message
    assert "sub-a" in message and "sub-verse004" in message and "unlabelled" in message
    assert verse.grade_table_mismatch(grades, ["sub-a", "sub-b"], table) is None  # some match
