"""Synthetic thoracolumbar CT scans in the exact VerSe layout, with graded fractures and concepts.

The embedded default data set of the collection: :func:`write_phantom_root` writes ``n_scans``
scans as a VerSe-layout root that :mod:`vfcore.verse` reads exactly like the real data::

    <root>/rawdata/<sub>/<sub>_ct.nii.gz                          int16 HU
    <root>/derivatives/<sub>/<sub>_seg-vert_msk.nii.gz            uint8 VerSe labels (T1 = 8 ... L5 = 24,
                                                                  T13 = 28, L6 = 25)
    <root>/derivatives/<sub>/<sub>_seg-subreg_ctd.json            body centroids, VerSe bytes
    <root>/derivatives/<sub>/<sub>_seg-concept_msk.nii.gz         uint8 concept labels (CONCEPTS)
    <root>/derivatives/<sub>/<sub>_phantom-truth.json             true geometry per vertebra
    <root>/fracture_grades.tsv                                    case, label, grade, shape
    <root>/concept_labels.json                                    the concept label table

Each scan is a curved spine (kyphosis, lordosis, mild scoliosis) of vertebrae with cortical
shell, endplates, trabecular core, discs, posterior elements, canal, ribs, lungs, muscle
and fat, drawn at one of several acquisitions (0.5-3 mm spacing, anisotropic, different
orientation codes, blur, noise).  The field of view is that of a real scan: cut
cranio-caudally (the end vertebrae may lie partly outside), in the axial plane either
spine-centred (to the skin of the back) or the whole trunk.  About 12 % of the vertebrae
(``prevalence``) carry a Genant fracture (grade 1-3; wedge, biconcave or crush) with its signs (height loss, endplate
depression and irregularity, anterior cortical buckling, sclerotic condensation band); the
confounders (physiological wedging, Schmorl nodes, degenerated discs with endplate sclerosis,
osteophytes, low bone density) make naive cues fail.  See ``anatomy`` (geometry and its
dataclasses), ``sampling`` (drawing a geometry from a seed), ``acquisition`` (spacing,
orientation, field of view), ``render`` with ``canvas``, ``background`` and ``bones``
(voxels), ``concepts`` (the concept mask and per-vertebra concept masks) and ``twins`` (a
scan's healed twin: one fracture healed, everything else and the noise the same).

Same seed -> byte-identical files.  Scans already complete are skipped on a re-run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from vfcore.errors import FormatError
from vfcore.io import atomic_save, atomic_write, write_json
from vfcore.lock import writes

from .anatomy import GRADE_LOSS, SHAPES, ScanSpec
from .concepts import CONCEPTS, TARGET_CONCEPTS, label_table, target_concepts
from .render import Scan, render_scan
from .sampling import sample_scan

__all__ = ["CONCEPTS", "DEFAULT_SCANS", "TARGET_CONCEPTS", "GRADE_LOSS", "SHAPES", "Scan",
           "ScanSpec", "case_paths", "make_scan", "read_truth", "render_scan", "sample_scan",
           "target_concepts", "write_phantom_root", "write_scan"]

#: Scans in the default data set (about a minute on one CPU core).
DEFAULT_SCANS = 40
#: The highest fracture rate ``prevalence`` may ask for (a dissection set of many positives).
MAX_PREVALENCE = 0.8
#: The highest confounder rate (Schmorl nodes, degenerated discs, wedges: rates times this).
MAX_CONFOUNDERS = 5.0
#: Bumped whenever the drawing changes, so that old scans are redrawn, not reused.
PHANTOM_VERSION = 4

_CASE = re.compile(r"^sub-phantom(\d+)$")


def case_paths(root: str | os.PathLike, case: str) -> dict[str, Path]:
    """Where the files of ``case`` live under ``root`` (VerSe layout)."""
    root = Path(root)
    raw, der = root / "rawdata" / case, root / "derivatives" / case
    return {
        "ct": raw / f"{case}_ct.nii.gz",
        "vert": der / f"{case}_seg-vert_msk.nii.gz",
        "concept": der / f"{case}_seg-concept_msk.nii.gz",
        "centroids": der / f"{case}_seg-subreg_ctd.json",
        "truth": der / f"{case}_phantom-truth.json",
    }


def make_scan(seed: int, index: int, **kwargs) -> Scan:
    """Draw scan ``index`` of the data set ``seed`` in memory (no files)."""
    return render_scan(sample_scan(seed, index, **kwargs))


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    atomic_save(path, img.to_filename, suffix=".nii.gz")


def _write_centroids(path: Path, voxel: dict[int, np.ndarray], affine: np.ndarray) -> None:
    from vfcore.verse import write_centroids  # the reader owns the exact VerSe bytes

    write_centroids(path, voxel, affine)


def _params(seed: int, index: int, prevalence: float, confounders: float) -> dict:
    return {"seed": int(seed), "index": int(index), "prevalence": float(prevalence),
            "confounders": float(confounders), "version": PHANTOM_VERSION}


def _complete(paths: dict[str, Path], params: dict) -> dict | None:
    """The truth of a scan whose files are all there and were drawn with ``params``, else None."""
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        truth = json.loads(paths["truth"].read_text())
    except (OSError, ValueError):
        return None
    return truth if truth.get("params") == params else None


def write_scan(root: str | os.PathLike, seed: int, index: int, prevalence: float = 0.12,
               confounders: float = 1.0) -> dict:
    """Draw and write one scan (skipped when already complete); returns its truth dict.

    The truth JSON is written last: its presence (with matching parameters) marks the scan
    as complete, so an interrupted run redraws only unfinished scans.
    """
    params = _params(seed, index, prevalence, confounders)
    case = f"sub-phantom{index:03d}"
    paths = case_paths(root, case)
    done = _complete(paths, params)
    if done is not None:
        return done
    spec = sample_scan(seed, index, prevalence=prevalence, confounders=confounders)
    scan = render_scan(spec)
    paths["truth"].unlink(missing_ok=True)
    _save_nifti(paths["ct"], scan.ct, scan.affine)
    _save_nifti(paths["vert"], scan.vert, scan.affine)
    _save_nifti(paths["concept"], scan.concept, scan.affine)
    _write_centroids(paths["centroids"], scan.centroids, scan.affine)
    truth = {**scan.truth, "params": params}
    write_json(paths["truth"], truth)
    return truth


def _job(args) -> dict:
    return write_scan(*args)


def _grades_tsv(truths: list[dict]) -> str:
    lines = ["case\tlabel\tgrade\tshape"]
    for t in sorted(truths, key=lambda t: t["case"]):
        for v in t["vertebrae"]:
            lines.append(f"{t['case']}\t{v['label']}\t{v['grade']}\t{v['shape']}")
    return "\n".join(lines) + "\n"


def _remove_stale(root: Path, n_scans: int) -> None:
    """Delete phantom scans of an earlier, larger run (only ``sub-phantomNNN`` written by us)."""
    for top in ("rawdata", "derivatives"):
        base = root / top
        if not base.is_dir():
            continue
        for sub in base.iterdir():
            m = _CASE.match(sub.name)
            if not (m and sub.is_dir() and int(m.group(1)) >= n_scans):
                continue
            truth = case_paths(root, sub.name)["truth"]
            ours = not truth.exists()
            if truth.exists():
                try:
                    ours = json.loads(truth.read_text()).get("generator") == "vfcore.phantom"
                except (OSError, ValueError):
                    ours = False
            if ours and all(p.name.startswith(sub.name) or p.name.startswith(".")
                            for p in sub.iterdir()):
                shutil.rmtree(sub)


def _write_split_table(root: Path, dissect_cases: list[str]) -> None:
    """The root's split table: the dissection-only scans' patients -> ``dissect`` (none: no table)."""
    from vfcore.constants import DISSECT_SPLIT, SPLIT_TABLE

    path = root / SPLIT_TABLE
    if not dissect_cases:
        path.unlink(missing_ok=True)
        return
    with atomic_write(path, "w") as f:
        f.write("patient\tsplit\n" + "".join(f"{c}\t{DISSECT_SPLIT}\n" for c in dissect_cases))


@writes("vfcore phantom (write_phantom_root)", arg="root", run=False, data_root=True)
def write_phantom_root(root: str | os.PathLike, n_scans: int = DEFAULT_SCANS, seed: int = 0,
                       workers: int = 1, prevalence: float = 0.12, confounders: float = 1.0,
                       progress: bool = True, dissect_scans: int = 0,
                       dissect_prevalence: float = 0.5,
                       dissect_confounders: float | None = None) -> Path:
    """Write ``n_scans`` synthetic scans as a VerSe-layout root; returns the root.

    Deterministic: the same (seed, n_scans, prevalence, confounders) give byte-identical
    files, whatever ``workers`` is.  Resumable: complete scans are skipped.  ``workers > 1``
    draws scans in that many processes.  Phantom scans ``sub-phantomNNN`` beyond ``n_scans``
    left by an earlier run are removed, so the root always holds exactly this data set.

    ``prevalence`` is the expected share of fractured vertebrae (default 0.12, about the
    VerSe share; at most :data:`MAX_PREVALENCE`); fractures still cluster in patients and
    at the mid-thoracic and thoraco-lumbar levels.  A higher rate makes a held-out set with
    many positives from few scans, e.g. for the dissection: ``write_phantom_root(root,
    n_scans=15, seed=2, prevalence=0.5)``; 12 such scans held 46-67 fractured vertebrae
    of 100-123 for seeds 2-6, but 25 for seed 1 (fractures cluster in patients, so a
    few scans vary).  Another ``seed`` draws other patients; the case ids
    ``sub-phantomNNN`` repeat across roots.
    ``confounders`` scales the rate of Schmorl nodes, osteophytes and degenerated discs.

    ``dissect_scans`` more scans (``sub-phantomNNN`` after the first ``n_scans``), drawn with
    ``dissect_prevalence``, are pinned to the split ``dissect`` by the root's split table
    (``splits.tsv``, read by :func:`vfcore.patches.extract_patches`): held-out vertebrae for
    the dissection only, so c_k ranks tens of true positives without a larger training set.
    They are drawn with ``dissect_confounders`` (default: ``confounders``): a rate above 1
    enriches them in fracture mimics (strong physiological wedges, Schmorl nodes,
    degenerated discs, osteophytes), so that the false-positive ranking r_k has enough
    false positives to rank.  The first ``n_scans`` scans are the same with or without them.
    """
    root = Path(root)
    if n_scans < 1:
        raise FormatError(root, f"n_scans must be at least 1, got {n_scans}")
    for name, value in (("prevalence", prevalence), ("dissect_prevalence", dissect_prevalence)):
        if not 0.0 <= value <= MAX_PREVALENCE:
            raise FormatError(root, f"{name} (the share of fractured vertebrae) must be in "
                                    f"[0, {MAX_PREVALENCE}], got {value}")
    if dissect_scans < 0:
        raise FormatError(root, f"dissect_scans must be 0 or more, got {dissect_scans}")
    if root.exists() and not root.is_dir():
        raise FormatError(root, "exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    if dissect_confounders is None:
        dissect_confounders = confounders
    for name, value in (("confounders", confounders), ("dissect_confounders", dissect_confounders)):
        if not 0.0 <= value <= MAX_CONFOUNDERS:
            raise FormatError(root, f"{name} (the rate of fracture mimics) must be in "
                                    f"[0, {MAX_CONFOUNDERS}], got {value}")
    total = n_scans + dissect_scans
    jobs = [(root, seed, i, *((prevalence, confounders) if i < n_scans
                              else (dissect_prevalence, dissect_confounders)))
            for i in range(total)]
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="phantom scans", unit="scan", disable=not progress)
    truths: list[dict] = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for truth in pool.map(_job, jobs):
                truths.append(truth)
                bar.update()
    else:
        for job in jobs:
            truths.append(_job(job))
            bar.update()
    bar.close()
    _remove_stale(root, total)
    _write_split_table(root, [f"sub-phantom{i:03d}" for i in range(n_scans, total)])
    with atomic_write(root / "fracture_grades.tsv", "w") as f:
        f.write(_grades_tsv(truths))
    write_json(root / "concept_labels.json", label_table())
    return root


#: Columns of :func:`read_truth`.
TRUTH_COLUMNS = ("case", "label", "grade", "shape", "height_loss", "physiological_wedge",
                 "confounders")


def read_truth(root: str | os.PathLike) -> pd.DataFrame:
    """The phantom's ground truth, one row per vertebra of every scan under ``root``.

    Read from ``derivatives/<sub>/<sub>_phantom-truth.json``: ``case``, ``label`` (VerSe),
    Genant ``grade`` and ``shape``, the drawn ``height_loss`` and ``physiological_wedge``
    (fractions), and ``confounders`` ("; "-joined: physiological wedging, Schmorl node,
    degenerated disc, ...; empty when none). An empty table for a root without truth files
    (real data). Used to ask what a trained network gets wrong (notebook 02).
    """
    rows = []
    for path in sorted(Path(root).glob("derivatives/*/*_phantom-truth.json")):
        try:
            truth = json.loads(path.read_text())
            for v in truth["vertebrae"]:
                rows.append({"case": truth["case"], "label": int(v["label"]), "grade": int(v["grade"]),
                             "shape": int(v["shape"]), "height_loss": float(v["height_loss"]),
                             "physiological_wedge": float(v["physiological_wedge"]),
                             "confounders": "; ".join(v.get("confounders") or [])})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FormatError(path, f"not a readable phantom truth file ({type(err).__name__}: {err})") from None
    return pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))
