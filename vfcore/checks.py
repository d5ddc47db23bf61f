"""Input checks done before work: regular files inside their root, paths inside a store,
patches of the store's shape and type, patients in one split, finite training losses.

Each check raises a typed error (``vfcore.errors``) naming the file and the problem; none reads
more than a file's metadata (``os.stat``) unless it says so, so a FIFO or ``/dev/zero`` given
as a scan is refused before anything tries to read (or hash) it.
"""
from __future__ import annotations

import errno
import math
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Sequence

from .errors import DataValueError, FormatError, UnsafePathError, WriteError
from .io import disk_full_error, is_disk_full

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def regular_file(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 max_bytes: int | None = None, what: str = "file") -> Path:
    """``path`` if it is a regular file (after symlinks), not a symlink leading out of ``root``
    (its target resolved against the resolved root; folders of the root may be links) and at
    most ``max_bytes`` long; else :class:`UnsafePathError` (FIFO, device, socket, folder, a
    file symlinked out of ``root``) or :class:`FormatError` (too large). Only ``os.stat`` is
    called: nothing is opened."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafePathError(path, f"no such {what} (a dangling symlink?)") from None
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise UnsafePathError(path, f"is {kind}, not a regular {what}: refused before reading it")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(path, f"is not a regular {what}")
    # a folder of the root may be a link (a download on another disk); a file may not lead out
    if root is not None and path.is_symlink():
        real, top = path.resolve(), Path(root).resolve()
        if not real.is_relative_to(top):
            raise UnsafePathError(path, f"leads to {real}, outside the data root {top} (a symlink "
                                  f"out of the root): refused; copy the file into the root")
    if max_bytes is not None and st.st_size > max_bytes:
        raise FormatError(path, f"is {st.st_size:,} bytes, more than the limit of {max_bytes:,} "
                          f"for a {what}: refused before reading it")
    return path


def writable_folder(folder: str | os.PathLike, what: str = "folder") -> Path:
    """Create and remove a file in ``folder`` (made if missing): :class:`WriteError` naming it
    and the errno when that fails (no permission, read-only file system), before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(folder / ".write-test", err) from None
        code = err.errno or errno.EACCES
        out = WriteError(folder, f"cannot write the {what} (errno {code} "
                         f"{errno.errorcode.get(code, '')}: {err.strerror or err}): nothing was "
                         f"changed; make it writable (or choose another folder) and run again")
        out.errno, out.filename = code, str(folder)
        raise out from None
    return folder


def store_path(rel: str, store: str | os.PathLike, where: str | os.PathLike, column: str) -> str:
    """A manifest path (relative to the store): not absolute, no ``..``; else UnsafePathError."""
    if not rel:
        return rel
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute()
            or PureWindowsPath(rel).drive or ".." in PurePosixPath(rel.replace("\\", "/")).parts):
        raise UnsafePathError(where, f"{column} {rel!r} is not a path inside the patch store "
                              f"{store} (absolute or climbing out with '..'): refused")
    return rel


def patient_overlap(patients: Sequence[str], splits: Sequence[str], where) -> None:
    """:class:`DataValueError` when a patient has rows in two splits (leakage)."""
    seen: dict[str, set] = {}
    for p, s in zip(patients, splits):
        if s:
            seen.setdefault(str(p), set()).add(str(s))
    both = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    if both:
        some = ", ".join(f"{p} in {'+'.join(s)}" for p, s in sorted(both.items())[:5])
        raise DataValueError(where, f"{len(both)} patient(s) in more than one split ({some}): "
                             f"the splits must be per patient; rebuild the store with `vfcore patches`")


def patch_array(path, array, shape: Sequence[int], kinds: str = "iu") -> None:
    """:class:`FormatError` unless a stored patch has ``shape`` and an integer type."""
    if tuple(array.shape) != tuple(shape) or array.dtype.kind not in kinds:
        raise FormatError(path, f"patch of shape {list(array.shape)} and type {array.dtype}, but "
                          f"the store's patches are {list(shape)} integers (int16 HU / uint8 "
                          f"labels): extract the patches again")


def finite_loss(loss: float, *, batch: int, ids, patches=None, epoch: int | None = None,
                n_batches: int | None = None, names=None, where=None) -> None:
    """Stop training on a NaN or infinite loss: :class:`DataValueError` naming the batch, the
    optimiser step (with ``epoch`` and ``n_batches``), and the batch's patch files (``names``
    [N] per sample, else ``patches.paths`` of a lazy ``PatchArray``, else the sample indices).
    The error keeps ``loss``, ``batch`` and ``ids`` so a caller can name the epoch and files
    (:func:`nonfinite_in_epoch`)."""
    if math.isfinite(loss):
        return
    ids = [int(i) for i in ids]
    if names is None and hasattr(patches, "paths"):
        names = patches.paths
    files = [str(names[i]) for i in ids] if names is not None else [f"training sample {i}" for i in ids]
    shown = ", ".join(sorted(set(files))[:8]) + (f", ... ({len(set(files))} files)" if len(set(files)) > 8 else "")
    at = f"batch {batch + 1}" if epoch is None else (
        f"epoch {epoch + 1}, batch {batch + 1} (step {epoch * (n_batches or 0) + batch + 1})")
    err = DataValueError(where, f"training loss is {loss} at {at}: the weights would become NaN; "
                         f"stopped. The batch's patches: {shown}. Check them (NaN or extreme "
                         f"values) and extract again")
    err.loss, err.batch, err.ids = loss, batch, ids
    raise err


def nonfinite_in_epoch(err: DataValueError, epoch: int, n_batches: int, names, where) -> DataValueError:
    """The error of :func:`finite_loss` again, with the epoch, the step and the files named."""
    try:
        finite_loss(err.loss, batch=err.batch, ids=err.ids, epoch=epoch, n_batches=n_batches,
                    names=names, where=where)
    except DataValueError as out:
        return out
    return err
