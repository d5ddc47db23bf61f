"""The run's patch store: every scan of a VerSe-layout root straightened into ``<run>/patches/``.

:func:`extract_patches` keeps int16 HU patches, label patches, the manifest (one row per
vertebra, patient-level split, :mod:`~vfcore.patches.manifest`) and a report (failed scans,
skipped vertebrae, re-extracted cases, the grade table) in the run folder's patch store.

What a user can rely on:

* **resumable**: each case writes its completion record (``case.json``) last, with the sha256
  of every source file and of every patch file it wrote. A rerun skips a case only when the
  sources, the parameters and every patch file still match; a truncated or damaged patch is
  re-extracted and the report says so. A restarted run produces byte-identical files.
* **a failing scan does not stop the others**: an error becomes a line in the report; a worker
  process that dies (the out-of-memory killer) is retried once alone in a fresh process, then
  reported like any failing scan. The manifest and the report are always written.

Clipping to [-1000, 1000] HU and scaling to [0, 1] happen at load time (:mod:`vfcore.data`).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import traceback
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.ndimage import spline_filter

from vfcore.constants import PATCH_SIZE, PATCH_SPACING
from vfcore.checks import regular_file, writable_folder
from vfcore.errors import DataValueError, GeometryError, VfcoreError
from vfcore.io import save_npy, sha256_file, write_json
from vfcore.lock import writes
from vfcore.run import RunFolder
from vfcore.verse import Case, Volume, craniocaudal, find_cases, level_name, load_case

from .geometry import CERVICAL, centroids_from_subreg, fit_spine, straighten
from .manifest import (MANIFEST_COLUMNS, SPLITS, find_grade_table, grade_table_summary,
                       manifest_rows, read_manifest, read_split_table, split_records,
                       write_manifest)

#: Bump when the stored patches would change for the same inputs (forces re-extraction).
METHOD_VERSION = 2
#: A case's completion record, in its folder of the store.
RECORD_NAME = "case.json"
#: The patch files of a vertebra, as keys of its record (and manifest columns).
PATCH_KEYS = ("ct_path", "mask_path", "concept_path")
#: Test hook: ``<case id>`` makes the worker straightening that case kill itself (SIGKILL, as
#: the out-of-memory killer does); ``<case id>:<flag file>`` only the first time (the flag
#: file records that it happened). Only read in worker processes (``workers >= 2``).
KILL_ENV = "VFCORE_TEST_KILL_WORKER"
#: Largest source file read (checked with ``os.stat`` before hashing): a NIfTI scan, a JSON.
SOURCE_MAX_BYTES = {"nifti": 4 << 30, "json": 16 << 20}


# --------------------------------------------------------------------------------------------
# One case -> patch files + completion record
# --------------------------------------------------------------------------------------------


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def source_files(case: Case) -> dict[str, Path]:
    """The files of a case that the patches are made from, by role."""
    roles = ("ct", "mask", "centroids", "subreg", "concepts")
    return {role: getattr(case, role) for role in roles if getattr(case, role) is not None}


def case_checksum(hashes: Mapping[str, str]) -> str:
    """One sha256 over the role:sha256 lines of a case's source files (manifest column)."""
    text = "".join(f"{role}:{hashes[role]}\n" for role in sorted(hashes))
    return hashlib.sha256(text.encode()).hexdigest()


def _params(size: int, spacing: float, ct_order: int) -> dict:
    return {"size": int(size), "spacing": float(spacing), "ct_order": int(ct_order),
            "method_version": METHOD_VERSION}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def damaged_patch(record: dict, out_dir: Path) -> str | None:
    """Why the patch files of a completion record cannot be reused, or None when every file
    exists with the sha256 recorded when it was written."""
    try:
        for v in record["vertebrae"]:
            for key in PATCH_KEYS:
                rel = v[key]
                if not rel:
                    continue
                path = out_dir / rel
                if not path.is_file():
                    return f"{path}: patch file missing"
                want = v.get("sha256", {}).get(key)
                if want is None:
                    return f"{path}: no sha256 recorded (store written by an older vfcore)"
                if sha256_file(path) != want:
                    return (f"{path}: sha256 differs from the one recorded when it was written "
                            f"(truncated or damaged)")
    except (KeyError, TypeError, AttributeError):
        return f"{out_dir / record.get('case', '?') / RECORD_NAME}: malformed completion record"
    return None


def _extract_case(case: Case, root: Path, out_dir: Path, params: dict) -> tuple[dict, str | None]:
    """Straighten every non-cervical vertebra of one case into ``out_dir/<case_id>/``.

    Reads each source file once, writes the patches (atomic), removes files of an earlier
    extraction that are no longer produced, and writes ``case.json`` LAST: its presence means
    the case is complete. Returns the record and, when an earlier complete extraction with
    the same sources had to be redone because a patch file was damaged, why.
    """
    case_dir = out_dir / case.case_id
    record_path = case_dir / RECORD_NAME
    for role, p in source_files(case).items():   # FIFO, device, symlink out of root: never read
        regular_file(p, root, SOURCE_MAX_BYTES["json" if role == "centroids" else "nifti"],
                     f"{role} file")
    hashes = {role: sha256_file(p) for role, p in source_files(case).items()}
    checksum = case_checksum(hashes)
    old = _read_record(record_path)
    redone = None if old is not None or not record_path.exists() else (
        f"{record_path}: unreadable completion record")
    if old is not None and old.get("source_sha256") == checksum and old.get("params") == params:
        redone = damaged_patch(old, out_dir)
        if redone is None:
            _remove_partial(case_dir)
            return old, None
    # written into a staging folder, swapped in only once complete: the old patches stay
    # whole (and where the manifest says) until the new set is safely on disk
    final_dir, case_dir = case_dir, _stage(out_dir, case.case_id, "new")
    _remove_tree(case_dir)
    case_dir.mkdir(parents=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_case(case)
        if data.mask is not None and not data.mask.data.any():
            raise DataValueError(case.mask, "the vertebra mask is all zero: no vertebra is "
                                 "labelled, so no patch would have a label")
        ref = next(v for v in (data.ct, data.mask, data.concepts) if v is not None)
        if data.centroids is not None:
            centroids = data.centroids.world(ref.affine)
        elif data.mask is not None and data.subreg is not None:
            warnings.warn("no centroid file: body centroids computed from the subregion mask "
                          "(label 50)")
            centroids = centroids_from_subreg(data.mask, data.subreg)
        else:
            raise GeometryError(case.ct or case.mask, "no centroid file (*_ctd.json) and no "
                                "subregion mask: the patches are centred on the body centroids")
        spine = fit_spine(centroids, case.centroids or case.subreg)
        ct = data.ct
        if ct is not None and params["ct_order"] > 1:  # cubic: spline coefficients once per scan
            ct = Volume(spline_filter(ct.data, order=params["ct_order"], mode="nearest",
                                      output=np.float32), ct.affine, ct.path)
        skipped = []
        if data.mask is not None:
            in_mask = {int(lb) for lb in np.flatnonzero(np.bincount(data.mask.data.ravel()))
                       if lb > 0}
            for lb in craniocaudal(in_mask - set(centroids)):
                skipped.append({"label": lb, "level": level_name(lb),
                                "reason": "mask label without a body centroid"})
        vertebrae, written = [], {RECORD_NAME}
        for lb in spine.labels:
            if lb in CERVICAL:
                skipped.append({"label": lb, "level": level_name(lb),
                                "reason": "cervical vertebra (C1-C7): excluded as in the paper"})
                continue
            patch = straighten(ct, data.mask, centroids, lb, params["size"],
                               params["spacing"], concepts=data.concepts,
                               ct_order=params["ct_order"], ct_prefiltered=True, spine=spine)
            files, sums = {}, {}
            for kind, array in (("ct", patch.ct), ("mask", patch.mask),
                                ("concept", patch.concepts)):
                if array is None:
                    files[f"{kind}_path"] = ""
                    continue
                name = f"{patch.level}_{kind}.npy"
                save_npy(case_dir / name, array)
                sums[f"{kind}_path"] = sha256_file(case_dir / name)
                written.add(name)
                files[f"{kind}_path"] = f"{case.case_id}/{name}"
            f = patch.frame
            vertebrae.append({"label": lb, "level": patch.level, **files, "sha256": sums,
                              "out_of_field": round(patch.out_of_field, 6),
                              "c": f.c.tolist(), "e_S": f.e_S.tolist(), "e_A": f.e_A.tolist(),
                              "e_L": f.e_L.tolist()})
    order = craniocaudal([s["label"] for s in skipped])
    for stale in case_dir.iterdir():  # leftovers of an older extraction or a killed write
        if stale.name in written:
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    record = {"case": case.case_id, "patient": case.patient, "session": case.session,
              "release_split": case.release_split,
              "sources": {role: {"path": _relative(p, root), "sha256": hashes[role]}
                          for role, p in source_files(case).items()},
              "source_sha256": checksum, "params": params, "vertebrae": vertebrae,
              "skipped": sorted(skipped, key=lambda s: order.index(s["label"])),
              "warnings": sorted({str(w.message) for w in caught})}
    write_json(case_dir / RECORD_NAME, record)
    _swap_in(case_dir, final_dir)
    return record, redone


def _stage(out_dir: Path, case_id: str, kind: str) -> Path:
    """A hidden staging folder beside a case's folder (``.<case>.new`` / ``.<case>.old``)."""
    return out_dir / f".{case_id}.{kind}"


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(new: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``new`` folder: two renames (the old one aside, the
    new one in), then the old one removed. Killed in between, the case has no record and is
    extracted again; the staging folders are cleared by the next run."""
    old = new.with_name(new.name[:-len(".new")] + ".old")
    _remove_tree(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(new, final)
    _remove_tree(old)


def _clear_stages(out_dir: Path) -> None:
    """Staging folders of a killed run (``.<case>.new``, ``.<case>.old``)."""
    for stray in out_dir.glob(".*.new"):
        _remove_tree(stray)
    for stray in out_dir.glob(".*.old"):
        _remove_tree(stray)


def _remove_partial(folder: Path) -> None:
    """Delete temporaries that a killed ``vfcore.io`` write left behind (``.<name>.*.part*``)."""
    if not folder.is_dir():
        return
    for stray in folder.glob(".*.part*"):
        if stray.is_file():
            stray.unlink()


def _test_kill_hook(case_id: str) -> None:
    """Die as the out-of-memory killer kills, when :data:`KILL_ENV` names this case."""
    spec = os.environ.get(KILL_ENV, "")
    target, _, flag = spec.partition(":")
    if not spec or target != case_id:
        return
    if flag:
        if Path(flag).exists():
            return
        Path(flag).touch()
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


def _extract_worker(case: Case, root: str, out_dir: str, params: dict,
                    in_child: bool = False) -> dict:
    """Pool entry point: ``{"record", "redone"}``, or ``{"case", "failed"}`` with the reason;
    an error in a scan never stops the others."""
    if in_child:
        _test_kill_hook(case.case_id)
    try:
        try:
            record, redone = _extract_case(case, Path(root), Path(out_dir), params)
        except BaseException:   # a half-written staging folder is never left behind
            _remove_tree(_stage(Path(out_dir), case.case_id, "new"))
            raise
        return {"record": record, "redone": redone}
    except (VfcoreError, OSError, ValueError, MemoryError) as err:
        return {"case": case.case_id, "failed": f"{type(err).__name__}: {err}"}
    except Exception as err:  # keep the other scans going; the traceback tells what broke
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        return {"case": case.case_id, "failed": f"unexpected {tb}"}


# --------------------------------------------------------------------------------------------
# Running the scans: in this process, in a pool, and alone after a worker died
# --------------------------------------------------------------------------------------------


def _pool_pass(jobs: list, workers: int, context, results: dict, bar) -> list:
    """All ``jobs`` in one pool; returns the jobs lost when a worker died (the pool breaks:
    every unfinished job is lost, not only the one whose worker died)."""
    lost = []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_extract_worker, *job, in_child=True): job for job in jobs}
        for future in cf.as_completed(futures):
            try:
                results[futures[future][0].case_id] = future.result()
                bar.update()
            except BrokenProcessPool:
                lost.append(futures[future])
    return lost


def _isolated_pass(jobs: list, workers: int, context, results: dict, bar) -> list:
    """Each job alone in a fresh one-process pool (up to ``workers`` at a time): a death now
    belongs to that scan. Returns the jobs whose process died."""
    died, queue, running = [], list(jobs), {}
    while queue or running:
        while queue and len(running) < workers:
            job = queue.pop(0)
            pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=context)
            running[pool.submit(_extract_worker, *job, in_child=True)] = (job, pool)
        done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
        for future in done:
            job, pool = running.pop(future)
            pool.shutdown(wait=True)
            try:
                results[job[0].case_id] = future.result()
                bar.update()
            except BrokenProcessPool:
                died.append(job)
    return died


def _run_jobs(jobs: list, workers: int, bar) -> tuple[dict[str, dict], list[str]]:
    """Results by case id, and the cases retried because their worker process died."""
    results: dict[str, dict] = {}
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results[job[0].case_id] = _extract_worker(*job)
            bar.update()
        return results, []
    context = multiprocessing.get_context("spawn")
    lost = _pool_pass(jobs, workers, context, results, bar)
    order = [job[0].case_id for job in jobs]
    lost.sort(key=lambda job: order.index(job[0].case_id))
    for job in _isolated_pass(lost, workers, context, results, bar):
        case_id = job[0].case_id
        _remove_partial(Path(job[2]) / case_id)
        results[case_id] = {"case": case_id, "failed": (
            "WorkerDied: the process straightening this scan died twice (killed by a signal, "
            "e.g. the out-of-memory killer); try fewer --workers or more memory")}
        bar.update()
    return results, [job[0].case_id for job in lost]


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


@writes("vfcore patches (extract_patches)")
def extract_patches(root: str | os.PathLike, run_dir: str | os.PathLike, *, workers: int = 1,
                    seed: int = 0, grades=None, size: int = PATCH_SIZE,
                    spacing: float = PATCH_SPACING, ct_order: int = 1,
                    fractions: Sequence[float] = (0.6, 0.2, 0.2), require_ct: bool = True,
                    progress: bool = True) -> pd.DataFrame:
    """Straighten every scan under ``root`` into the run's patch store; returns the manifest.

    ``grades``: a grade table path or ``read_grades`` frame (default: a table found in
    ``root``, :func:`~vfcore.patches.manifest.find_grade_table`; a table whose case ids match
    no scan gives a warning); ``workers`` processes over scans (tqdm progress bar);
    ``fractions`` train/val/test for patients without an official VerSe split; ``seed`` fixes
    the split. Re-running skips cases whose ``case.json`` matches the sources' sha256, the
    parameters and the patch files' sha256; a failing scan is reported in the report
    (``failed``) and does not stop the others.
    """
    from tqdm.auto import tqdm

    store = RunFolder(run_dir)
    root, out_dir = Path(root), store.patches
    table, table_source = find_grade_table(root, grades)  # bad input: nothing written yet
    cases = find_cases(root, require_ct=require_ct)
    params = _params(size, spacing, ct_order)
    writable_folder(out_dir, "patch store")   # before any work: nothing deleted if not
    _remove_partial(out_dir)
    _clear_stages(out_dir)

    failed, unique, seen = [], [], set()
    for case in cases:
        if case.case_id in seen:
            failed.append({"case": case.case_id, "reason": f"duplicate case id (also at "
                           f"another place in the root): {case.ct or case.mask}"})
            continue
        seen.add(case.case_id)
        unique.append(case)
    grade_info = grade_table_summary(table, table_source, [c.case_id for c in unique])
    if grade_info["warning"]:
        warnings.warn(grade_info["warning"], stacklevel=2)

    jobs = [(c, str(root), str(out_dir), params) for c in unique]
    bar = tqdm(total=len(jobs), desc="straightening scans", unit="scan", disable=not progress)
    results, retried = _run_jobs(jobs, workers, bar)
    bar.close()

    grade_rows = None if table is None else {
        (r["case"], int(r["label"])): r for r in table.to_dict("records")}
    rows, skipped, warned, records, redone = [], [], [], [], []
    for case in unique:
        result = results[case.case_id]
        if "failed" in result:
            failed.append({"case": case.case_id, "reason": result["failed"]})
            continue
        rec = result["record"]
        if result["redone"]:
            redone.append({"case": case.case_id, "reason": result["redone"]})
            print(f"patches: {case.case_id} re-extracted: {result['redone']}", flush=True)
        records.append(rec)
        rows.extend(manifest_rows(rec, grade_rows))
        skipped.extend({"case": rec["case"], **s} for s in rec["skipped"])
        warned.extend({"case": rec["case"], "warning": w} for w in rec["warnings"])

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    split_of = split_records(manifest, records, seed, fractions, pinned=read_split_table(root))
    manifest["split"] = manifest["patient"].map(split_of)
    write_manifest(store.manifest, manifest)

    labelled = manifest[manifest["fracture"] != ""]
    report = {
        "root": str(root.resolve()), "params": params, "seed": seed,
        "fractions": list(fractions), "versions": _versions(),
        "cases": len(cases), "extracted": len(records), "vertebrae": len(manifest),
        "labelled": len(labelled), "fractured": int((labelled["fracture"] == 1).sum()),
        "splits": {s: {"patients": sum(1 for v in split_of.values() if v == s),
                       "vertebrae": int((manifest["split"] == s).sum()),
                       "fractured": int(((labelled["split"] == s)
                                         & (labelled["fracture"] == 1)).sum())}
                   for s in SPLITS},
        "grade_table": grade_info,
        "failed": sorted(failed, key=lambda f: f["case"]),
        "retried": retried,
        "redone": redone,
        "skipped": skipped,
        "excluded": [{"case": r.case, "label": int(r.label), "level": r.level,
                      "reason": r.reason} for r in manifest.itertuples() if r.reason],
        "warnings": warned,
    }
    write_json(store.path("patch_report"), report)
    return read_manifest(store.manifest)


def _versions() -> dict[str, str]:
    """Versions of what shapes the patches (``vfcore.io.versions`` would import torch and
    MONAI, which takes seconds and is not needed here)."""
    import platform

    import nibabel
    import scipy

    import vfcore

    return {"python": platform.python_version(), "vfcore": vfcore.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "nibabel": nibabel.__version__}
