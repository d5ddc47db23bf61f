"""Bad inputs to the patch store, the command line and the notebook runner (issue 13).

Each case gives a hostile or unlucky input and asserts three things: the error type (or the
exit status of the command), that the message names the file (or the option) at fault, and
that nothing half-written is left (no ``.part`` temporaries; a refused command writes nothing).
Damaged stores are the other half: a resume notices every kind of damage, says which file,
and ends byte-identical to a clean store.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vfcore import notebooks, patches
from store_helpers import run_cli
from vfcore.errors import (CorruptFileError, DataValueError, EmptyRootError, FormatError,
                           GradeTableError, InputError, MissingArtifactError, VfcoreError)

MANIFEST_HEADER = ",".join(patches.MANIFEST_COLUMNS)


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".part" in p.name]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A phantom root of two scans and a clean store made from it (never modified)."""
    from vfcore.phantom import write_phantom_root

    folder = tmp_path_factory.mktemp("bad")
    root = write_phantom_root(folder / "data", n_scans=2, seed=0, prevalence=0.5, workers=1,
                              progress=False)
    ref = folder / "ref"
    manifest = patches.extract_patches(root, ref, seed=0, progress=False)
    return {"root": root, "ref": ref, "manifest": manifest}


# --------------------------------------------------------------------------------------------
# Commands refused with exit 2, one line, naming the file or option; nothing written
# --------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _run_with_manifest(tmp: Path, text: bytes | str) -> Path:
    _write(tmp / "run" / "patches" / "manifest.csv", text)
    return tmp / "run"


def _garbage(n: int = 400) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


#: id -> builds (argv, the text the error must name) in a fresh folder ``t``; ``b`` is ``base``.
REFUSED = {
    "patches: root missing": lambda t, b: (["patches", t / "nothing", t / "run"], t / "nothing"),
    "patches: root is a file": lambda t, b: (["patches", _write(t / "root.nii.gz", "x"), t / "run"],
                                             t / "root.nii.gz"),
    "patches: root empty": lambda t, b: (["patches", _mkdir(t / "empty"), t / "run"], t / "empty"),
    "patches: --grades missing": lambda t, b: (["patches", b["root"], t / "run", "--grades",
                                                t / "g.tsv"], t / "g.tsv"),
    "patches: --grades is a folder": lambda t, b: (["patches", b["root"], t / "run", "--grades",
                                                    _mkdir(t / "g.tsv")], t / "g.tsv"),
    "patches: --grades binary": lambda t, b: (["patches", b["root"], t / "run", "--grades",
                                               _write(t / "g.tsv", _garbage())], t / "g.tsv"),
    "patches: --grades wrong columns": lambda t, b: (
        ["patches", b["root"], t / "run", "--grades", _write(t / "g.tsv", "a\tb\n1\t2\n")],
        t / "g.tsv"),
    "patches: run is a file": lambda t, b: (["patches", b["root"], _write(t / "run", "x"),
                                             "--quiet"], t / "run"),
    "patches: --workers 0": lambda t, b: (["patches", b["root"], t / "run", "--workers", 0],
                                          "--workers"),
    "patches: --workers two": lambda t, b: (["patches", b["root"], t / "run", "--workers", "two"],
                                            "--workers"),
    "phantom: --scans 0": lambda t, b: (["phantom", t / "data", "--scans", 0], "--scans"),
    "train: no patch store": lambda t, b: (["train", _mkdir(t / "run")], "manifest.csv"),
    "train: binary manifest": lambda t, b: (["train", _run_with_manifest(t, _garbage())],
                                            "manifest.csv"),
    "train: empty manifest": lambda t, b: (["train", _run_with_manifest(t, b"")], "manifest.csv"),
    "train: manifest without columns": lambda t, b: (
        ["train", _run_with_manifest(t, "case,label\nsub-1,20\n")], "manifest.csv"),
    "train: manifest label not a number": lambda t, b: (
        ["train", _run_with_manifest(t, MANIFEST_HEADER + "\n" + ",".join(
            ["sub-1", "sub-1", "L1"] + [""] * (len(patches.MANIFEST_COLUMNS) - 5) + ["0", ""]
        ) + "\n")], "manifest.csv"),
    "train: manifest is a folder": lambda t, b: (
        ["train", _mkdir(t / "run" / "patches" / "manifest.csv").parents[1]], "manifest.csv"),
    "train: --preset huge": lambda t, b: (["train", t / "run", "--preset", "huge"], "--preset"),
    "train: --augment heavy": lambda t, b: (["train", t / "run", "--augment", "heavy"], "--augment"),
    "train: --epochs 0": lambda t, b: (["train", t / "run", "--epochs", 0], "--epochs"),
    "train: --seeds one": lambda t, b: (["train", t / "run", "--seeds", "one"], "--seeds"),
    "dissect: no checkpoint": lambda t, b: (["dissect", _mkdir(t / "run")], "best.pt"),
    "dissect: --q 0": lambda t, b: (["dissect", t / "run", "--q", 0], "--q"),
    "dissect: --q nan": lambda t, b: (["dissect", t / "run", "--q", "nan"], "--q"),
    "dissect: --q 1.5": lambda t, b: (["dissect", t / "run", "--q", 1.5], "--q"),
    "dissect: --split holdout": lambda t, b: (["dissect", t / "run", "--split", "holdout"],
                                              "--split"),
    "run-notebooks: --only unknown": lambda t, b: (["run-notebooks", "--run", t / "run", "--only",
                                                    "07_nothing"], "07_nothing"),
    "run-notebooks: --only one unknown of two": lambda t, b: (
        ["run-notebooks", "--run", t / "run", "--only", "01_preprocessing", "bogus"], "bogus"),
    "run-notebooks: run is a file": lambda t, b: (
        ["run-notebooks", "--run", _write(t / "run", "x"), "--only", "01"], t / "run"),
    "unknown command": lambda t, b: (["straighten", t], "straighten"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_command(name, base, tmp_path):
    argv, named = REFUSED[name](tmp_path, base)
    before = files_under(tmp_path)
    dirs_before = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    root_before = files_under(base["root"])
    code, out, err = run_cli(*argv)
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # argparse prints its usage above the error line
    assert "error:" in line and str(named) in line, err
    assert files_under(tmp_path) == before  # nothing written, nothing half-written
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == dirs_before
    assert files_under(base["root"]) == root_before


# --------------------------------------------------------------------------------------------
# The Python functions: typed errors naming the file
# --------------------------------------------------------------------------------------------


def _manifest_file(t: Path, data) -> Path:
    return _write(t / "manifest.csv", data)


def _run_folder(t: Path):
    from vfcore.run import RunFolder

    return RunFolder(t / "run")


#: id -> (setup(t, b) -> the call to make, the error type, the text the message must name).
TYPED = {
    "read_manifest: binary": (lambda t, b: (patches.read_manifest,
                                            _manifest_file(t, _garbage())),
                              CorruptFileError, "manifest.csv"),
    "read_manifest: 0 bytes": (lambda t, b: (patches.read_manifest, _manifest_file(t, b"")),
                               CorruptFileError, "manifest.csv"),
    "read_manifest: a folder": (lambda t, b: (patches.read_manifest, _mkdir(t / "manifest.csv")),
                                CorruptFileError, "manifest.csv"),
    "read_manifest: columns missing": (lambda t, b: (patches.read_manifest, _manifest_file(
        t, "case,patient\na,b\n")), FormatError, "manifest.csv"),
    "read_manifest: label 'L1'": (lambda t, b: (patches.read_manifest, _manifest_file(
        t, MANIFEST_HEADER + "\n" + "a,b,L1" + "," * (len(patches.MANIFEST_COLUMNS) - 3) + "\n")),
        DataValueError, "manifest.csv"),
    "extract_patches: root missing": (lambda t, b: (
        lambda: patches.extract_patches(t / "none", t / "run", progress=False),),
        EmptyRootError, "none"),
    "extract_patches: grades missing": (lambda t, b: (
        lambda: patches.extract_patches(b["root"], t / "run", grades=t / "g.tsv",
                                        progress=False),), GradeTableError, "g.tsv"),
    "run_notebooks: --only unknown": (lambda t, b: (
        lambda: notebooks.run_notebooks(t / "run", only=["nope"]),), InputError, "nope"),
    "RunFolder.require: no checkpoint": (lambda t, b: (_run_folder(t).require, "checkpoint"),
                                         MissingArtifactError, "best.pt"),
}


@pytest.mark.parametrize("name", list(TYPED))
def test_typed_error(name, base, tmp_path):
    setup, error, named = TYPED[name]
    call, *args = setup(tmp_path, base)
    before = files_under(tmp_path)
    with pytest.raises(error) as info:
        call(*args)
    assert isinstance(info.value, VfcoreError)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert files_under(tmp_path) == before
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Damaged stores: the resume notices, says which file, and ends byte-identical
# --------------------------------------------------------------------------------------------


def _first_ct(store: Path, manifest: pd.DataFrame) -> Path:
    return store / manifest["ct_path"].iloc[0]


def _record(store: Path, manifest: pd.DataFrame) -> Path:
    return store / manifest["case"].iloc[0] / patches.RECORD_NAME


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


#: id -> (damage(store, manifest), what the resume must name: "patch" (the damaged patch file),
#: "record" (the case's completion record) or None (nothing to re-extract)).
DAMAGE = {
    "patch truncated": (lambda s, m: _write(_first_ct(s, m), _first_ct(s, m).read_bytes()[:999]),
                        "patch"),
    "patch 0 bytes": (lambda s, m: _write(_first_ct(s, m), b""), "patch"),
    "patch one bit flipped": (lambda s, m: _flip(_first_ct(s, m)), "patch"),
    "patch deleted": (lambda s, m: _first_ct(s, m).unlink(), "patch"),
    "patch replaced by a folder": (lambda s, m: (_first_ct(s, m).unlink(),
                                                 _first_ct(s, m).mkdir()), "patch"),
    "record truncated": (lambda s, m: _write(_record(s, m), _record(s, m).read_bytes()[:50]),
                         "record"),
    "record 100,000 levels deep": (lambda s, m: _write(_record(s, m), "[" * 100_000), "record"),
    "record is a list": (lambda s, m: _write(_record(s, m), "[1, 2]"), "record"),
    "record vertebrae a string": (lambda s, m: _write(_record(s, m), json.dumps(
        dict(json.loads(_record(s, m).read_text()), vertebrae="abc"))), "record"),
    "manifest deleted": (lambda s, m: (s / "manifest.csv").unlink(), None),
    "report binary": (lambda s, m: _write(s / "report.json", _garbage()), None),
    "stray temporaries": (lambda s, m: (_write(s / ".manifest.csv.ab12.part", "half"),
                                        _write(_first_ct(s, m).parent / ".T9_ct.npy.x.part.npy",
                                               "half")), None),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_resume_repairs_a_damaged_store(name, base, tmp_path, capsys):
    damage, names = DAMAGE[name]
    ref_store, manifest = base["ref"] / "patches", base["manifest"]
    run = tmp_path / "run"
    shutil.copytree(ref_store, run / "patches")
    damage(run / "patches", manifest)
    capsys.readouterr()
    patches.extract_patches(base["root"], run, seed=0, progress=False)
    out = capsys.readouterr().out
    report = json.loads((run / "patches" / "report.json").read_text())
    if names:
        victim = Path(manifest["ct_path"].iloc[0]).name if names == "patch" else patches.RECORD_NAME
        assert victim in out and "re-extracted" in out
        assert [r["case"] for r in report["redone"]] == [manifest["case"].iloc[0]]
        assert victim in report["redone"][0]["reason"]
    else:
        assert report["redone"] == []
    assert report["failed"] == []
    got, want = files_under(run / "patches"), files_under(ref_store)
    got.pop("report.json"), want.pop("report.json")
    assert got == want
    assert no_partials(run)
