"""Small file helpers shared by every stage: atomic writes, checksums, provenance.

Writers never leave a half-written file: they write to a temporary name in the same folder,
flush it to disk, then rename it over the target (``os.replace`` is atomic on one file system).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from .errors import DiskFullError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish(tmp: str, path: Path) -> None:
    """Give the finished temporary file normal permissions, then rename it into place."""
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; written files are for everyone to read
    os.replace(tmp, path)


#: errno values that mean "no space left" (ENOSPC; EDQUOT: the user's quota is used up).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes free for this user under ``folder`` (its nearest existing parent), or None."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """True for an ``OSError`` that means the disk (or quota) is full: ENOSPC/EDQUOT, or
    numpy's errno-less "N requested and M written" from a short write."""
    if not isinstance(err, OSError):
        return False
    if err.errno in _FULL:
        return True
    return err.errno is None and "requested and" in str(err) and "written" in str(err)


def disk_full_error(path: str | os.PathLike, err: OSError):
    """:class:`~vfcore.errors.DiskFullError` naming the file, the errno and the space left."""
    code = err.errno if err.errno in _FULL else errno.ENOSPC
    free = free_bytes(Path(path).parent)
    left = "unknown" if free is None else f"{free / 1e6:.1f} MB"
    out = DiskFullError(path, f"disk full (errno {code} {errno.errorcode.get(code, '')}): "
                        f"{left} free under {Path(path).parent}; free some space (or write "
                        f"elsewhere) and run the same step again: finished files are kept")
    out.errno, out.filename = code, str(path)
    return out


@contextlib.contextmanager
def _temporary(path: Path, suffix: str) -> Iterator[str]:
    """A temporary file name beside ``path``; renamed to ``path`` if the block succeeds (after
    an fsync), deleted if it raises. A full disk -> :class:`~vfcore.errors.DiskFullError`
    naming ``path`` (the earlier file at ``path``, if any, is left as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from None
        raise
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(err) and not hasattr(err, "problem"):
            raise disk_full_error(path, err) from None
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``, else delete it."""
    with _temporary(Path(path), ".part") as tmp, open(tmp, mode) as f:
        yield f


def atomic_save(path: str | os.PathLike, save, suffix: str | None = None) -> Path:
    """Call ``save(tmp_path)`` (any library writer taking a file name), then rename atomically.

    ``suffix`` keeps the extension libraries look at (``.nii.gz``, ``.npy``, ``.png``); it
    defaults to everything after the first dot of the target's name.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes)
    with _temporary(path, f".part{suffix}") as tmp:
        save(tmp)
    return path


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    """Write JSON atomically (NaN is not allowed: pass ``None`` instead)."""
    dumps_kwargs.setdefault("indent", 2)
    text = json.dumps(obj, allow_nan=False, **dumps_kwargs)
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``numpy.save`` with an atomic rename."""
    return atomic_save(path, lambda tmp: np.save(tmp, array, allow_pickle=False), suffix=".npy")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour changes results."""
    out = {"python": platform.python_version()}
    for name in ("vfcore", "numpy", "scipy", "pandas", "torch", "monai", "nibabel"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))  # plain str (TorchVersion is a subclass)
        except ImportError:
            pass
    return out
