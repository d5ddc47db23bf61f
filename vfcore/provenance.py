"""Provenance checked on read: is an artifact still made from what the run folder holds now?

Every artifact records what it was made from: the dissection's ``meta.json`` the checkpoint's
and the manifest's sha256 (``checkpoint_sha256``, ``manifest_sha256``), notebook 04's
``exemplars.json`` the dissection it exports (``dissection_id``), a checkpoint the manifest
it was trained on (``config.manifest_sha256``). Retraining (notebook 02 or ``vfcore train``)
changes the run's checkpoint, so a dissection made before it describes another network;
rebuilding the patch store changes the manifest under the model and the dissection. The
readers ask here:

* :func:`dissection_staleness` / :func:`check_dissection` (``vfcore.dissect.load_artifacts``,
  hence the explorer, notebooks 04-06 and the CLI): another checkpoint or manifest ->
  :class:`~vfcore.errors.StaleArtifactError` naming the notebook (and command) to rerun;
* :func:`stale_steps` (``vfcore.prerequisites.prepare``): which steps to build again.

Hashes are cached per (path, size, mtime, inode): a reader asking twice hashes once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import read_checkpoint
from .errors import CheckpointError, StaleArtifactError
from .io import sha256_file
from .run import ARTIFACTS, RunFolder

_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached while its size, mtime and inode stay the same."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = sha256_file(path)
    return _CACHE[key]


def _how(name: str) -> str:
    art = ARTIFACTS[name]
    return f"run {art.notebook} again" + (f" (or `{art.command}`)" if art.command else "")


def _recorded_checkpoint(run: RunFolder, meta: dict) -> Path:
    rel = meta.get("checkpoint") or ARTIFACTS["checkpoint"].rel
    path = Path(rel)
    return path if path.is_absolute() else run.root / path


def dissection_staleness(run_dir, meta: dict) -> str | None:
    """Why a dissection (its ``meta.json`` as a dict) no longer fits the run folder: made from
    another checkpoint or patch manifest than the ones there now; None when it fits (or when
    the file it names is not there to compare with: that is reported as missing elsewhere)."""
    run = RunFolder(run_dir)
    checks = (("checkpoint_sha256", _recorded_checkpoint(run, meta), "checkpoint"),
              ("manifest_sha256", run.manifest, "patch manifest"))
    for key, path, what in checks:
        recorded = meta.get(key)
        if recorded is None or not path.is_file():
            continue
        now = file_sha256(path)
        if now != recorded:
            return (f"made from another {what} (sha256 {str(recorded)[:12]}..., {path} is now "
                    f"{now[:12]}...; retrained or rebuilt since)")
    return None


def check_dissection(run_dir, meta: dict, meta_path: str | os.PathLike) -> None:
    """:class:`StaleArtifactError` naming notebook 03 when :func:`dissection_staleness` says so."""
    why = dissection_staleness(run_dir, meta)
    if why:
        raise StaleArtifactError(meta_path, f"stale dissection: {why}: {_how('dissection_meta')}, "
                                 f"then {ARTIFACTS['exemplars'].notebook}")


def model_staleness(run_dir) -> str | None:
    """Why the run's checkpoint (``RunFolder.checkpoint``) no longer fits the patch store
    (trained on another manifest), or None (also when either file is missing or the
    checkpoint records no manifest)."""
    run = RunFolder(run_dir)
    if not (run.checkpoint.is_file() and run.manifest.is_file()):
        return None
    try:
        recorded = (read_checkpoint(run.checkpoint).get("config") or {}).get("manifest_sha256")
    except CheckpointError as err:
        return f"unreadable checkpoint ({err.problem})"
    if recorded and recorded != file_sha256(run.manifest):
        return f"{run.checkpoint} was trained on another patch store than {run.manifest}"
    return None


def exports_staleness(run_dir) -> str | None:
    """Why notebook 04's ``exemplars.json`` belongs to another dissection than ``meta.json``."""
    run = RunFolder(run_dir)
    try:
        meta = json.loads(run.path("dissection_meta").read_text())
        ex = json.loads(run.path("exemplars").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and isinstance(ex, dict) and ex.get("dissection_id") != meta.get("dissection_id"):
        return f"{run.path('exemplars')} exports an earlier dissection"
    return None


def stale_steps(run_dir) -> dict[str, str]:
    """``{step: why}`` for the steps of ``vfcore.prerequisites.ORDER`` whose outputs exist but
    were made from other inputs than the run folder holds now (``training``: a model trained
    on another patch store; ``ranking``: a dissection of another checkpoint or manifest, or
    exports of another dissection)."""
    run = RunFolder(run_dir)
    out: dict[str, str] = {}
    why = model_staleness(run)
    if why:
        out["training"] = why
    meta_path = run.path("dissection_meta")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        why = (dissection_staleness(run, meta) if isinstance(meta, dict)
               else f"{meta_path}: unreadable")
        if why:
            out["ranking"] = why
    if "ranking" not in out:
        why = exports_staleness(run)
        if why:
            out["ranking"] = why
    return out
