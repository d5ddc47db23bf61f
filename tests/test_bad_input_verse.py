"""Bad input to the verse readers (issue 13): each case is refused with a typed error that
names the file, and nothing is written beside it.

Bad files are built here in ``tmp_path`` from the NIfTI-1 spec (header bytes written with
nibabel's header class, voxels by hand), so the expected outcome of each case is known from
its construction, not from the reader. A memory test runs the upload reader on a header bomb
and a gzip bomb in a child process and reads its peak RSS (``ru_maxrss``).
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vfcore import verse
from vfcore.errors import (
    CorruptFileError,
    DataValueError,
    FormatError,
    GeometryError,
    GradeTableError,
    LabelError,
    VfcoreError,
)

GIB = 1 << 30


# ---------------------------------------------------------------------------------- builders


def nifti_header(shape, dtype, *, vox_offset: int = 352, magic: bytes = b"n+1") -> bytes:
    """348 header bytes + the 4-byte extension flag, claiming ``shape`` of ``dtype``."""
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h.set_sform(np.eye(4), code=1)
    h["vox_offset"] = vox_offset
    h["magic"] = magic
    return h.binaryblock + b"\0" * 4


def nifti_bytes(data: np.ndarray, affine=None) -> bytes:
    """A complete single-file NIfTI-1 (header, then the voxels in Fortran order)."""
    h = nib.Nifti1Header()
    h.set_data_shape(data.shape)
    h.set_data_dtype(data.dtype)
    h.set_sform(np.eye(4) if affine is None else affine, code=1)
    h["vox_offset"] = 352
    return h.binaryblock + b"\0" * 4 + data.tobytes(order="F")


def write(path: Path, content: bytes) -> Path:
    """``content`` gzip-compressed for a .gz name, else as given."""
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def header_bomb() -> bytes:
    """A .nii.gz of ~60 bytes whose header claims 1024 x 1024 x 768 int16 = 1.5 GiB."""
    return gzip.compress(nifti_header((1024, 1024, 768), np.int16), 9)


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """A valid 640^3 uint8 NIfTI of zeros (262 MB), gzip-compressed to ~250 kB."""
    buf = io.BytesIO()  # the zeros are streamed in 4 MiB blocks to keep the test's memory low
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as f:
        f.write(nifti_header((640, 640, 640), np.uint8))
        zeros = bytes(1 << 22)
        for _ in range(640 ** 3 // len(zeros)):
            f.write(zeros)
        f.write(bytes(640 ** 3 % len(zeros)))
    return buf.getvalue()


CLAIM_1GIB = (1024, 1024, 1024)  # uint8: 1 GiB


def kb_claiming_gib() -> bytes:
    """1 kB: a header claiming 1 GiB of uint8 voxels, then 672 bytes of them."""
    head = nifti_header(CLAIM_1GIB, np.uint8)
    return head + bytes(1024 - len(head))


def centroid_file(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    return path


def ctd(*points) -> list:
    return [{"direction": ["R", "A", "S"]}, *points]


def long_table(path: Path, rows: str) -> Path:
    path.write_text("case\tlabel\tgrade\tshape\n" + rows)
    return path


def appendix(path: Path, rows: list[dict]) -> Path:
    with pd.ExcelWriter(path, engine="openpyxl") as xl:
        pd.DataFrame(rows).to_excel(xl, sheet_name="VerSe_dataset", index=False)
    return path


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def record(target: Path, entry, text: str | None = None) -> Path:
    """A checksum record holding ``{"a.zip": entry}`` (or the raw ``text``)."""
    target.mkdir(exist_ok=True)
    (target / verse.RECORD_NAME).write_text(json.dumps({"a.zip": entry}) if text is None else text)
    return target / verse.RECORD_NAME


def download_with_record(target: Path):
    # the record is read before anything is fetched: port 9 (discard) is never contacted
    return lambda: verse.download({"a": "http://127.0.0.1:9/a.zip"}, target, progress=False)


# ---------------------------------------------------------------------------------- cases
# Each case: build(tmp) -> (call, the name the message must contain); expected error type.

Build = Callable[[Path], tuple[Callable[[], object], str]]


def _reader(reader, name: str, content: bytes | Callable[[], bytes] | None, raw: bool = False,
            **kwargs) -> Build:
    """``reader(path)`` on a file holding ``content`` (gzip-compressed for a .gz name unless
    ``raw``: then written as given, already compressed); ``None``: no file at all."""
    def build(tmp: Path):
        path = tmp / name
        if content is not None:
            data = content() if callable(content) else content
            path.write_bytes(data if raw or not name.endswith(".gz") else gzip.compress(data))
        return (lambda: reader(path, **kwargs)), str(path)
    return build


def _folder(reader, name: str) -> Build:
    def build(tmp: Path):
        (tmp / name).mkdir()
        return (lambda: reader(tmp / name)), str(tmp / name)
    return build


def _upload(name: str, content: Callable[[], bytes], **kwargs) -> Build:
    def build(tmp: Path):
        data = content()
        return (lambda: verse.read_nifti_bytes(name, data, **kwargs)), name
    return build


def _json(reader, name: str, entries) -> Build:
    def build(tmp: Path):
        path = centroid_file(tmp / name, entries)
        return (lambda: reader(path)), str(path)
    return build


def _table(name: str, make, **kwargs) -> Build:
    def build(tmp: Path):
        path = make(tmp / name)
        return (lambda: verse.read_grades(path, **kwargs)), str(path)
    return build


def _record(entry=None, text: str | None = None) -> Build:
    def build(tmp: Path):
        path = record(tmp / "dl", entry, text)
        return download_with_record(tmp / "dl"), str(path)
    return build


def _truncated_gz() -> bytes:
    full = gzip.compress(nifti_bytes(np.arange(4096, dtype=np.int16).reshape(16, 16, 16)))
    return full[: len(full) // 2]


def _trailing_gz() -> bytes:
    """A 4^3 uint8 volume followed by 2 MiB more than its header claims (past the slack)."""
    return gzip.compress(nifti_bytes(np.zeros((4, 4, 4), np.uint8)) + bytes(2 << 20))


def _grid_mismatch(tmp: Path):
    ct = write(tmp / "sub-a_ct.nii.gz", nifti_bytes(np.zeros((4, 4, 4), np.int16)))
    mask = write(tmp / "sub-a_seg-vert_msk.nii.gz", nifti_bytes(np.zeros((4, 4, 5), np.uint8)))
    case = verse.Case("sub-a", "sub-a", ct=ct, mask=mask)
    return (lambda: verse.load_case(case)), str(mask)


def _ambiguous_tables(tmp: Path):
    for name in ("dataset_ctfu_labels.tsv", "dataset_ctfu_labels_subset.tsv"):
        (tmp / name).write_text("ID\tdef_L1\nsub-a\t0\n")
    return (lambda: verse.find_grade_table(tmp)), str(tmp)


def _explicit_missing_table(tmp: Path):
    return (lambda: verse.grades_for_root(tmp, tmp / "nope.tsv")), str(tmp / "nope.tsv")


def _unknown_case(tmp: Path):
    path = long_table(tmp / "g.tsv", "sub-zzz\tL1\t0\t0\n")
    return (lambda: verse.read_grades(path, known_cases=["sub-a"])), str(path)


A = np.zeros((4, 4, 4), np.float32)
NAN_CT = A.copy()
NAN_CT[1, 2, 3] = np.nan
HALF_MASK = np.zeros((4, 4, 4), np.float32)
HALF_MASK[0, 0, 0] = 20.5
BAD_LABEL = np.zeros((4, 4, 4), np.uint8)
BAD_LABEL[0, 0, 0] = 26
ROW = {"verse_ID": 4, "subject_ID": 4, "T1_fx-g": 0, "T1_fx-s": 0}
POINT = {"label": 20, "X": 1.0, "Y": 1.0, "Z": 1.0}

CASES: list[tuple[str, Build, type[VfcoreError]]] = [
    # --- missing files and folders named like files
    ("ct missing", _reader(verse.read_ct, "sub-a_ct.nii.gz", None), CorruptFileError),
    ("mask missing", _reader(verse.read_mask, "sub-a_seg-vert_msk.nii.gz", None), CorruptFileError),
    ("ct is a folder", _folder(verse.read_ct, "sub-a_ct.nii.gz"), CorruptFileError),
    ("mask is a folder", _folder(verse.read_mask, "sub-a_seg-vert_msk.nii.gz"), CorruptFileError),
    ("centroids missing", _reader(verse.read_centroids, "sub-a_seg-vb_ctd.json", None), CorruptFileError),
    ("centroids is a folder", _folder(verse.read_centroids, "sub-a_seg-vb_ctd.json"), CorruptFileError),
    ("grades missing", _reader(verse.read_grades, "fracture_grades.tsv", None), CorruptFileError),
    ("grades is a folder", _folder(verse.read_grades, "fracture_grades.tsv"), CorruptFileError),
    ("explicit table missing", _explicit_missing_table, CorruptFileError),
    # --- sizes a header claims (issue 13 item 1)
    ("ct header bomb 1.5 GiB", _reader(verse.read_ct, "hb_ct.nii.gz", header_bomb, raw=True),
     CorruptFileError),
    ("mask header bomb 1.5 GiB", _reader(verse.read_mask, "hb_msk.nii.gz", header_bomb, raw=True),
     CorruptFileError),
    ("mask .nii: 1 kB claiming 1 GiB", _reader(verse.read_mask, "kb_msk.nii", kb_claiming_gib()),
     CorruptFileError),
    ("ct .nii: 1 kB claiming 1 GiB", _reader(verse.read_ct, "kb_ct.nii", kb_claiming_gib()),
     CorruptFileError),
    ("subreg .nii.gz: 1 kB claiming 1 GiB",
     _reader(verse.read_subreg, "kb_msk.nii.gz", kb_claiming_gib()), CorruptFileError),
    ("ct header over the limit (128 GiB)",
     _reader(verse.read_ct, "big_ct.nii", nifti_header((4096, 4096, 4096), np.int16)), FormatError),
    ("mask gzip bomb over max_bytes", _reader(verse.read_mask, "bomb_msk.nii.gz", gzip_bomb, raw=True,
                                              max_bytes=verse.UPLOAD_MAX_BYTES), FormatError),
    ("gzip stream longer than claimed + slack",
     _reader(verse.read_mask, "long_msk.nii.gz", _trailing_gz, raw=True), FormatError),
    # --- broken files
    ("truncated gzip", _reader(verse.read_ct, "cut_ct.nii.gz", _truncated_gz, raw=True),
     CorruptFileError),
    ("not a NIfTI", _reader(verse.read_ct, "junk_ct.nii", b"hello, this is not a NIfTI file"),
     CorruptFileError),
    ("empty file", _reader(verse.read_mask, "empty_msk.nii", b""), CorruptFileError),
    ("header cut short", _reader(verse.read_ct, "short_ct.nii", nifti_header((4, 4, 4), np.int16)[:200]),
     CorruptFileError),
    ("4D image", _reader(verse.read_ct, "4d_ct.nii", nifti_bytes(np.zeros((2, 2, 2, 2), np.int16))),
     FormatError),
    (".hdr/.img magic", _reader(verse.read_ct, "pair_ct.nii",
                                nifti_header((2, 2, 2), np.uint8, magic=b"ni1") + bytes(8)), FormatError),
    ("vox_offset beyond extensions", _reader(verse.read_ct, "off_ct.nii",
                                             nifti_header((2, 2, 2), np.uint8, vox_offset=1 << 30)),
     CorruptFileError),
    ("NaN in CT", _reader(verse.read_ct, "nan_ct.nii.gz", nifti_bytes(NAN_CT)), DataValueError),
    ("singular affine", _reader(verse.read_ct, "flat_ct.nii.gz",
                                nifti_bytes(A, affine=np.diag([1.0, 1.0, 0.0, 1.0]))), GeometryError),
    ("mask not integer", _reader(verse.read_mask, "half_msk.nii.gz", nifti_bytes(HALF_MASK)),
     DataValueError),
    ("mask unknown label", _reader(verse.read_mask, "bad_msk.nii.gz", nifti_bytes(BAD_LABEL)),
     LabelError),
    ("grid mismatch in a case", _grid_mismatch, GeometryError),
    # --- uploads (read_nifti_bytes)
    ("upload header bomb", _upload("hb.nii.gz", header_bomb), FormatError),
    ("upload gzip bomb", _upload("bomb.nii.gz", gzip_bomb), FormatError),
    ("upload 1 kB claiming 1 GiB", _upload("kb.nii", kb_claiming_gib), FormatError),
    ("upload 1 kB claiming 1 GiB, large limit",
     _upload("kb.nii", kb_claiming_gib, max_bytes=4 * GIB), CorruptFileError),
    ("upload header bomb, large limit",
     _upload("hb.nii.gz", header_bomb, max_bytes=4 * GIB), CorruptFileError),
    ("upload of a non-3D volume", _upload("4d.nii", lambda: nifti_bytes(np.zeros((2, 2, 2, 2), np.int16))),
     FormatError),
    ("upload larger than max_bytes",
     _upload("big.nii", lambda: nifti_bytes(np.zeros((8, 8, 8), np.int16)), max_bytes=1000),
     FormatError),
    ("upload junk", _upload("junk.nii.gz", lambda: b"\x1f\x8bnot really gzip"), CorruptFileError),
    # --- centroid JSON (issue 13 items 6, 7)
    ("100,000-deep centroid JSON", _json(verse.read_centroids, "deep_ctd.json", deep_json()),
     CorruptFileError),
    ('"label": true', _json(verse.read_centroids, "bool_ctd.json", ctd({**POINT, "label": True})),
     FormatError),
    ('"label": 1e400 (inf)', _json(verse.read_centroids, "inf_ctd.json",
                                   '[{"direction": ["R", "A", "S"]}, {"label": 1e400, "X": 1, "Y": 1, "Z": 1}]'),
     FormatError),
    ('"label": NaN', _json(verse.read_centroids, "nan_ctd.json",
                           '[{"direction": ["R", "A", "S"]}, {"label": NaN, "X": 1, "Y": 1, "Z": 1}]'),
     FormatError),
    ('"label": "20"', _json(verse.read_centroids, "str_ctd.json", ctd({**POINT, "label": "20"})),
     FormatError),
    ("centroid label 26", _json(verse.read_centroids, "l26_ctd.json", ctd({**POINT, "label": 26})),
     LabelError),
    ("centroids without direction", _json(verse.read_centroids, "old_ctd.json", [POINT]), FormatError),
    ("centroids not JSON", _json(verse.read_centroids, "bad_ctd.json", "[{"), CorruptFileError),
    ("centroids not UTF-8", _reader(verse.read_centroids, "bin_ctd.json", b"\xff\xfe\x00["),
     CorruptFileError),
    ("centroids infinite X", _json(verse.read_centroids, "x_ctd.json",
                                   '[{"direction": ["R", "A", "S"]}, {"label": 20, "X": 1e400, "Y": 1, "Z": 1}]'),
     DataValueError),
    ("JSON over the size limit", _reader(verse.read_small_json, "big_ctd.json",
                                         json.dumps(ctd(POINT)).encode(), max_bytes=10), FormatError),
    # --- grade tables (issue 13 items 6, 7)
    ("grade inf", _table("g.tsv", lambda p: long_table(p, "sub-a\tL1\tinf\t0\n")), GradeTableError),
    ("grade 1e400", _table("g.tsv", lambda p: long_table(p, "sub-a\tL1\t1e400\t0\n")), GradeTableError),
    ("shape -inf", _table("g.tsv", lambda p: long_table(p, "sub-a\tL1\t1\t-inf\n")), GradeTableError),
    ("label inf", _table("g.tsv", lambda p: long_table(p, "sub-a\tinf\t1\t1\n")), GradeTableError),
    ("grade 4", _table("g.tsv", lambda p: long_table(p, "sub-a\tL1\t4\t0\n")), GradeTableError),
    ("long table without grade column", _table("g.csv", lambda p: (p.write_text("case,label\nsub-a,L1\n"), p)[1]),
     GradeTableError),
    ("unknown case", _unknown_case, GradeTableError),
    ("appendix empty verse_ID", _table("a.xlsx", lambda p: appendix(p, [ROW, {**ROW, "verse_ID": None}])),
     GradeTableError),
    ("appendix grade inf", _table("a.xlsx", lambda p: appendix(p, [{**ROW, "T1_fx-g": "inf"}])),
     GradeTableError),
    ("appendix grade TRUE", _table("a.xlsx", lambda p: appendix(p, [{**ROW, "T1_fx-g": True}])),
     GradeTableError),
    ("appendix not a workbook", _table("a.xlsx", lambda p: (p.write_bytes(b"PK\x03\x04junk"), p)[1]),
     CorruptFileError),
    ("FX-Grader empty ID", _table("dataset_ctfu_labels.tsv",
                                  lambda p: (p.write_text("ID\tdef_L1\n \t0\n"), p)[1]), GradeTableError),
    ("FX-Grader code 12", _table("dataset_ctfu_labels.tsv",
                                 lambda p: (p.write_text("ID\tdef_L1\nsub-a\t12\n"), p)[1]), GradeTableError),
    ("two FX-Grader tables in a root", _ambiguous_tables, GradeTableError),
    # --- download record (issue 13 item 6)
    ("record entry without size", _record({"sha256": "0" * 64}), FormatError),
    ("record entry as a string", _record("a string"), FormatError),
    ("record size as a string", _record({"size": "123", "sha256": "0" * 64}), FormatError),
    ("record sha256 not hex", _record({"size": 1, "sha256": "xyz"}), FormatError),
    ("record 100,000 deep", _record(text=deep_json()), CorruptFileError),
    ("record is a list", _record(text="[1, 2]"), FormatError),
    ("record not JSON", _record(text="{"), CorruptFileError),
]


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1,
                   p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("build,error", [(b, e) for _, b, e in CASES], ids=[c for c, _, _ in CASES])
def test_bad_input_is_refused_by_name_and_writes_nothing(tmp_path, build, error):
    call, name = build(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error) as err:
        call()
    assert name in str(err.value), f"message does not name {name}: {err.value}"
    assert isinstance(err.value, VfcoreError)
    assert snapshot(tmp_path) == before, "the reader wrote or removed files"


def test_at_least_35_cases():
    assert len(CASES) >= 35


def test_header_bombs_have_the_sizes_the_issue_describes():
    """The constructed inputs are what they claim (independent of the reader)."""
    hb = header_bomb()
    assert len(hb) < 100
    raw = gzip.decompress(hb)
    h = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]))
    assert np.prod(h.get_data_shape()) * 2 == 1.5 * GIB
    assert 200_000 < len(gzip_bomb()) < 300_000
    assert len(kb_claiming_gib()) == 1024


def test_messages_give_both_sizes(tmp_path):
    path = write(tmp_path / "kb_msk.nii", kb_claiming_gib())
    with pytest.raises(CorruptFileError) as err:
        verse.read_mask(path)
    assert "1,024 bytes" in str(err.value) and f"{GIB + 352:,}" in str(err.value)
    with pytest.raises(FormatError) as err:
        verse.read_nifti_bytes("bomb.nii.gz", gzip_bomb())
    assert f"{640 ** 3:,}" in str(err.value) and f"{verse.UPLOAD_MAX_BYTES:,}" in str(err.value)


def test_a_valid_upload_reads_as_numpy_wrote_it():
    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8) - 100
    for content in (nifti_bytes(data), gzip.compress(nifti_bytes(data))):
        vol = verse.read_nifti_bytes("p.nii.gz", content)
        np.testing.assert_array_equal(vol.data, data)
        np.testing.assert_array_equal(vol.affine, np.eye(4))


def test_a_gzip_stream_within_the_slack_is_read(tmp_path):
    """Padding after the voxels (below GZIP_SLACK_BYTES) is tolerated, the voxels are exact."""
    data = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    path = tmp_path / "pad_msk.nii.gz"
    path.write_bytes(gzip.compress(nifti_bytes(data) + bytes(1000)))
    np.testing.assert_array_equal(verse.read_mask(path, valid=None).data, data)


_CHILD = """
import resource, sys
from vfcore import verse
path = sys.argv[1]
content = open(path, "rb").read()
verse.read_nifti_bytes  # imported before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if sys.argv[2] == "upload":
        verse.read_nifti_bytes(path, content)
    else:
        verse.read_ct(path)
except verse.reading.CorruptFileError as err:
    print("corrupt", err)
except verse.reading.FormatError as err:
    print("format", err)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024)
"""


@pytest.mark.parametrize("bomb,reader", [("header", "upload"), ("gzip", "upload"), ("header", "file")])
def test_bombs_stay_in_bounded_memory(tmp_path, bomb, reader):
    """Peak RSS of a fresh process reading the bomb stays under 300 MB above its baseline."""
    path = tmp_path / f"{bomb}_ct.nii.gz"
    path.write_bytes(header_bomb() if bomb == "header" else gzip_bomb())
    env = {**os.environ, "PYTHONPATH": str(Path(verse.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), reader], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(("corrupt", "format")) and str(path) in lines[0]
    grown = int(lines[-1])
    assert grown < 300e6, f"peak RSS grew by {grown / 1e6:.0f} MB"
