"""The next bad inputs (issue 23, items 3-6): each is refused with a typed error naming the file
(or the option), before any work, and nothing is lost or left half-written.

Areas: data-root sources (FIFOs, devices, symlinks out of the root, sizes), NIfTI headers,
centroids against mask labels, grade tables, the patch store's rows and patches, checkpoints,
training losses, full disks and unwritable stores, downloads, and the command line.

Tests may run as root, where ``chmod`` does not stop writes: the unwritable-store case then
simulates the refusal (``PermissionError`` from the file system call) instead of skipping.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from store_helpers import run_cli, write_store
from vfcore import patches, verse
from vfcore.errors import (CheckpointError, DataValueError, DiskFullError, DownloadError,
                           FormatError, GeometryError, GradeTableError, UnsafePathError,
                           WriteError)
from vfcore.run import RunFolder


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".part" in p.name or p.name.endswith((".new", ".old"))]


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def make_root(root: Path) -> Path:
    """One small scan: CT 40^3 (1 mm), L1 and L2 as boxes in the mask, their centroids, and a
    grade table (L1 fractured)."""
    ct = np.full((40, 40, 40), -900, np.int16)
    mask = np.zeros((40, 40, 40), np.int16)
    mask[12:28, 12:28, 4:16], mask[12:28, 12:28, 22:34] = 21, 20   # L2 below L1 (S axis)
    ct[mask > 0] = 300
    _nifti(root / "rawdata/sub-a/sub-a_ct.nii.gz", ct)
    _nifti(root / "derivatives/sub-a/sub-a_seg-vert_msk.nii.gz", mask)
    verse.write_centroids(root / "derivatives/sub-a/sub-a_seg-subreg_ctd.json",
                          {20: [20, 20, 28], 21: [20, 20, 10]}, np.eye(4))
    (root / "fracture_grades.tsv").write_text("case\tlabel\tgrade\tshape\nsub-a\t20\t2\t1\n"
                                              "sub-a\t21\t0\t0\n")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """The small root and a clean store extracted from it (never modified)."""
    folder = tmp_path_factory.mktemp("reliab")
    root = make_root(folder / "root")
    run = folder / "run"
    patches.extract_patches(root, run, progress=False)
    return {"root": root, "run": run}


def _failed(run: Path) -> list[dict]:
    return json.loads(RunFolder(run).path("patch_report").read_text())["failed"]


# --------------------------------------------------------------------------------------------
# Data-root sources: refused with the path, before they are hashed or read
# --------------------------------------------------------------------------------------------


def _fifo(path: Path, outside: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path, outside: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _out_of_root(path: Path, outside: Path) -> None:
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, outside)
    path.symlink_to(outside)


def _too_large(path: Path, outside: Path) -> None:
    with open(path, "r+b") as f:          # sparse: no disk used
        f.truncate(patches.store.SOURCE_MAX_BYTES["json"] + 1)


@pytest.mark.parametrize("which, damage, error, words", [
    ("ct", _fifo, "UnsafePathError", "FIFO"),
    ("ct", _dev_zero, "UnsafePathError", "character device"),
    ("ct", _out_of_root, "UnsafePathError", "outside the data root"),
    ("mask", _out_of_root, "UnsafePathError", "outside the data root"),
    ("centroids", _too_large, "FormatError", "more than the limit"),
])
def test_a_source_that_is_not_a_regular_file_in_the_root_is_refused_unread(tmp_path, which, damage,
                                                                            error, words):
    root = make_root(tmp_path / "root")
    case = verse.find_cases(root)[0]
    path = getattr(case, which)
    damage(path, tmp_path / "elsewhere" / path.name)
    run = tmp_path / "run"
    manifest = patches.extract_patches(root, run, progress=False)   # returns: nothing hangs
    (failed,) = _failed(run)
    assert failed["reason"].startswith(error) and words in failed["reason"]
    assert str(path) in failed["reason"] and len(manifest) == 0
    assert no_partials(run)


def test_a_root_that_is_a_link_is_still_read(tmp_path):
    """Only a file symlinked out of the root is refused: the root itself may be a link (a
    download kept on another disk), and links inside it that stay inside it are followed."""
    make_root(tmp_path / "disk2")
    root = tmp_path / "root"
    root.symlink_to(tmp_path / "disk2")
    ct = root / "rawdata/sub-a/sub-a_ct.nii.gz"
    shutil.move(ct, root / "rawdata/ct-copy.nii.gz")
    ct.symlink_to(root / "rawdata/ct-copy.nii.gz")          # inside the root: fine
    manifest = patches.extract_patches(root, tmp_path / "run", progress=False)
    assert _failed(tmp_path / "run") == [] and len(manifest) == 2


def test_centroids_inside_another_vertebra_are_refused(tmp_path):
    root = make_root(tmp_path / "root")
    ctd = root / "derivatives/sub-a/sub-a_seg-subreg_ctd.json"
    verse.write_centroids(ctd, {20: [20, 20, 10], 21: [20, 20, 28]}, np.eye(4))   # swapped
    with pytest.raises(GeometryError) as err:
        verse.load_case(verse.find_cases(root)[0])
    assert str(ctd) in str(err.value) and "L1 (label 20) lies in L2 (label 21)" in str(err.value)


def test_an_all_zero_vertebra_mask_is_refused(tmp_path):
    root = make_root(tmp_path / "root")
    mask = _nifti(root / "derivatives/sub-a/sub-a_seg-vert_msk.nii.gz", np.zeros((40, 40, 40), np.int16))
    verse.write_centroids(root / "derivatives/sub-a/sub-a_seg-subreg_ctd.json", {20: [20, 20, 28]},
                          np.eye(4))
    patches.extract_patches(root, tmp_path / "run", progress=False)
    (failed,) = _failed(tmp_path / "run")
    assert failed["reason"].startswith("DataValueError") and str(mask) in failed["reason"]
    assert "all zero" in failed["reason"]


# --------------------------------------------------------------------------------------------
# NIfTI headers: refused from the header, before the voxels are read
# --------------------------------------------------------------------------------------------


def _patch_header(path: Path, offset: int, fmt: str, value) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))
    return path


def _rgb(p):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _nifti(p, rgb)


CASES = {
    "rgb": (_rgb, FormatError, "RGB"),
    "complex": (lambda p: _nifti(p, np.ones((4, 4, 4), np.complex64)), FormatError, "complex"),
    "empty": (lambda p: _nifti(p, np.zeros((0, 4, 4), np.int16)), FormatError, "empty volume"),
    "zero pixdim": (lambda p: _patch_header(_nifti(p, np.zeros((4, 4, 4), np.int16)), 80, "<f", 0.0),
                    GeometryError, "pixdim"),
    "nan pixdim": (lambda p: _patch_header(_nifti(p, np.zeros((4, 4, 4), np.int16)), 84, "<f",
                                           float("nan")), GeometryError, "pixdim"),
    "inf scl_slope": (lambda p: _patch_header(_nifti(p, np.zeros((4, 4, 4), np.int16)), 112, "<f",
                                              float("inf")), DataValueError, "scl_slope"),
    "inf scl_inter": (lambda p: _patch_header(_nifti(p, np.zeros((4, 4, 4), np.int16)), 116, "<f",
                                              float("-inf")), DataValueError, "scl_inter"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reader", [verse.read_ct, verse.read_mask])
def test_a_scan_no_reader_should_accept(tmp_path, case, reader):
    make, error, words = CASES[case]
    path = make(tmp_path / "x_ct.nii")
    with pytest.raises(error) as err:
        reader(path)
    assert str(path) in str(err.value) and words in str(err.value)


# --------------------------------------------------------------------------------------------
# Grade tables and the patch store's rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sep, suffix", [("\t", ".tsv"), (",", ".csv")])
def test_a_grade_table_with_a_repeated_column_is_refused(tmp_path, sep, suffix):
    path = tmp_path / f"grades{suffix}"
    path.write_text(sep.join(["case", "label", "grade", "grade"]) + "\n"
                    + sep.join(["sub-a", "20", "0", "3"]) + "\n")
    with pytest.raises(GradeTableError) as err:
        verse.read_grades(path)
    assert str(path) in str(err.value) and "'grade'" in str(err.value)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_grade_table_that_is_not_a_regular_file_is_refused_unread(tmp_path, kind):
    root = make_root(tmp_path / "root")
    table = tmp_path / "grades.tsv"
    if kind == "fifo":
        os.mkfifo(table)
    else:
        table.symlink_to("/dev/zero")
    with pytest.raises(UnsafePathError) as err:
        patches.extract_patches(root, tmp_path / "run", grades=table, progress=False)
    assert str(table) in str(err.value) and "not a regular grade table" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("column, value, words", [
    ("ct_path", "/etc/passwd", "not a path inside"),
    ("ct_path", "../../outside/p_ct.npy", "not a path inside"),
    ("mask_path", "p000_ct.npy/../../x.npy", "not a path inside"),
    ("concept_path", "C:/x.npy", "not a path inside"),
])
def test_manifest_paths_stay_inside_the_store(tmp_path, column, value, words):
    from vfcore.data import load_split

    run = write_store(tmp_path / "run", n=10)
    manifest = RunFolder(run).manifest
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table.loc[0, column] = value
    table.to_csv(manifest, index=False)
    with pytest.raises(UnsafePathError) as err:
        load_split(run, "train")
    assert str(manifest) in str(err.value) and words in str(err.value) and value in str(err.value)


def test_a_patient_in_two_splits_is_refused(tmp_path):
    from vfcore.data import load_split

    run = write_store(tmp_path / "run", n=15)
    manifest = RunFolder(run).manifest
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    test_row = table[table["split"] == "test"].iloc[0].copy()
    test_row["patient"] = table.loc[0, "patient"]           # the same patient in train and test
    table.loc[len(table)] = test_row
    table.to_csv(manifest, index=False)
    with pytest.raises(DataValueError) as err:
        load_split(run, "train")
    assert str(manifest) in str(err.value) and "more than one split" in str(err.value)


def test_the_same_vertebra_twice_is_refused(tmp_path):
    from vfcore.data import load_split

    run = write_store(tmp_path / "run", n=15)
    manifest = RunFolder(run).manifest
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table.loc[len(table)] = table.loc[0]
    table.to_csv(manifest, index=False)
    with pytest.raises(DataValueError) as err:
        load_split(run, "train")
    assert str(manifest) in str(err.value) and "sub-x000 label 20" in str(err.value)


@pytest.mark.parametrize("reader", ["read_ct", "read_mask", "read_centroids"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_readers_refuse_a_fifo_or_device_without_reading(tmp_path, reader, kind):
    path = tmp_path / ("x.json" if reader == "read_centroids" else "x.nii.gz")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)
    with pytest.raises(UnsafePathError) as err:
        getattr(verse, reader)(path)
    assert str(path) in str(err.value) and "not a regular" in str(err.value)


@pytest.mark.parametrize("array", [np.zeros((64, 64, 64), np.int16), np.full((96, 96, 96), np.nan, np.float32),
                                   np.zeros((96, 96, 96, 1), np.int16)],
                         ids=["64^3", "float NaN", "4D"])
def test_a_patch_of_the_wrong_shape_or_type_is_named(tmp_path, array):
    from vfcore.data import load_split

    run = write_store(tmp_path / "run", n=10)
    bad = RunFolder(run).patch("p000_ct.npy")
    np.save(bad, array)
    x, _, _ = load_split(run, "train")
    with pytest.raises(FormatError) as err:
        x[np.arange(len(x))]
    assert str(bad) in str(err.value) and "extract the patches again" in str(err.value)


# --------------------------------------------------------------------------------------------
# Checkpoints: a preset out of bounds is refused before anything is allocated
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, words", [
    ("base", 4096, "base 4096 is outside"),
    ("base", 200, "weights do not fit"),
    ("head", [1 << 20, 8], "head width"),
    ("mlp", [64] * 40, "number of mlp layers"),
    ("crop", 0, "crop 0 is outside"),
    ("zoom", True, "zoom True is outside"),
])
def test_a_checkpoint_whose_preset_is_out_of_bounds(tmp_path, field, value, words):
    import resource

    import torch

    from vfcore.checkpoint import load_checkpoint, save_checkpoint
    from vfcore.model import build_model

    path = save_checkpoint(tmp_path / "best.pt", build_model("small"))
    state = torch.load(path, weights_only=True)
    state["preset"][field] = value
    torch.save(state, path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and words in str(err.value)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grew_mb < 200, f"{grew_mb:.0f} MB allocated before refusing"


# --------------------------------------------------------------------------------------------
# Training: a non-finite loss stops it with the step, the batch and the files
# --------------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_training_naming_batch_and_files(tmp_path, monkeypatch):
    import vfcore.train as train

    run = write_store(tmp_path / "run", n=15)
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 2 else 0.69

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(DataValueError) as err:
        train.fit(run, "small", epochs=2, batch_size=4, augment=None, progress=False)
    text = str(err.value)
    assert "loss is nan at epoch 1, batch 2 (step 2)" in text and "_ct.npy" in text
    assert str(RunFolder(run).manifest) in text
    assert not RunFolder(run).checkpoint.exists() and not RunFolder(run).seed_dir(0).exists()


# --------------------------------------------------------------------------------------------
# Nothing deleted before its replacement is written; full disks named
# --------------------------------------------------------------------------------------------


def test_an_unwritable_store_is_refused_before_anything_is_removed(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(store["run"], run)
    before = files_under(run)
    if os.geteuid() != 0:       # chmod stops writes only for a user other than root
        os.chmod(RunFolder(run).patches, 0o555)
    else:                       # root: the file system call refuses as it would
        import vfcore.checks as checks

        def refuse(*a, dir=None, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))

        monkeypatch.setattr(checks.tempfile, "mkstemp", refuse)
    try:   # another spacing: every case would be re-extracted
        with pytest.raises(WriteError) as err:
            patches.extract_patches(store["root"], run, spacing=1.5, progress=False)
    finally:
        os.chmod(RunFolder(run).patches, 0o755)
    assert str(RunFolder(run).patches) in str(err.value) and "errno 13" in str(err.value)
    assert files_under(run) == before


def test_a_disk_full_during_re_extraction_keeps_the_old_patches(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(store["run"], run)
    old_case = {k: v for k, v in files_under(run).items() if k.startswith("patches/sub-a/")}
    real = np.save
    calls = []

    def save_then_fill(path, array, **kwargs):   # the disk fills on the third patch file
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, array, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fill)
    patches.extract_patches(store["root"], run, spacing=1.5, progress=False)
    (failed,) = _failed(run)
    assert failed["reason"].startswith("DiskFullError") and "disk full (errno 28" in failed["reason"]
    assert {k: v for k, v in files_under(run).items() if k.startswith("patches/sub-a/")} == old_case
    assert no_partials(run)


@pytest.mark.parametrize("writer", ["write_json", "save_npy", "atomic_save", "numpy short write"])
def test_a_full_disk_is_a_typed_error_and_the_old_file_stays(tmp_path, monkeypatch, writer):
    from vfcore import io

    target = tmp_path / ("a.npy" if writer == "save_npy" else "a.json")
    target.write_bytes(b"old")
    if writer == "numpy short write":
        def full(tmp, *a, **k):
            raise OSError("884736 requested and 753536 written")
        monkeypatch.setattr(np, "save", full)
        call = lambda: io.save_npy(target, np.zeros(3))
    else:
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(io.os, "fsync", fsync)
        call = {"write_json": lambda: io.write_json(target, {"a": 1}),
                "save_npy": lambda: io.save_npy(target, np.zeros(3)),
                "atomic_save": lambda: io.atomic_save(target, lambda t: Path(t).write_text("new"))}[writer]
    with pytest.raises(DiskFullError) as err:
        call()
    assert str(target) in str(err.value) and "errno 28" in str(err.value) and "MB free" in str(err.value)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and no_partials(tmp_path)


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("limits, words", [({}, "zip bomb"), ({"max_bytes": 1000, "max_ratio": 1e9},
                                                                "more than the limit")])
def test_extraction_is_bounded_before_anything_is_written(tmp_path, limits, words):
    archive = _zip(tmp_path / "bomb.zip", {"d/zeros.bin": bytes(40 << 20)})   # 40 MB -> ~40 kB
    target = tmp_path / "target"
    with pytest.raises(DownloadError) as err:
        verse.extract_zip(archive, target, **limits)
    assert str(archive) in str(err.value) and words in str(err.value)
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("extracted", ["/etc", "../elsewhere", "a/b", ".."])
def test_a_record_cannot_point_the_extracted_folder_elsewhere(tmp_path, extracted):
    archive = _zip(tmp_path / "a.zip", {"d/x.txt": b"x"})
    from vfcore.io import sha256_file

    record = tmp_path / verse.RECORD_NAME
    record.write_text(json.dumps({"a.zip": {"size": archive.stat().st_size,
                                            "sha256": sha256_file(archive), "extracted": extracted}}))
    with pytest.raises(FormatError) as err:
        verse.download({"a": "http://127.0.0.1:9/a.zip"}, tmp_path, progress=False)
    assert str(record) in str(err.value) and "not a folder name" in str(err.value)


@pytest.mark.parametrize("name", [verse.RECORD_NAME, ".hidden.zip", "archive.zip.part"])
def test_no_archive_can_take_the_record_name(tmp_path, name):
    record = tmp_path / verse.RECORD_NAME
    record.write_text("{}")
    with pytest.raises(DownloadError) as err:
        verse.download({"x": f"http://127.0.0.1:9/{name}"}, tmp_path, progress=False)
    assert name in str(err.value) and record.read_text() == "{}"


def test_a_full_disk_during_download_keeps_the_part(tmp_path, monkeypatch):
    source = tmp_path / "src" / "a.zip"
    source.parent.mkdir()
    _zip(source, {"d/x.txt": b"x" * 1000})
    target = tmp_path / "target"

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError) as err:
        verse.download({"a": source.as_uri()}, target, retries=0, progress=False)
    part = target / "a.zip.part"
    assert str(part) in str(err.value) and "kept" in str(err.value) and part.stat().st_size > 0


# --------------------------------------------------------------------------------------------
# The command line: every flag and variable checked first, exit 2, one line
# --------------------------------------------------------------------------------------------


CLI = {
    "--device bogus": (["train", "{run}", "--device", "bogus"], {}, "--device"),
    "--device cuda:99": (["dissect", "{run}", "--device", "cuda:99"], {}, "--device"),
    "--seeds huge": (["train", "{run}", "--seeds", str(2 ** 64)], {}, "--seeds"),
    "--seeds twice": (["train", "{run}", "--seeds", "1", "1"], {}, "--seeds"),
    "--seeds 101": (["train", "{run}", "--seeds", *map(str, range(101))], {}, "--seeds"),
    "patches --seed -1": (["patches", "{root}", "{run}", "--seed", "-1"], {}, "--seed"),
    "phantom --seed -1": (["phantom", "{run}/data", "--seed", "-1"], {}, "--seed"),
    "phantom --prevalence 2": (["phantom", "{run}/data", "--prevalence", "2"], {}, "--prevalence"),
    "phantom --dissect-scans -3": (["phantom", "{run}/data", "--dissect-scans", "-3"], {},
                                   "--dissect-scans"),
    "phantom --dissect-confounders nan": (["phantom", "{run}/data", "--dissect-confounders", "nan"],
                                          {}, "--dissect-confounders"),
    "dissect --split train": (["dissect", "{run}", "--split", "train"], {}, "never train"),
    "dissect --split test+train": (["dissect", "{run}", "--split", "test+train"], {}, "never train"),
    "dissect --top-fp -1": (["dissect", "{run}", "--top-fp", "-1"], {}, "--top-fp"),
    "patches --workers 100000": (["patches", "{root}", "{run}", "--workers", "100000"], {},
                                 "--workers"),
    "WORLD_SIZE=2 alone": (["train", "{run}"], {"WORLD_SIZE": "2"}, "MASTER_ADDR"),
    "WORLD_SIZE=two": (["dissect", "{run}"], {"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    "RANK=5 of 2": (["train", "{run}"], {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": "29500", "RANK": "5"}, "RANK"),
    "VFCORE_DIST_TIMEOUT=soon": (["train", "{run}"], {"VFCORE_DIST_TIMEOUT": "soon"},
                                 "VFCORE_DIST_TIMEOUT"),
    "VFCORE_DIST_TIMEOUT=-5": (["dissect", "{run}"], {"VFCORE_DIST_TIMEOUT": "-5"},
                               "VFCORE_DIST_TIMEOUT"),
    "VFCORE_LOCK_WAIT=x": (["dissect", "{run}"], {"VFCORE_LOCK_WAIT": "x"}, "VFCORE_LOCK_WAIT"),
}


@pytest.mark.parametrize("case", sorted(CLI))
def test_a_bad_flag_or_variable_exits_2_before_any_work(store, tmp_path, monkeypatch, case):
    argv, env, words = CLI[case]
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    code, out, err = run_cli(*[a.format(run=run, root=store["root"]) for a in argv])
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]                  # argparse's usage above it, if any
    assert words in last and ("vfcore: error: " in last or ": error: argument " in last)
    assert not run.exists()                              # checked before any work


def test_device_cuda_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli("train", tmp_path / "run", "--device", "cuda")
    assert code == 2 and "--device must be cpu (this PyTorch sees no CUDA GPU); got 'cuda'" in err


def test_a_full_disk_while_extracting_keeps_the_archive_and_leaves_nothing(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "a.zip", {"d/x.txt": b"x" * 1000, "d/y.txt": b"y"})
    target = tmp_path / "target"
    real = zipfile.ZipFile._extract_member

    def full(self, member, path, pwd):
        name = member if isinstance(member, str) else member.filename
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / name))

    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", full)
    with pytest.raises(DiskFullError) as err:
        verse.extract_zip(archive, target)
    assert "x.txt" in str(err.value) and "errno 28" in str(err.value)
    assert archive.is_file() and list(target.iterdir()) == []
    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", real)
    assert [p.name for p in verse.extract_zip(archive, target)] == ["d"]   # then it works


def test_a_batch_larger_than_an_epoch_is_refused_before_training(tmp_path):
    run = write_store(tmp_path / "run", n=30)          # 18 labelled training vertebrae
    code, out, err = run_cli("train", run, "--preset", "small", "--batch-size", "1000", "--quiet")
    assert code == 2 and "--batch-size must be at most 18" in err and str(RunFolder(run).manifest) in err
    assert not RunFolder(run).model.exists()
